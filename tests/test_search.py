"""The hypothesis search on a real fixture where only some inputs break parity.

fixtures/threshold/gate.fp16.mnn is bit-identical to its fp32 build until the
masked area passes 62.5% or the mean brightness passes 0.75; then it goes
black.  The shipped input sets pass; the search must find the ones that do not.
"""
from __future__ import annotations

import numpy as np
import pytest

from pytest_mnn_parity.inputs.sets import InputSet
from pytest_mnn_parity.engine.engine import ParityEngine
from pytest_mnn_parity.engine.results import ParitySettings
from pytest_mnn_parity.mnn.runner import RunConfig
from pytest_mnn_parity.engine.search import judge_inputs, replay_snippet, save, search
from pytest_mnn_parity.inputs.sidecar import find_sidecar
from pytest_mnn_parity.core.tolerances import resolve
from pytest_mnn_parity.core.verdict import Category

from conftest import DEMO, FIXTURES

GATE = FIXTURES / "threshold" / "gate.fp16.mnn"
HIGH = RunConfig("CPU", "high")
TOL = resolve("CPU", "high")


@pytest.fixture(scope="module")
def engine():
    return ParityEngine(ParitySettings(reference=str(FIXTURES / "threshold" / "gate.mnn")))


@pytest.fixture(scope="module")
def sidecar():
    return find_sidecar(GATE, FIXTURES.parent)


def _judge(engine, image_level: float, mask_rows: int):
    mask = np.zeros((1, 1, 8, 8), dtype=np.float32)
    mask[..., :mask_rows, :] = 1.0
    inputs = {"image": np.full((1, 3, 8, 8), image_level, dtype=np.float32), "mask": mask}
    return judge_inputs(engine, GATE, HIGH, inputs, TOL).category


def test_the_fixture_breaks_only_past_its_thresholds(engine, sidecar):
    for input_set in sidecar.input_sets:
        assert engine.check(GATE, HIGH, input_set=input_set).category is Category.OK
    assert _judge(engine, 0.5, 5) is Category.OK  # 62.5% masked, mean brightness 0.5
    assert _judge(engine, 0.75, 0) is Category.OK
    assert _judge(engine, 0.5, 6) is Category.ZERO_OUTPUT  # 75% masked
    assert _judge(engine, 0.8, 0) is Category.ZERO_OUTPUT
    assert _judge(engine, 0.76, 0) is Category.MISMATCH  # dimmed, not yet black


def test_search_finds_a_breaking_input_shrinks_it_and_is_deterministic(engine, sidecar):
    dark = sidecar.input_set("dark")
    first = search(engine, GATE, HIGH, TOL, max_examples=20, seed=0, input_set=dark)
    again = search(engine, GATE, HIGH, TOL, max_examples=20, seed=0, input_set=dark)
    assert first.found and first.verdict.category is Category.ZERO_OUTPUT
    assert first.runs_to_first <= 20 and first.runs <= 20 + 200
    image, mask = first.inputs["image"], first.inputs["mask"]
    assert image.mean() > 0.75 or mask.mean() > 0.625  # really past a threshold
    assert len(np.unique(image)) == 1 and len(np.unique(mask)) == 1  # shrunk to flat pictures
    assert first.name == again.name and first.runs == again.runs
    for name in first.inputs:
        np.testing.assert_array_equal(first.inputs[name], again.inputs[name])


def test_saved_input_replays_as_an_input_set_from_the_sidecar(engine, sidecar, tmp_path):
    outcome = search(engine, GATE, HIGH, TOL, max_examples=20, seed=3, input_set=sidecar.input_set("noise"))
    assert outcome.found
    saved = save(outcome, tmp_path / "found", "gate")
    assert saved.is_file() and saved.suffix == ".npz"
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("gate.fp16.mnn", "gate.mnn"):
        (folder / name).write_bytes((FIXTURES / "threshold" / name).read_bytes())
    file, snippet = replay_snippet(folder / "gate.fp16.mnn", None, outcome.name, saved, outcome.inputs)
    assert file == folder / "gate.fp16.mnn.toml" and "../found/" in snippet
    file.write_text(snippet + "\n")
    replayed = find_sidecar(folder / "gate.fp16.mnn", tmp_path).input_set(outcome.name)
    fresh = ParityEngine(ParitySettings(reference=str(folder / "gate.mnn")))
    result = fresh.check(folder / "gate.fp16.mnn", HIGH, input_set=replayed)
    assert result.category is outcome.verdict.category, result.message
    assert result.input_set == outcome.name


def test_search_on_a_healthy_model_finds_nothing_within_its_budget():
    engine = ParityEngine()
    outcome = search(engine, DEMO, RunConfig("CPU", "low"), resolve("CPU", "low"), max_examples=8, seed=0)
    assert not outcome.found and outcome.verdict is None
    assert 1 <= outcome.runs <= 8
    assert outcome.as_dict()["found"] is False


def test_shrink_budget_bounds_the_runs(engine, sidecar):
    outcome = search(engine, GATE, HIGH, TOL, max_examples=20, seed=0, input_set=sidecar.input_set("dark"),
                     shrink_budget=2)
    assert outcome.found and outcome.runs <= 22


def test_in_memory_input_set_validates_against_the_model(engine):
    bad = InputSet.from_arrays("x", {"image": np.zeros((1, 3, 4, 4)), "mask": np.zeros((1, 1, 8, 8))})
    result = engine.check(GATE, HIGH, input_set=bad)
    assert result.category is Category.MODEL_ERROR
    assert "gives shape 1x3x4x4 but input 'image' of the model is 1x3x8x8" in result.message
