"""What isolated workers reuse from the parent instead of measuring again in every worker."""
from __future__ import annotations

import pytest

from pytest_mnn_parity import backends
from pytest_mnn_parity.mnn import arithmetic as mnn_arithmetic
from pytest_mnn_parity.isolation.engine import IsolatedEngine
from pytest_mnn_parity.engine.engine import ParityEngine
from pytest_mnn_parity.engine.results import ParitySettings
from pytest_mnn_parity.report.records import record
from pytest_mnn_parity.mnn.runner import RunConfig
from pytest_mnn_parity.core.verdict import Category
from pytest_mnn_parity.isolation.worker import FAULT_INJECTION_ENV

from conftest import COLLAPSE, DEMO, FIXTURES, read_report, results_by_nodeid


def test_a_configurations_arithmetic_is_measured_once_per_run_not_once_per_worker(monkeypatch):
    """Each arithmetic probe creates sessions on the backend (seconds per GPU configuration, per process).
    A worker reuses what the parent knows; what a worker measured is remembered by the parent."""
    cache: dict = {}
    monkeypatch.setattr(mnn_arithmetic, "_ARITH_CACHE", cache)
    engine = IsolatedEngine(ParitySettings(), prespawn=False)
    try:
        first = engine.check(DEMO, RunConfig("CPU", "low"))
        assert first.category is Category.OK and first.worker is not None
        measured = cache[("CPU", "low")]
        assert measured == first.arithmetic and measured.kind == "fp32"
        # A marker the worker could not have measured itself shows that the next worker reused it.
        cache[("CPU", "low")] = mnn_arithmetic.Arithmetic("fp32", dict(measured.errors), "MARKER: known to the parent")
        second = engine.check(COLLAPSE / "healthy.mnn", RunConfig("CPU", "low"))
        assert second.worker["pid"] != first.worker["pid"]
        assert second.arithmetic.note == "MARKER: known to the parent"
    finally:
        engine.close()


def test_worker_scope_run_keeps_one_worker_for_every_model_and_model_gives_each_its_own(pytester, models):
    models("collapse/healthy.mnn", "demo/lama_like.mnn")
    pids = {}
    for scope in ("model", "run"):
        args = ["--mnn-only", "--mnn-backends", "CPU", "--mnn-precisions", "high,low", "--mnn-isolate", "always",
                "--mnn-model", "healthy.mnn", "--mnn-model", "lama_like.mnn", "--mnn-report", f"{scope}.json"]
        if scope == "run":
            args += ["--mnn-worker-scope", "run"]
        pytester.runpytest(*args).assert_outcomes(passed=4)
        report = read_report(pytester.path / f"{scope}.json")
        assert report["settings"]["worker_scope"] == scope
        pids[scope] = {r["nodeid"].split("::")[0]: r["worker"]["pid"] for r in report["results"]}
    assert pids["model"]["healthy.mnn"] != pids["model"]["lama_like.mnn"]
    assert pids["run"]["healthy.mnn"] == pids["run"]["lama_like.mnn"]


def test_a_crash_in_a_run_scoped_worker_costs_one_item_and_the_next_model_gets_a_fresh_worker(pytester, models,
                                                                                              monkeypatch):
    models("collapse/healthy.mnn", "demo/lama_like.mnn")
    monkeypatch.setenv(FAULT_INJECTION_ENV, "SIGSEGV:CPU-low")
    result = pytester.runpytest("--mnn-only", "--mnn-backends", "CPU", "--mnn-precisions", "high,low",
                                "--mnn-isolate", "always", "--mnn-worker-scope", "run", "--mnn-model", "healthy.mnn",
                                "--mnn-model", "lama_like.mnn", "--mnn-report", "r.json")
    result.assert_outcomes(passed=2, failed=2)  # CPU-low crashes in each model; CPU-high passes in each
    by_id = results_by_nodeid(read_report(pytester.path / "r.json"))
    first, crash = by_id["healthy.mnn::parity[CPU-high]"], by_id["healthy.mnn::parity[CPU-low]"]
    after = by_id["lama_like.mnn::parity[CPU-high]"]
    assert crash["category"] == "crashed" and crash["worker"]["pid"] == first["worker"]["pid"]
    assert after["category"] == "ok" and after["worker"]["pid"] != crash["worker"]["pid"]


