"""The run's first isolated worker starts at the beginning of pytest's configure, before the plugin imports the
engine, and the run takes it over (``isolation/early.py``, issue 22's timeline); a CPU-only run starts no other
worker.  Process counts and order come from the run's own timeline (``MNN_PARITY_TIMELINE``): every process of the
run appends its marks there, in the order they happen in that process."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest

from pytest_mnn_parity.core.files import json_safe
from pytest_mnn_parity.core.timeline import TIMELINE_ENV
from pytest_mnn_parity.engine.results import ParitySettings
from pytest_mnn_parity.isolation import early
from pytest_mnn_parity.isolation.engine import IsolatedEngine
from pytest_mnn_parity.mnn.runner import RunConfig

from conftest import COLLAPSE, DEMO, FIXTURES, cpu_wheel_only, read_report, results_by_nodeid


def timeline(path) -> list[tuple[int, str]]:
    lines = [line.split(" ", 2) for line in path.read_text().splitlines()]
    return [(int(pid), label) for _, pid, label in lines]


@cpu_wheel_only
def test_a_cpu_only_run_starts_one_worker_early_and_runs_every_check_in_it(pytester, models, monkeypatch, tmp_path):
    """On the CPU wheel every GPU item is skipped: the run's one interpreter is the early worker (on a GPU build
    each available GPU backend has workers of its own, tests/test_gpu.py)."""
    models("demo/lama_like.mnn")
    log = tmp_path / "timeline.txt"
    monkeypatch.setenv(TIMELINE_ENV, str(log))
    result = pytester.runpytest_subprocess("--mnn-only", "--mnn-model", "lama_like.mnn", "--mnn-report", "r.json",
                                           "-p", "no:xdist")
    result.assert_outcomes(passed=4, skipped=24)
    marks = timeline(log)
    started = [label.split()[-1] for _, label in marks if label.startswith(("early worker started", "worker started"))]
    taken = [label.split()[-1] for _, label in marks if label.startswith("worker taken over")]
    # One interpreter for the whole run: no per-model worker for the GPU items this build skips.
    assert len(started) == 1 and started[0].isdigit(), marks
    assert [label for _, label in marks if label.startswith("early worker started")], marks
    assert taken == started
    assert len({pid for pid, label in marks if label == "worker main"}) == 1
    ran = {r["worker"]["pid"] for r in results_by_nodeid(read_report(pytester.path / "r.json")).values()
           if r["outcome"] == "passed"}
    assert ran == {int(started[0])}


@pytest.mark.parametrize("isolate, starts", [("never", False), ("auto", True)])
def test_no_worker_starts_early_where_the_run_starts_none(pytester, models, monkeypatch, tmp_path, isolate, starts):
    models("demo/lama_like.mnn")
    log = tmp_path / "timeline.txt"
    monkeypatch.setenv(TIMELINE_ENV, str(log))
    result = pytester.runpytest_subprocess("--mnn-only", "--mnn-model", "lama_like.mnn", "--mnn-backends", "CPU",
                                           "--mnn-precisions", "high", f"--mnn-isolate={isolate}", "-p", "no:xdist")
    result.assert_outcomes(passed=1)
    labels = [label for _, label in timeline(log)] if log.exists() else []
    assert any(label.startswith("early worker started") for label in labels) is starts


@pytest.mark.parametrize("args, addopts, starts", [
    (["--mnn-only", "--mnn-model", "m.mnn"], "", True),
    (["--mnn-model=m.mnn", "-q", "--mnn-isolate", "always"], "", True),
    (["-q", "tests"], "", False),  # no model: most runs of a repository's own tests
    (["--mnn-model", "m.mnn", "-n", "2"], "", False),  # pytest-xdist's controller starts none
    (["--mnn-model", "m.mnn", "-nauto"], "", False),
    (["--mnn-model", "m.mnn"], "-n 4", False),
    (["--mnn-model", "m.mnn", "--mnn-isolate", "never"], "", False),
    (["--mnn-model", "m.mnn", "--mnn-isolate=never"], "", False),
    (["--mnn-model", "m.mnn", "--help"], "", False),
    (["--", "--mnn-model", "m.mnn"], "", False),
])
def test_the_command_line_alone_says_when_to_start_the_worker_at_the_plugins_import(args, addopts, starts):
    assert early.command_line_starts_a_worker(args, addopts) is starts


def test_a_worker_started_from_the_command_line_is_killed_when_the_ini_says_never(pytester, models, monkeypatch,
                                                                                    tmp_path):
    """The plugin's import sees only words; the ini's ``mnn_isolate = never`` is read at configure, which kills
    the worker started for nothing (the run checks in-process, and leaves no process behind)."""
    models("demo/lama_like.mnn")
    pytester.makeini("[pytest]\nmnn_isolate = never\n")
    log = tmp_path / "timeline.txt"
    monkeypatch.setenv(TIMELINE_ENV, str(log))
    result = pytester.runpytest_subprocess("--mnn-only", "--mnn-model", "lama_like.mnn", "--mnn-backends", "CPU",
                                           "--mnn-precisions", "high", "-p", "no:xdist")
    result.assert_outcomes(passed=1)
    labels = [label for _, label in timeline(log)]
    started = [label.split()[-1] for label in labels if label.startswith("early worker started")]
    assert len(started) == 1 and not any(label.startswith("worker taken over") for label in labels), labels
    with pytest.raises(ProcessLookupError):
        os.kill(int(started[0]), 0)


def test_an_early_worker_nothing_takes_over_is_killed():
    early.start_early()
    proc = early.current().proc
    early.discard_early()
    assert proc.poll() is not None  # reaped: no orphan, no zombie
    assert early.current() is None


def test_an_early_worker_started_in_another_environment_is_not_taken_over(monkeypatch):
    early.start_early()
    proc = early.current().proc
    monkeypatch.setenv("MNN_PARITY_SET_AFTER_THE_EARLY_WORKER", "1")  # e.g. a conftest's pytest_configure
    engine = IsolatedEngine(ParitySettings(), timeout=120, worker_per_model=False)
    try:
        assert proc.poll() is not None and early.current() is None
        assert engine.check(DEMO, RunConfig("CPU", "high")).passed
        assert engine.worker_pid(DEMO) != proc.pid
    finally:
        engine.close()


# Every kind of model the fixtures hold that a CPU check takes, against itself: the healthy demo, a deep stack, an
# activation beyond fp16, an LSTM (control flow), several inputs and outputs, a degenerate reference; and fp16
# collapses against their fp32 builds (failure categories).
SELF = [DEMO, FIXTURES / "deep" / "deep_fp32.mnn", FIXTURES / "risk" / "overflow_activation.mnn",
        FIXTURES / "control_flow" / "lstm_origin.mnn", FIXTURES / "multi_io.mnn", COLLAPSE / "constant.fp16.mnn"]
GROUPS = [(None, SELF)] + [(COLLAPSE / f"{name}.mnn", [COLLAPSE / f"{name}.fp16.mnn"])
                           for name in ("zero", "partial_zero", "non_finite")]
CONFIGS = [RunConfig("CPU", p) for p in ("normal", "high", "low", "Low_BF16")]


def _comparable(result) -> str:
    data = dataclasses.asdict(result)
    for key in ("seconds", "worker", "log"):  # when and where it ran, not what it found
        data.pop(key, None)
    return json.dumps(json_safe(data), sort_keys=True)  # NaN metrics compare equal as text


def test_the_early_worker_gives_the_results_of_a_worker_started_when_needed():
    """The same checks of every fixture kind in a worker started early (taken over) and in one started by the
    engine itself: the same results, field by field, timings and pids aside."""
    results = {"early": [], "late": []}
    for how in results:
        for reference, models in GROUPS:
            if how == "early":
                early.start_early()
                pid = early.current().proc.pid
            settings = ParitySettings(reference=None if reference is None else str(reference))
            engine = IsolatedEngine(settings, timeout=300, worker_per_model=False)
            try:
                results[how] += [_comparable(engine.check(model, config)) for model in models for config in CONFIGS]
                assert engine.worker_pid(models[0]) == (pid if how == "early" else engine.worker_pid(models[0]))
            finally:
                engine.close()
    assert results["early"] == results["late"]
    categories = {json.loads(r)["category"] for r in results["late"]}
    assert "ok" in categories and len(categories) > 2, categories  # failures of several kinds, not only passes
