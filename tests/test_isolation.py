"""Isolation: real crashes (real signals during real inferences) and real hangs fail one item, not the run."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from pytest_mnn_parity import backends
from pytest_mnn_parity.isolation.engine import IsolatedEngine
from pytest_mnn_parity.engine.engine import ParityEngine
from pytest_mnn_parity.engine.results import ParitySettings
from pytest_mnn_parity.isolation.policy import Isolation, isolated_backends
from pytest_mnn_parity.report.records import record
from pytest_mnn_parity.mnn.runner import RunConfig
from pytest_mnn_parity.core.verdict import CATEGORY_ORDER, Category
from pytest_mnn_parity.isolation.worker import FAULT_INJECTION_ENV

from conftest import COLLAPSE, DEMO, FIXTURES, read_report, results_by_nodeid

SLOW = FIXTURES / "slow" / "matmul_chain.mnn"


def test_crashed_and_timeout_rank_right_after_backend_fallback():
    index = CATEGORY_ORDER.index(Category.BACKEND_FALLBACK)
    assert CATEGORY_ORDER[index + 1:index + 3] == [Category.CRASHED, Category.TIMEOUT]


def test_auto_isolates_every_backend_and_the_cpu_in_one_run_scoped_worker():
    names = ["CPU", "OPENCL", "VULKAN"]
    assert isolated_backends("auto", names, None) == set(names)
    assert isolated_backends("auto", names, 5.0) == set(names)
    assert isolated_backends("always", names, None) == set(names)
    assert isolated_backends("never", names, 5.0) == set()
    auto, always = (Isolation(ParityEngine(), mode, None, names) for mode in ("auto", "always"))
    # Workers started per model are what expect_models counts: under auto, the CPU's one worker is not.
    assert [auto.per_model(n) for n in names] == [False, True, True]
    assert [always.per_model(n) for n in names] == [True, True, True]
    for isolation in (auto, always):
        isolation.close()


def test_sigsegv_in_a_worker_fails_that_item_and_the_next_configuration_gets_a_fresh_worker(pytester, models,
                                                                                          monkeypatch):
    """The worker sends itself a real SIGSEGV right before CPU-low's session run, and before probing OPENCL."""
    models("demo/lama_like.mnn")
    monkeypatch.setenv(FAULT_INJECTION_ENV, "SIGSEGV:CPU-low,SIGSEGV:probe-OPENCL")
    monkeypatch.setattr(backends, "_CACHE", {})  # probe OPENCL again, in this run's worker
    result = pytester.runpytest("--mnn-only", "--mnn-backends", "CPU,OPENCL", "--mnn-model", "lama_like.mnn",
                                "--mnn-isolate", "--mnn-report", "r.json")
    result.assert_outcomes(passed=3, failed=5)
    text = result.stdout.str()
    assert "crashed on CPU-low: the isolated worker (pid " in text
    assert "died (SIGSEGV, Segmentation fault)" in text
    assert "Fatal Python error: Segmentation fault" in text  # faulthandler's stack, from the worker's stderr
    assert "TEST FAULT INJECTION: SIGSEGV before running CPU-low" in text
    assert "reproduce: pytest --mnn-only --mnn-model lama_like.mnn --mnn-backends CPU --mnn-precisions low" in text
    assert "--mnn-isolate=always" in text
    # A backend whose probe crashes is a failure of each of its configurations, not a skip.
    assert "crashed on OPENCL-high: probing backend OPENCL in an isolated worker (pid " in text
    assert "killed it (SIGSEGV, Segmentation fault)" in text
    by_id = results_by_nodeid(read_report(pytester.path / "r.json"))
    crashed = by_id["lama_like.mnn::parity[CPU-low]"]
    assert (crashed["outcome"], crashed["category"]) == ("failed", "crashed")
    assert crashed["fault"]["signal"] == "SIGSEGV" and crashed["fault"]["returncode"] == -signal.SIGSEGV
    workers = {p: by_id[f"lama_like.mnn::parity[CPU-{p}]"]["worker"] for p in ("normal", "high", "Low_BF16")}
    # One worker per model, kept across configurations; after the crash a fresh one.
    assert workers["normal"]["pid"] == workers["high"]["pid"] == crashed["worker"]["pid"]
    assert [workers["normal"]["index"], workers["high"]["index"], crashed["worker"]["index"]] == [1, 2, 3]
    assert workers["Low_BF16"]["pid"] != crashed["worker"]["pid"] and workers["Low_BF16"]["index"] == 1
    assert by_id["lama_like.mnn::parity[CPU-Low_BF16]"]["category"] == "ok"
    opencl = by_id["lama_like.mnn::parity[OPENCL-high]"]
    assert (opencl["outcome"], opencl["category"], opencl["fault"]["backend"]) == ("failed", "crashed", "OPENCL")


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _kill_during_inference(engine: IsolatedEngine, model, signum: int, sent: list) -> None:
    """Wait until the worker has started this configuration and computed for 0.3 s, then signal it."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        worker = engine._workers.get(model.resolve())
        if worker is not None and "configuration #1" in worker.stderr_tail():
            start = _cpu_seconds(worker.pid)
            while _cpu_seconds(worker.pid) - start < 0.3:
                time.sleep(0.02)
            os.kill(worker.pid, signum)
            sent.append(worker.pid)
            return
        time.sleep(0.02)


def test_a_real_sigsegv_sent_during_a_real_inference_is_a_crashed_result_and_the_engine_goes_on():
    engine = IsolatedEngine(ParitySettings(), timeout=120)
    sent: list[int] = []
    try:
        killer = threading.Thread(target=_kill_during_inference, args=(engine, SLOW, signal.SIGSEGV, sent))
        killer.start()
        result = engine.check(SLOW, RunConfig("CPU", "high"), reproduce="pytest again")
        killer.join()
        assert sent and result.category is Category.CRASHED, result.message
        assert result.fault["signal"] == "SIGSEGV" and result.fault["pid"] == sent[0]
        assert result.message.startswith(f"crashed on CPU-high: the isolated worker (pid {sent[0]})")
        # faulthandler shows where it was: inside the session run of the reference.
        assert "runner.py" in result.message and "in run" in result.message
        assert "reproduce: pytest again" in result.message
        healthy = engine.check(DEMO, RunConfig("CPU", "high"))
        assert healthy.category is Category.OK and healthy.worker["pid"] != sent[0]
    finally:
        engine.close()


def test_a_worker_that_writes_garbage_on_its_channel_is_killed_and_reported(monkeypatch):
    monkeypatch.setenv(FAULT_INJECTION_ENV, "GARBAGE:CPU-low")
    engine = IsolatedEngine(ParitySettings(), prespawn=False)
    try:
        result = engine.check(DEMO, RunConfig("CPU", "low"))
        assert result.category is Category.CRASHED
        assert "wrote an unreadable answer (b'\\xff\\xfe not a protocol line'" in result.message
        assert engine.check(DEMO, RunConfig("CPU", "high")).category is Category.OK
    finally:
        engine.close()


def test_a_slow_model_times_out_and_a_healthy_model_in_the_same_run_passes(pytester, models):
    models("slow/matmul_chain.mnn", "demo/lama_like.mnn")
    started = time.monotonic()
    result = pytester.runpytest("--mnn-only", "--mnn-backends", "CPU", "--mnn-precisions", "high",
                                "--mnn-model", "matmul_chain.mnn", "--mnn-model", "lama_like.mnn",
                                "--mnn-timeout", "1", "--mnn-report", "r.json")
    elapsed = time.monotonic() - started
    result.assert_outcomes(passed=1, failed=1)
    text = result.stdout.str()
    assert "timeout on CPU-high: the configuration did not finish within 1 s (--mnn-timeout); its isolated worker" in text
    assert "runner.py" in text  # the stack it was killed in (SIGUSR1 to faulthandler before SIGKILL)
    assert "--mnn-timeout 1" in text  # in the reproduce command
    # One inference of the slow model alone takes about a second, a full check several: it was cut short.
    assert elapsed < 20
    by_id = results_by_nodeid(read_report(pytester.path / "r.json"))
    slow = by_id["matmul_chain.mnn::parity[CPU-high]"]
    assert slow["category"] == "timeout" and slow["fault"]["kind"] == "timeout"
    assert slow["fault"]["signal"] == "SIGKILL" and slow["fault"]["seconds"] >= 1.0
    assert by_id["lama_like.mnn::parity[CPU-high]"]["category"] == "ok"


def test_isolated_results_are_the_in_process_results():
    """Verdict, metrics, layer trace, fp16 risks and message survive the trip through the worker protocol."""
    settings = ParitySettings(reference=str(COLLAPSE / "zero.mnn"))
    model, config = COLLAPSE / "zero.fp16.mnn", RunConfig("CPU", "low")
    engine = IsolatedEngine(settings, prespawn=False)
    try:
        isolated = engine.check(model, config, [("ini", {"rtol": 0.01})], reproduce="pytest x")
    finally:
        engine.close()
    local = ParityEngine(settings).check(model, config, [("ini", {"rtol": 0.01})], reproduce="pytest x")
    assert isolated.category is Category.ZERO_OUTPUT and isolated.trace is not None and isolated.fp16_risks
    a, b = record("n", isolated, "failed"), record("n", local, "failed")
    assert a["worker"] is not None and b["worker"] is None
    for key in set(a) | set(b):
        if key not in ("seconds", "worker"):
            assert a[key] == b[key], key


def test_isolated_onnx_results_keep_their_onnx_localisation():
    """An ONNX model's trace is localised against ONNX (a TraceResult subclass): it survives the trip too."""
    model, config = FIXTURES / "onnx" / "fused_conv_relu.onnx", RunConfig("CPU", "high")
    engine = IsolatedEngine(ParitySettings(), prespawn=False)
    try:
        isolated = engine.check(model, config, variant="fp16", reproduce="pytest x")
    finally:
        engine.close()
    local = ParityEngine().check(model, config, variant="fp16", reproduce="pytest x")
    assert isolated.category is Category.ZERO_OUTPUT and isolated.first_divergent_layer["name"] == "tiny_conv"
    assert type(isolated.trace) is type(local.trace) and isolated.trace.first_divergent.name == "tiny_conv"
    a, b = record("n", isolated, "failed"), record("n", local, "failed")
    for key in set(a) | set(b):
        if key not in ("seconds", "worker", "message"):  # the message names each engine's conversion folder
            assert a[key] == b[key], key
    assert a["message"].splitlines()[0] == b["message"].splitlines()[0]


