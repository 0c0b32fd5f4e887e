"""Real GPU backends (OpenCL, Vulkan, CUDA): run on a machine whose MNN build has them.

Every test skips, with the reason, where the backend is not really there (the
registry's wheel on CI falls back to the CPU for all of them). On the lent H100
with the GPU build (see docs/gpu.md) they all run.
"""
from __future__ import annotations

import numpy as np
import pytest

from pytest_mnn_parity import ParityEngine, ParitySettings, RunConfig, backends
from pytest_mnn_parity.runner import LoadedModel
from pytest_mnn_parity.verdict import Category

from conftest import COLLAPSE, DEMO, FIXTURES

pytestmark = pytest.mark.gpu
GPU_BACKENDS = ["OPENCL", "VULKAN", "CUDA"]


def require(backend: str) -> None:
    status = backends.discover([backend])[backend]
    if not status.available:
        pytest.skip(status.reason)


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
        if backends.discover([backend])[backend].available:
            arith[backend] = {p: backends.probe_arithmetic(backend, p).kind for p in ("high", "normal", "low")}
    if not arith:
        pytest.skip("no GPU backend in this MNN build")
    for backend, kinds in arith.items():
        assert kinds["high"] == "fp32", (backend, kinds)
    if "VULKAN" in arith:
        assert arith["VULKAN"]["normal"] == arith["VULKAN"]["low"] == "fp16"
    if "OPENCL" in arith and "NVIDIA" in _gpu_name():
        assert set(arith["OPENCL"].values()) == {"fp32"}


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
    if backends.probe_arithmetic(backend, "low").kind != "fp16":
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
