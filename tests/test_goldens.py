"""Goldens: missing -> the command that creates it; check; a changed model fails; update says what changed."""
from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import PurePosixPath

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pytest_mnn_parity.regression.golden import GOLDEN_FILE, golden_folder, read_golden, summary, write_golden

from conftest import FIXTURES, REPO, read_report, results_by_nodeid

BASE = ("--mnn-only", "--mnn-backends", "CPU", "--mnn-precisions", "high", "--mnn-golden", "goldens")


def _command(result, prefix: str) -> list[str]:
    line = next(line for line in result.outlines if prefix in line)
    argv = shlex.split(line.split(prefix, 1)[1])
    assert argv[0] == "pytest"
    return argv[1:]


def test_missing_golden_fails_with_the_command_that_creates_it_then_check_change_and_update(pytester, models):
    models("collapse/healthy.mnn", rename="net.mnn")
    missing = pytester.runpytest(*BASE, "--mnn-model", "net.mnn", "--mnn-report", "r.json")
    missing.assert_outcomes(passed=1, failed=1)
    rec = results_by_nodeid(read_report(pytester.path / "r.json"))["net.mnn::golden"]
    assert rec["category"] == "no_golden" and rec["reference_label"] == "golden"
    assert "goldens/net.mnn.golden/golden.json does not exist" in rec["message"]
    missing.stdout.fnmatch_lines(["model*CPU-high*golden", "net.mnn*PASS*FAIL no_golden"])

    create = _command(missing, "create it: ")
    assert "--mnn-update-golden" in create
    created = pytester.runpytest(*create)
    created.assert_outcomes(passed=2)
    created.stdout.fnmatch_lines(["golden written: goldens/net.mnn.golden: new, outputs 'out'",
                                  "goldens in goldens: 1 written"])
    folder = pytester.path / "goldens" / "net.mnn.golden"
    data = json.loads((folder / GOLDEN_FILE).read_text())
    assert data["outputs"]["out"]["file"] == "out.npy" and data["computed_on"] == "CPU high, 4 threads"
    assert data["input_set"]["seed"] == 0 and data["model"] == "net.mnn"
    pytester.runpytest(*BASE, "--mnn-model", "net.mnn").assert_outcomes(passed=2)

    # Unchanged: an update run leaves every file as it was.
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    same = pytester.runpytest(*create)
    same.stdout.fnmatch_lines(["golden unchanged: goldens/net.mnn.golden", "goldens in goldens: 1 unchanged"])
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps

    # The model is replaced by its --fp16 build: same interface, outputs off by ~1e-3 (beyond fp32).
    shutil.copyfile(FIXTURES / "collapse" / "healthy.fp16.mnn", pytester.path / "net.mnn")
    changed = pytester.runpytest(*BASE, "--mnn-model", "net.mnn")
    changed.assert_outcomes(passed=1, failed=1)
    changed.stdout.fnmatch_lines(["*mismatch on CPU-high: output 'out'*",
                                  "*reference: golden goldens/net.mnn.golden/golden.json (MNN *",
                                  "*tolerance: tier fp32*",
                                  "*the model changed since the golden was written: sha256 * -> *",
                                  "*if the change is intended, rewrite the golden: pytest *--mnn-update-golden*"])
    reproduce = _command(changed, "reproduce: ")
    pytester.runpytest(*reproduce).assert_outcomes(passed=1, failed=1)
    # Looser tolerances given on the command line apply to the golden as well.
    pytester.runpytest(*BASE, "--mnn-model", "net.mnn", "--mnn-atol", "0.01", "--mnn-rtol", "0.01").assert_outcomes(passed=2)

    rewrite = _command(changed, "rewrite the golden: ")
    updated = pytester.runpytest(*rewrite)
    updated.assert_outcomes(passed=2)
    updated.stdout.fnmatch_lines(["golden rewritten: goldens/net.mnn.golden: model sha256 * -> *; output 'out': "
                                  "max|d| * of its range), OUTSIDE the fp32 tier", "goldens in goldens: 1 rewritten"])
    pytester.runpytest(*BASE, "--mnn-model", "net.mnn").assert_outcomes(passed=2)


