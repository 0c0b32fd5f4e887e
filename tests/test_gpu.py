"""Real GPU backends (OpenCL, Vulkan, CUDA): run on a machine whose MNN build has them.

Every test skips, with the reason, where the backend is not really there (the
registry's wheel on CI falls back to the CPU for all of them). On the lent H100
with the GPU build (see docs/gpu.md) they all run.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import numpy as np
import pytest

from pytest_mnn_parity import ParityEngine, ParitySettings, RunConfig, backends
from pytest_mnn_parity.mnn import arithmetic as mnn_arithmetic
from pytest_mnn_parity.isolation.engine import IsolatedEngine
from pytest_mnn_parity.report.records import record
from pytest_mnn_parity.mnn.runner import LoadedModel
from pytest_mnn_parity.core.verdict import Category
from pytest_mnn_parity.isolation.worker import FAULT_INJECTION_ENV

from conftest import COLLAPSE, DEMO, FIXTURES, read_report, require_backend, required_gpus, results_by_nodeid

pytestmark = pytest.mark.gpu
GPU_BACKENDS = ["OPENCL", "VULKAN", "CUDA"]


def require(backend: str) -> None:
    # Fails instead of skipping for the backends MNN_PARITY_REQUIRE_GPU names (the device run sets it).
    require_backend(backend)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_demo_passes_at_high_precision_and_really_ran_on_the_gpu(backend):
    require(backend)
    result = ParityEngine().check(DEMO, RunConfig(backend, "high"))
    assert result.category is Category.OK, result.message
    assert result.backend_used == backend
    assert result.forward_type == backends.FORWARD_TYPES[backend]
    assert result.arithmetic.kind == "fp32"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_many_models_in_one_process_never_fall_back_silently(backend):
    """MNN's Vulkan stopped creating devices after ~10 models' sessions; shared runtimes avoid it."""
    require(backend)
    engine = ParityEngine()
    paths = sorted(COLLAPSE.glob("*.mnn")) + [DEMO, FIXTURES / "deep" / "deep_fp32.mnn", FIXTURES / "multi_io.mnn"]
    assert len(paths) >= 15
    for path in paths:
        for precision in ("high", "low"):
            result = engine.check(path, RunConfig(backend, precision))
            assert result.category is not Category.BACKEND_FALLBACK, result.message
            assert result.backend_used == backend
        engine.release(path)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_trace_reads_device_tensors_and_matches_op_names_with_the_cpu(backend):
    require(backend)
    engine = ParityEngine(ParitySettings(reference=str(COLLAPSE / "zero.mnn"), layers="always"))
    result = engine.check(COLLAPSE / "zero.fp16.mnn", RunConfig(backend, "high"))
    assert result.category is Category.ZERO_OUTPUT, result.message
    assert result.first_divergent_layer["name"] == "tiny_conv"
    assert not result.trace.unmatched_target and not result.trace.unmatched_reference
    healthy = ParityEngine(ParitySettings(layers="always")).check(DEMO, RunConfig(backend, "high"))
    assert healthy.trace.compared >= 20 and not any(layer.failed for layer in healthy.trace.layers)


def test_precision_means_what_each_backend_computes():
    """Measured on the H100 (docs/gpu.md): OpenCL has no fp16 there; Vulkan uses fp16 below high."""
    arith = {}
    for backend in GPU_BACKENDS:
        if backend in required_gpus():
            require_backend(backend)
        if backends.discover([backend])[backend].available:
            arith[backend] = {p: mnn_arithmetic.probe_arithmetic(backend, p).kind for p in ("high", "normal", "low")}
    if not arith:
        pytest.skip("no GPU backend in this MNN build")
    for backend, kinds in arith.items():
        assert kinds["high"] == "fp32", (backend, kinds)
    if "VULKAN" in arith:
        assert arith["VULKAN"]["normal"] == arith["VULKAN"]["low"] == "fp16"
    if "OPENCL" in arith and "NVIDIA" in _gpu_name():
        assert set(arith["OPENCL"].values()) == {"fp32"}


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_kernel_probes_and_the_tier_of_a_depthwise_model_follow_what_the_gpu_measured(backend):
    """Issue 20's residue: CUDA 'high' read fp32 on the elementwise probes while its depthwise convolution moved
    1000x the CPU's error. Whatever the kernel probes find here, it must be self-consistent: every kernel measured,
    the kernels named are what the classifier says of the recorded errors, and a model running a reduced kernel
    gets that kernel's tier with the reason while a model without it keeps the elementwise tier; both healthy
    models pass. The findings go to $OUT/kernel_probes.json (every precision) for docs/verdicts.md."""
    from pytest_mnn_parity.core.tolerances import resolve
    from pytest_mnn_parity.mnn.weights import op_types

    require(backend)
    found = {p: mnn_arithmetic.probe_arithmetic(backend, p) for p in backends.PRECISIONS}
    if os.environ.get("OUT"):
        path = os.path.join(os.environ["OUT"], "kernel_probes.json")
        kept = json.load(open(path)) if os.path.exists(path) else {}
        kept[backend] = {p: {"kind": a.kind, "kernels": a.kernels, "errors": a.errors, "note": a.note}
                         for p, a in found.items()}
        with open(path, "w") as f:
            json.dump(kept, f, indent=1)
    for precision, arith in found.items():
        print(f"{backend}-{precision}: {arith.describe()}")
        if arith.kind in ("fp32", "fp16", "bf16"):
            assert set(mnn_arithmetic.KERNEL_PROBES) <= set(arith.errors), f"kernel probes did not run: {arith.note}"
        assert mnn_arithmetic.classify_arithmetic(arith.errors).kernels == arith.kernels
    arith = found["high"]
    engine = ParityEngine()
    for path in (FIXTURES / "depthwise" / "mobile_block.mnn", FIXTURES / "deep" / "deep_fp32.mnn"):
        result = engine.check(path, RunConfig(backend, "high"))
        _assert_ran_on(result, backend)
        assert result.category is Category.OK, result.message
        kernels = mnn_arithmetic.model_kernels(arith, op_types(path))
        expected = resolve(backend, "high", arithmetic=arith.kind, kernels=kernels)
        assert (result.tolerance.tier, result.tolerance.tier_reason) == (expected.tier, expected.tier_reason)
        if "depthwise" in arith.kernels and "ConvolutionDepthwise" in op_types(path):
            assert result.tolerance.tier == arith.kernels["depthwise"]
            assert "depthwise convolution (ConvolutionDepthwise) rounds like" in result.tolerance.tier_reason
        if not kernels:
            assert result.tolerance.tier_reason == ""


def _gpu_name() -> str:
    import subprocess

    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


@pytest.mark.parametrize("backend", ["VULKAN", "CUDA"])
def test_fp16_overflow_of_a_model_healthy_in_fp32_is_caught_at_low_precision(backend):
    """overflow_activation passes on every fp32 path but its 1e6 activation overflows real fp16."""
    require(backend)
    if mnn_arithmetic.probe_arithmetic(backend, "low").kind != "fp16":
        pytest.skip(f"{backend} low does not compute in fp16 here")
    engine = ParityEngine()
    path = FIXTURES / "risk" / "overflow_activation.mnn"
    assert engine.check(path, RunConfig(backend, "high")).category is Category.OK
    low = engine.check(path, RunConfig(backend, "low"))
    assert low.category is Category.NON_FINITE, low.message
    assert any(r.layer == "scale_up" and r.kind == "overflow" for r in low.fp16_risks)
    # Examined, not assumed: the raw output really holds Inf/NaN.
    model = LoadedModel(path)
    raw = model.run(RunConfig(backend, "low"), engine.inputs(engine.model(path))[0]).outputs["out"]
    assert not np.all(np.isfinite(raw))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_fp16_conversion_collapse_fails_the_same_way_on_every_backend(backend):
    require(backend)
    for name, category in (("zero", Category.ZERO_OUTPUT), ("partial_zero", Category.PARTIAL_ZERO)):
        engine = ParityEngine(ParitySettings(reference=str(COLLAPSE / f"{name}.mnn")))
        result = engine.check(COLLAPSE / f"{name}.fp16.mnn", RunConfig(backend, "high"))
        assert result.category is category, result.message
        assert result.first_divergent_layer["name"] == "tiny_conv"


# -- crash and hang isolation on real GPU backends ----------------------------------------------------------------
# The default (--mnn-isolate auto) runs every GPU configuration in a worker process.  These tests put real faults
# into workers that hold live GPU contexts (CUDA context, Vulkan device, OpenCL queue) and check three things the
# CPU tests cannot: the fault costs one item, the stack says where in the GPU work it struck, and the GPU still
# serves the next, fresh worker (a killed process must not leave the device unusable).

def _isolated_engine(**kwargs):
    return IsolatedEngine(ParitySettings(), prespawn=False, **kwargs)


def _assert_ran_on(result, backend):
    assert result.category not in (Category.CRASHED, Category.TIMEOUT, Category.BACKEND_FALLBACK), result.message
    assert result.backend_used == backend and result.forward_type == backends.FORWARD_TYPES[backend]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_isolated_gpu_verdicts_are_the_in_process_verdicts(backend):
    """Same verdicts through the worker protocol as in-process; GPU numbers may differ in the last bits between
    processes (OpenCL tunes its kernels per process), so metrics are compared within the tolerance."""
    require(backend)
    cases = [(DEMO, "high", None), (DEMO, "low", None), (FIXTURES / "risk" / "overflow_activation.mnn", "low", None),
             (COLLAPSE / "zero.fp16.mnn", "high", str(COLLAPSE / "zero.mnn"))]
    for path, precision, reference in cases:
        settings = ParitySettings(reference=reference)
        engine = IsolatedEngine(settings, prespawn=False)
        try:
            isolated = engine.check(path, RunConfig(backend, precision))
        finally:
            engine.close()
        local = ParityEngine(settings).check(path, RunConfig(backend, precision))
        a, b = record("n", isolated, "x"), record("n", local, "x")
        assert isolated.worker is not None and local.worker is None
        for key in ("category", "backend_used", "forward_type", "arithmetic", "tolerance"):
            assert a.get(key) == b.get(key), (path.name, precision, key, a.get(key), b.get(key))
        layer_a, layer_b = (r["first_divergent_layer"] or {} for r in (a, b))
        assert [layer_a.get(k) for k in ("index", "name", "type")] == [layer_b.get(k) for k in ("index", "name", "type")]
        assert a["outputs"].keys() == b["outputs"].keys()
        for name, out in a["outputs"].items():
            x, y = out.get("max_abs"), b["outputs"][name].get("max_abs")
            if isinstance(x, float) and isinstance(y, float) and np.isfinite(x) and np.isfinite(y):
                bound = isolated.tolerance.atol * max(1.0, out.get("ref_scale") or 1.0)
                assert abs(x - y) <= bound, (path.name, precision, name, x, y)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_sigsegv_in_a_gpu_worker_fails_one_item_and_the_next_worker_runs_on_the_gpu(pytester, models, monkeypatch,
                                                                                     backend):
    """Plugin end to end, default isolation: a real SIGSEGV in the worker right before the GPU session run of
    BACKEND-normal (the worker already holds that backend's context from BACKEND-high)."""
    require(backend)
    models("demo/lama_like.mnn")
    monkeypatch.setenv(FAULT_INJECTION_ENV, f"SIGSEGV:{backend}-normal")
    result = pytester.runpytest("--mnn-only", "--mnn-backends", backend, "--mnn-precisions", "high,normal,low",
                                "--mnn-model", "lama_like.mnn", "--mnn-report", "r.json")
    text = result.stdout.str()
    assert result.ret == pytest.ExitCode.TESTS_FAILED, text
    assert f"crashed on {backend}-normal: the isolated worker (pid " in text
    assert "died (SIGSEGV, Segmentation fault)" in text and "Fatal Python error: Segmentation fault" in text
    by_id = results_by_nodeid(read_report(pytester.path / "r.json"))
    high, crashed, low = (by_id[f"lama_like.mnn::parity[{backend}-{p}]"] for p in ("high", "normal", "low"))
    assert (crashed["category"], crashed["fault"]["signal"]) == ("crashed", "SIGSEGV")
    for ran in (high, low):
        assert ran["category"] not in ("crashed", "timeout", "backend_fallback"), ran["message"]
        assert ran["backend_used"] == backend and ran["worker"] is not None
    assert high["worker"]["pid"] == crashed["worker"]["pid"] != low["worker"]["pid"]


def _wait_for(engine, model, text: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        worker = engine._workers.get(model.resolve())
        if worker is not None and text in worker.stderr_tail():
            return worker
        time.sleep(0.001)
    raise AssertionError(f"the worker never logged {text!r}")


def _warm_worker_and_time_gpu_work(engine, backend) -> float:
    """Configuration #1 loads the model and computes the CPU reference in the worker; #2 then is GPU work only
    (a runtime and session for a new precision, kernel tuning, inferences): its duration, seen from here, says
    how soon a signal must come to strike inside such work in configuration #3."""
    _assert_ran_on(engine.check(DEMO, RunConfig(backend, "high")), backend)
    started = time.monotonic()
    _assert_ran_on(engine.check(DEMO, RunConfig(backend, "normal")), backend)
    seconds = time.monotonic() - started
    print(f"{backend}: a configuration's GPU work took {seconds * 1e3:.1f} ms in a warm worker")
    if seconds < 0.05:
        pytest.skip(f"{backend}: a configuration's GPU work takes {seconds * 1e3:.1f} ms here, too short to "
                    "interrupt at a chosen point")
    return seconds


def _stack_lines(message: str) -> list[str]:
    """faulthandler's frames, as the failure message quotes them from the worker's stderr."""
    return [line.strip() for line in message.splitlines() if line.strip().startswith('File "')]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_a_real_sigsegv_during_gpu_work_is_one_crashed_result_and_the_gpu_serves_a_fresh_worker(backend):
    """The signal comes from outside (this test), a third into configuration #3's GPU work.

    Configuration #3 can be quicker than #2, whose duration sets the delay (on the H200 under six parallel
    test workers Vulkan's #3 finished before a third of #2 had passed, and passed): a signal that comes too
    late is no test of a crash, so it is tried again, sooner, in a fresh worker."""
    require(backend)
    for attempt, fraction in enumerate((3, 10, 30)):
        engine = _isolated_engine()
        try:
            delay = _warm_worker_and_time_gpu_work(engine, backend) / fraction
            sent: list[int] = []

            def kill():
                worker = _wait_for(engine, DEMO, "configuration #3")
                time.sleep(delay)
                os.kill(worker.pid, signal.SIGSEGV)
                sent.append(worker.pid)

            killer = threading.Thread(target=kill)
            killer.start()
            crashed = engine.check(DEMO, RunConfig(backend, "low"), reproduce="pytest again")
            killer.join()
        except BaseException:
            engine.close()
            raise
        if crashed.category is not Category.OK or attempt == 2:
            break
        print(f"{backend}: the check ended before the signal ({delay * 1e3:.1f} ms): again, sooner")
        engine.close()
    try:
        assert sent and crashed.category is Category.CRASHED, crashed.message
        assert crashed.fault["signal"] == "SIGSEGV" and crashed.fault["pid"] == sent[0]
        assert "Fatal Python error: Segmentation fault" in crashed.message and "reproduce: pytest again" in crashed.message
        stack = _stack_lines(crashed.message)
        print(f"{backend}: SIGSEGV struck in", stack)
        assert any(f in line for f in ("runner.py", "backends.py", "arithmetic.py") for line in stack), crashed.message
        fresh = engine.check(DEMO, RunConfig(backend, "low"))
        _assert_ran_on(fresh, backend)
        assert fresh.worker["pid"] != sent[0] and fresh.worker["index"] == 1
    finally:
        engine.close()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_a_gpu_configuration_past_its_timeout_is_killed_and_the_gpu_serves_a_fresh_worker(backend):
    """A real timeout, a third of the way into configuration #3's GPU work: the worker's stack is dumped
    (SIGUSR1) and it is killed (SIGKILL) while it holds the device."""
    require(backend)
    engine = _isolated_engine()
    try:
        engine.timeout = _warm_worker_and_time_gpu_work(engine, backend) / 3
        timed_out = engine.check(DEMO, RunConfig(backend, "low"))
        assert timed_out.category is Category.TIMEOUT, timed_out.message
        assert timed_out.fault["signal"] == "SIGKILL"
        stack = _stack_lines(timed_out.message)
        print(f"{backend}: timed out in", stack)
        assert any(f in line for f in ("runner.py", "backends.py", "arithmetic.py") for line in stack), timed_out.message
        engine.timeout = None
        fresh = engine.check(DEMO, RunConfig(backend, "low"))
        _assert_ran_on(fresh, backend)
        assert fresh.worker["pid"] != timed_out.fault["pid"]
    finally:
        engine.close()


def test_many_isolated_models_never_fall_back_from_vulkan(pytester, models):
    """Isolated workers build their own runtimes (one worker per model), so the shared-runtime fix does not
    cross models there: check that Vulkan still never falls back over many models under isolation."""
    require("VULKAN")
    names = sorted(p.name for p in COLLAPSE.glob("*.mnn"))
    models(*[f"collapse/{n}" for n in names], "demo/lama_like.mnn", "deep/deep_fp32.mnn", "multi_io.mnn")
    result = pytester.runpytest("--mnn-only", "--mnn-backends", "VULKAN", "--mnn-precisions", "high,low",
                                "--mnn-isolate", "always", "--mnn-model", ".", "--mnn-report", "r.json")
    report = read_report(pytester.path / "r.json")
    results = [r for r in report["results"] if "::parity[" in r["nodeid"]]
    assert len(results) >= 2 * 15, result.stdout.str()
    for r in results:
        assert r["category"] not in ("backend_fallback", "crashed", "timeout"), r["message"]
        assert r["backend_used"] == "VULKAN" and r["worker"] is not None
    assert len({r["worker"]["pid"] for r in results}) >= 15  # one worker per model


def test_a_real_vulkan_fallback_is_never_a_pass(pytester, models, tmp_path, monkeypatch):
    """A real GPU fallback, made by MNN itself on the GPU build: with the Vulkan loader pointed at no driver
    (VK_ICD_FILENAMES), MNN cannot create its Vulkan runtime and every session silently runs on the CPU.

    Twice: (1) discovery sees it and every Vulkan item skips, saying why (or fails where it is required);
    (2) discovery is stale (pytest's cache, kept from a run where Vulkan worked, rewritten under this
    environment's key, as an earlier driver state would leave it), so the items run and their sessions fall
    back in the worker: each must fail as backend_fallback, and none may pass. MNN's own Vulkan limit (about
    ten runtimes per process, seen with raw MNN on the H100 and the H200) is never reached by the plugin, which
    shares its runtimes (test_gpu_modes.py drives a worker past that count), so this is the real GPU fallback
    the item-level check meets."""
    require("VULKAN")
    from pytest_mnn_parity.mnn import kept_results

    models("demo/lama_like.mnn", "multi_io.mnn")
    args = ("--mnn-only", "--mnn-backends", "VULKAN", "--mnn-precisions", "high,low", "--mnn-model", ".",
            "-o", f"cache_dir={tmp_path / 'cache'}")
    working = pytester.runpytest_subprocess(*args, "--mnn-report", "ok.json")
    assert {r["outcome"] for r in read_report(pytester.path / "ok.json")["results"]} == {"passed"}, \
        working.stdout.str()
    kept_file = tmp_path / "cache" / "v" / "mnn-parity" / "discovery"
    kept = json.loads(kept_file.read_text())
    assert any(s["name"] == "VULKAN" and s["available"] for s in kept["results"]["statuses"]), kept

    no_driver = tmp_path / "no-vulkan-driver.json"  # a loader manifest that names no driver
    monkeypatch.setenv("VK_ICD_FILENAMES", str(no_driver))
    monkeypatch.setenv("VK_DRIVER_FILES", str(no_driver))
    fresh = pytester.runpytest_subprocess(*args, "--cache-clear", "--mnn-report", "fresh.json")
    for r in read_report(pytester.path / "fresh.json")["results"]:
        assert r["outcome"] == "skipped" and "CPU" in r["message"], (r["nodeid"], r["message"])
    assert fresh.ret == 0

    kept["key"] = kept_results.discovery_key()  # this environment's key, with the working run's findings
    kept_file.write_text(json.dumps(kept))
    stale = pytester.runpytest_subprocess(*args, "--mnn-report", "stale.json")
    results = read_report(pytester.path / "stale.json")["results"]
    assert len(results) == 4, stale.stdout.str()
    # The first item that falls back fails; later ones may skip on what it taught discovery: none passes.
    assert {r["outcome"] for r in results} <= {"failed", "skipped"}, [(r["nodeid"], r["outcome"]) for r in results]
    failed = [r for r in results if r["outcome"] == "failed"]
    assert failed and all(r["category"] == "backend_fallback" for r in failed), [r["message"] for r in failed]
    assert all(backends.FORWARD_NAMES.get(r["forward_type"]) == "CPU" for r in failed)
    assert stale.ret == 1



def test_each_gpu_backend_runs_in_workers_of_its_own_with_the_in_process_verdicts():
    """The default isolation on a GPU machine: one worker per GPU backend, started with the run (discovery is
    known), each running only its backend's checks, with the verdicts the in-process engine gives."""
    from pytest_mnn_parity.isolation.policy import Isolation

    for backend in GPU_BACKENDS:
        require(backend)
    if len(os.sched_getaffinity(0)) < 4:
        pytest.skip("GPU workers start with the run only on 4 or more cores (isolation.engine.SPARE_MIN_CORES)")
    isolation = Isolation(ParityEngine(), "auto", None, ["CPU", *GPU_BACKENDS])
    configs = [RunConfig(b, p) for b in GPU_BACKENDS for p in ("high", "low")]
    try:
        isolation.start()
        assert sorted(isolation._by_backend) == sorted(GPU_BACKENDS)
        results = {c.id: isolation.check(DEMO, c) for c in configs}
    finally:
        isolation.close()
    local = ParityEngine()
    for config in configs:
        _assert_ran_on(results[config.id], config.backend)
        assert results[config.id].category is local.check(DEMO, config).category, results[config.id].message
    pids = {b: {results[f"{b}-{p}"].worker["pid"] for p in ("high", "low")} for b in GPU_BACKENDS}
    assert all(len(p) == 1 for p in pids.values()) and len(set.union(*pids.values())) == 3