def test_a_bad_worker_scope_is_a_usage_error(pytester):
    result = pytester.runpytest("--mnn-only", "--mnn-model", "x.mnn", "--mnn-worker-scope", "session")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--mnn-worker-scope*expected one of model, run, got 'session'*"])


def test_a_trace_with_quick_passed_and_unobservable_tensors_survives_the_worker_protocol():
    """The per-layer trace proves passing tensors with a bound (``quick``) and lists the LSTM loop's unwritten
    tensors as not observable: both must come back from a worker as they are in-process."""
    settings = ParitySettings(layers="always")
    model, config = FIXTURES / "control_flow" / "lstm_origin.mnn", RunConfig("CPU", "low")
    engine = IsolatedEngine(settings, prespawn=False)
    try:
        isolated = engine.check(model, config)
    finally:
        engine.close()
    local = ParityEngine(settings).check(model, config)
    assert local.trace.not_observable and any(t.quick is not None for layer in local.trace.layers
                                              for t in layer.outputs)
    assert isolated.trace.not_observable == local.trace.not_observable
    a, b = record("n", isolated, "passed"), record("n", local, "passed")
    for key in set(a) | set(b):
        if key not in ("seconds", "worker"):
            assert a[key] == b[key], key


@pytest.mark.parametrize("cores, cuda, workers", [(8, True, 2), (8, False, 1), (2, True, 1)])
def test_auto_starts_a_kept_available_gpu_backends_worker_beside_the_cpu_one(monkeypatch, cores, cuda, workers):
    """Discovery kept from an earlier run says CUDA is there: its per-model worker imports while pytest collects
    and the CPU items run, instead of after them; not when the backend is not there, nor on 2 cores."""
    from pytest_mnn_parity.isolation.policy import Isolation

    monkeypatch.setattr(backends, "_CACHE", {"CUDA": backends.BackendStatus("CUDA", cuda, 2 if cuda else None, "kept")})
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)))
    isolation = Isolation(ParityEngine(), "auto", None, ["CPU", "CUDA"])
    try:
        isolation.start()
        started = [engine._spare for engine in (isolation._shared, *isolation._by_backend.values())]
        assert len(started) == workers and all(w is not None and w.alive() for w in started)
        started[-1].wait_ready()  # a real worker, importing MNN
        assert started[-1].hello["ready"]
    finally:
        isolation.close()



def test_each_kept_available_gpu_backend_gets_its_own_worker(monkeypatch):
    """Backends never wait for each other's imports: each available non-CPU backend's worker starts with the
    run, in a process of its own."""
    from pytest_mnn_parity.isolation.policy import Isolation

    kept = {name: backends.BackendStatus(name, True, 2, "kept") for name in ("CUDA", "OPENCL")}
    monkeypatch.setattr(backends, "_CACHE", kept)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    isolation = Isolation(ParityEngine(), "auto", None, ["CPU", "OPENCL", "CUDA", "VULKAN"])
    try:
        isolation.start()
        engines = isolation._by_backend
        assert sorted(engines) == ["CUDA", "OPENCL"]  # VULKAN: nothing kept says it is there
        spares = [engine._spare for engine in engines.values()] + [isolation.shared._spare]
        assert all(w is not None and w.alive() for w in spares) and len({w.pid for w in spares}) == 3
    finally:
        isolation.close()
    assert all(engine._spare is None for engine in engines.values())
    assert all(not w.alive() for w in spares)


def test_a_worker_closed_without_waiting_exits_by_itself_and_is_reaped():
    """The end of a run (``Isolation.close(wait=False)``): a worker told to exit is not waited for; it ends
    cleanly on its own (exit code 0, not killed) and this process reaps it (no zombie)."""
    import time

    from pytest_mnn_parity.isolation import process

    worker = process.Worker(ParitySettings())
    worker.wait_ready()
    worker.close(wait=False)
    deadline = time.monotonic() + 60
    while process.reap_exiting() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert worker.proc.returncode == 0
    assert worker.proc not in process._EXITING