def test_golden_from_other_inputs_or_damaged_is_no_golden_with_the_fix(pytester, models):
    models("multi_io.mnn")
    pytester.runpytest(*BASE, "--mnn-model", "multi_io.mnn", "--mnn-update-golden").assert_outcomes(passed=2)
    other = pytester.runpytest(*BASE, "--mnn-model", "multi_io.mnn", "--mnn-seed", "5", "-k", "golden")
    other.assert_outcomes(failed=1)
    golden = read_golden(pytester.path / "goldens" / "multi_io.mnn.golden")
    other.stdout.fnmatch_lines([f"*the golden was made from input set {golden.fingerprint} (seed 0); this run's "
                                f"input set is * (seed 5)", "*fix: run with --mnn-seed 0, or regenerate: *"])
    scores = pytester.path / "goldens" / "multi_io.mnn.golden" / "scores.npy"
    np.save(scores, np.load(scores) * 2)
    damaged = pytester.runpytest(*BASE, "--mnn-model", "multi_io.mnn", "-k", "golden")
    damaged.assert_outcomes(failed=1)
    damaged.stdout.fnmatch_lines(["*scores.npy: does not match the sha256 in golden.json*"])


def test_goldens_under_xdist_each_worker_writes_its_own_models(pytester, models, monkeypatch):
    pytest.importorskip("xdist")
    # The subprocess must import this checkout's plugin, as the in-process runs do (a relative
    # PYTHONPATH would not resolve from the pytester directory).
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    models("demo/lama_like.mnn", "multi_io.mnn", "deep/deep_fp32.mnn")
    args = [*BASE, "--mnn-model", "lama_like.mnn", "--mnn-model", "multi_io.mnn", "--mnn-model", "deep_fp32.mnn",
            "-n", "2"]
    written = pytester.runpytest_subprocess(*args, "--mnn-update-golden")
    written.assert_outcomes(passed=6)
    written.stdout.fnmatch_lines(["goldens in goldens: 3 written"])
    for name in ("lama_like.mnn", "multi_io.mnn", "deep_fp32.mnn"):
        golden = read_golden(pytester.path / "goldens" / f"{name}.golden")
        assert golden is not None and golden.arrays()
    checked = pytester.runpytest_subprocess(*args, "--mnn-report", "r.json")
    checked.assert_outcomes(passed=6)
    goldens = [r for r in read_report(pytester.path / "r.json")["results"] if r["nodeid"].endswith("::golden")]
    assert len(goldens) == 3 and all(r["category"] == "ok" for r in goldens)


def test_committed_goldens_match_this_mnn():
    from pytest_mnn_parity.regression.golden import check_golden
    from pytest_mnn_parity.engine.engine import ParityEngine

    engine = ParityEngine()
    for label in ("fixtures/demo/lama_like.mnn", "fixtures/multi_io.mnn"):
        result = check_golden(engine, FIXTURES.parent / label, FIXTURES / "goldens", label)
        assert result.passed, result.message
        assert result.reference_label == "golden" and result.tolerance.tier == "fp32"


@given(label=st.lists(st.sampled_from(["..", ".", "models", "a b", "x.mnn", "ü"]), min_size=1, max_size=5),
       variant=st.sampled_from([None, "fp16"]))
def test_golden_folders_stay_inside_the_directory_and_are_never_models(tmp_path_factory, label, variant):
    root = tmp_path_factory.getbasetemp() / "goldens"
    folder = golden_folder(root, "/".join(label) + "/m.mnn", variant)
    assert root in folder.parents
    assert ".." not in folder.relative_to(root).parts
    assert folder.name.endswith(".golden") and PurePosixPath(folder.name).suffix != ".mnn"


@settings(max_examples=30, deadline=None)
@given(names=st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=4, unique=True),
       dtype=st.sampled_from(["float32", "int32", "float64"]),
       shape=st.lists(st.integers(1, 5), min_size=1, max_size=3))
def test_written_goldens_read_back_bit_exactly_with_their_summary(tmp_path_factory, names, dtype, shape):
    folder = tmp_path_factory.mktemp("g") / "m.mnn.golden"
    rng = np.random.default_rng(len(names))
    outputs = {n: (rng.standard_normal(shape) * 10).astype(dtype) for n in names}
    write_golden(folder, {"input_set": {"seed": 0, "fingerprint": "0"}}, outputs)
    golden = read_golden(folder)
    arrays = golden.arrays()
    assert list(arrays) == names and len({m["file"] for m in golden.data["outputs"].values()}) == len(names)
    for n in names:
        assert np.array_equal(arrays[n], outputs[n]) and arrays[n].dtype == outputs[n].dtype
        s = golden.data["outputs"][n]
        assert s == {"file": s["file"], **summary(outputs[n])}
        assert s["min"] <= s["mean"] <= s["max"]
    # Writing fewer outputs removes the others' files.
    write_golden(folder, {"input_set": {"seed": 0, "fingerprint": "0"}}, {names[0]: outputs[names[0]]})
    assert len(list(folder.glob("*.npy"))) == 1