def test_default_cpu_configurations_share_one_warm_worker(pytester, models):
    """auto: CPU work runs in a worker too (an MNN abort must not end the run), one for every model of the run."""
    models("collapse/healthy.mnn", "multi_io.mnn")
    pytester.runpytest("--mnn-only", "--mnn-backends", "CPU", "--mnn-precisions", "high,low", "--mnn-model",
                       "healthy.mnn", "--mnn-model", "multi_io.mnn", "--mnn-report", "r.json").assert_outcomes(passed=4)
    report = read_report(pytester.path / "r.json")
    assert report["settings"]["isolate"] == "auto"
    workers = [r["worker"] for r in report["results"]]
    assert all(w is not None for w in workers) and len({w["pid"] for w in workers}) == 1
    assert [w["index"] for w in workers] == [1, 2, 3, 4]


def test_without_isolation_a_timeout_is_judged_after_the_configuration_returns():
    isolation = Isolation(ParityEngine(), "never", 1e-6, ["CPU"])
    result = isolation.check(FIXTURES / "collapse" / "healthy.mnn", RunConfig("CPU", "high"), reproduce="pytest y")
    assert result.category is Category.TIMEOUT and result.worker is None
    assert result.fault["in_process"] is True and result.fault["verdict"] == "ok"
    assert "could not be stopped, only judged when it returned; its own verdict was ok" in result.message
    assert result.message.endswith("reproduce: pytest y")


@pytest.mark.parametrize("value", ["sometimes", "tests/"])
def test_a_bad_isolate_mode_is_a_usage_error(pytester, value):
    result = pytester.runpytest("--mnn-only", "--mnn-model", "x.mnn", f"--mnn-isolate={value}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert f"--mnn-isolate: expected one of auto, always, never, got {value!r}" in result.stderr.str()
