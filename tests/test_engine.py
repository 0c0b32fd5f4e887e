"""The engine against real MNN sessions on the real fixture models (no pytest layer)."""
from __future__ import annotations

import numpy as np
import pytest

from pytest_mnn_parity import backends
from pytest_mnn_parity.mnn import arithmetic as mnn_arithmetic
from pytest_mnn_parity.mnn.library import device_support_line
from pytest_mnn_parity.mnn.model import ModelError
from pytest_mnn_parity.core.tolerances import TIERS
from pytest_mnn_parity.engine.engine import ParityEngine
from pytest_mnn_parity.engine.results import ParitySettings
from pytest_mnn_parity.mnn.runner import reference_config, LoadedModel, RunConfig
from pytest_mnn_parity.core.verdict import Category

from conftest import COLLAPSE, COLLAPSE_CATEGORIES, DEMO, FIXTURES, GPU_BUILD_BACKENDS, gpu_build

# Where the engine runs the reference with the default --mnn-threads (4).
REFERENCE = reference_config(4)

CPU_CONFIGS = [RunConfig("CPU", p) for p in backends.PRECISIONS]


@pytest.fixture(scope="module")
def engine():
    return ParityEngine()


@pytest.mark.parametrize("config", CPU_CONFIGS, ids=lambda c: c.id)
@pytest.mark.parametrize("model", ["demo/lama_like.mnn", "deep/deep_fp32.mnn", "multi_io.mnn"])
def test_healthy_models_pass_every_cpu_precision(engine, model, config):
    result = engine.check(FIXTURES / model, config)
    assert result.category is Category.OK, result.message
    assert result.backend_used == "CPU" and result.forward_type in (0, 13)
    assert result.verdict is not None and result.verdict.outputs
    for v in result.verdict.outputs:
        assert v.metrics is not None and v.metrics.cosine > 0.9999


def test_multi_output_model_judges_every_output_with_its_dtype(engine):
    result = engine.check(FIXTURES / "multi_io.mnn", RunConfig("CPU", "high"))
    assert {v.name for v in result.verdict.outputs} == {"scores", "ids_out"}
    model = engine.model(FIXTURES / "multi_io.mnn")
    inputs, _ = engine.inputs(model)
    run = model.run(RunConfig("CPU", "high"), inputs)
    assert run.outputs["ids_out"].dtype == np.int32
    np.testing.assert_array_equal(run.outputs["ids_out"], inputs["ids"] + 1)


@pytest.mark.parametrize("name", sorted(COLLAPSE_CATEGORIES))
def test_fp16_conversion_collapse_is_named_by_its_category(name):
    engine = ParityEngine(ParitySettings(reference=str(COLLAPSE / f"{name}.mnn")))
    result = engine.check(COLLAPSE / f"{name}.fp16.mnn", RunConfig("CPU", "high"), reproduce="pytest ...")
    assert result.category.value == COLLAPSE_CATEGORIES[name], result.message
    assert result.message.startswith(f"{COLLAPSE_CATEGORIES[name]} on CPU-high: output 'out'")
    assert "reproduce: pytest ..." in result.message
    if name == "stale":  # told apart from a backend that did not recompute: the build's own CPU run is input-blind
        assert "its output does not depend on its input while the reference's does" in result.message


def test_fp16_healthy_build_passes_fp16_tolerances_but_not_fp32_ones():
    engine = ParityEngine(ParitySettings(reference=str(COLLAPSE / "healthy.mnn")))
    strict = engine.check(COLLAPSE / "healthy.fp16.mnn", RunConfig("CPU", "high"))
    assert strict.category is Category.MISMATCH
    assert strict.tolerance.tier == "fp32"
    fp16 = {k: getattr(TIERS["fp16"], k) for k in ("atol", "rtol", "min_cosine")}
    loose = engine.check(COLLAPSE / "healthy.fp16.mnn", RunConfig("CPU", "high"), [("test", fp16)])
    assert loose.category is Category.OK, loose.message


@pytest.mark.parametrize("precision", backends.PRECISIONS)
def test_tier_follows_the_measured_arithmetic(precision):
    """x86 CPUs compute every precision in fp32 (MNN prints fp16:0): all are held to the fp32 tier."""
    arithmetic = mnn_arithmetic.probe_arithmetic("CPU", precision)
    result = ParityEngine().check(DEMO, RunConfig("CPU", precision))
    assert result.arithmetic is arithmetic and result.tolerance.tier == arithmetic.kind
    assert set(arithmetic.errors) == {"add", "matmul", *mnn_arithmetic.KERNEL_PROBES}
    if "fp16:0" in device_support_line():
        assert arithmetic.kind == "fp32" and max(arithmetic.errors.values()) < 1e-3 and arithmetic.kernels == {}
    failing = ParityEngine(ParitySettings(reference=str(COLLAPSE / "zero.mnn"))).check(
        COLLAPSE / "zero.fp16.mnn", RunConfig("CPU", precision))
    assert f"arithmetic: {arithmetic.kind} (probe errors: add " in failing.message


def test_inputs_are_copied_in_before_every_run():
    """Two runs with different inputs give different outputs, and rerunning A reproduces A exactly."""
    model = LoadedModel(DEMO)
    engine = ParityEngine()
    a, b = engine.inputs(model)
    config = RunConfig("CPU", "normal")
    out_a = model.run(config, a).outputs["inpainted"]
    out_b = model.run(config, b).outputs["inpainted"]
    again = model.run(config, a).outputs["inpainted"]
    assert not np.array_equal(out_a, out_b)
    np.testing.assert_array_equal(out_a, again)


def test_generated_inputs_are_deterministic_per_seed():
    model = LoadedModel(DEMO)
    a1, b1 = ParityEngine(ParitySettings(seed=7)).inputs(model)
    a2, _ = ParityEngine(ParitySettings(seed=7)).inputs(model)
    a3, _ = ParityEngine(ParitySettings(seed=8)).inputs(model)
    for name in a1:
        np.testing.assert_array_equal(a1[name], a2[name])
        assert not np.array_equal(a1[name], a3[name])
        assert not np.array_equal(a1[name], b1[name])
        assert 0.0 <= a1[name].min() and a1[name].max() < 1.0


def test_control_flow_model_is_a_runtime_error_with_mnn_error_name_and_hint(engine):
    """On the session API; auto runs it on the Module API (tests/test_module_api.py)."""
    result = engine.check(FIXTURES / "control_flow/if_branch.mnn", RunConfig("CPU", "high"), api="session")
    assert result.category is Category.RUNTIME_ERROR
    assert result.rc == 3
    assert "runSession returned 3 (COMPUTE_SIZE_ERROR)" in result.message
    assert "Module API" in result.message and "--useOriginRNNImpl" in result.message


def test_dynamic_input_without_shape_is_a_model_error_naming_the_option(engine):
    result = engine.check(FIXTURES / "dynamic/dynamic_hw.mnn", RunConfig("CPU", "high"))
    assert result.category is Category.MODEL_ERROR
    assert "dynamic_hw.mnn: input 'image' has dynamic shape image: 1x3x?x?" in result.message
    assert "--mnn-input-shape image=1x3x{H}x{W}" in result.message


def test_dynamic_input_with_shape_runs():
    engine = ParityEngine(ParitySettings(input_shapes={"image": (1, 3, 16, 24)}))
    result = engine.check(FIXTURES / "dynamic/dynamic_hw.mnn", RunConfig("CPU", "low"))
    assert result.category is Category.OK, result.message
    assert result.verdict.outputs[0].metrics.shape[2:] == (16, 24)


def test_wrong_rank_input_shape_is_a_model_error():
    engine = ParityEngine(ParitySettings(input_shapes={"image": (3, 16, 16)}))
    result = engine.check(FIXTURES / "dynamic/dynamic_hw.mnn", RunConfig("CPU", "low"))
    assert result.category is Category.MODEL_ERROR and "has rank 3" in result.message


@pytest.mark.parametrize("backend", ["OPENCL", "VULKAN", "CUDA", "METAL", "OPENGL", "NN"])
def test_backends_missing_from_the_cpu_wheel_are_unavailable_with_the_fallback_named(backend):
    # Skipped only where the installed MNN is the GPU build and has this backend, never because discovery (the code
    # under test) says so: a discovery that wrongly found a GPU on the CPU wheel must fail here.
    if gpu_build() and backend in GPU_BUILD_BACKENDS:  # pragma: no cover - only on a GPU build of MNN
        pytest.skip(f"{backend} is in this GPU build of MNN ({gpu_build()})")
    status = backends.discover([backend])[backend]
    assert status.reason == f"{backend}: not in this MNN build (session fell back to CPU)"
    result = ParityEngine().check(DEMO, RunConfig(backend, "low"))
    assert result.category is Category.BACKEND_UNAVAILABLE and result.skipped


def test_cpu_is_available_with_its_forward_type():
    status = backends.discover(["CPU"])["CPU"]
    assert status.available and status.forward_type in (0, 13)


def test_fallback_after_discovery_is_caught(monkeypatch):
    """FAKE discovery result: OPENCL claimed available, as when Vulkan stops working mid-run on a GPU box.

    The session really falls back to CPU here; the engine must notice from the
    session's own forward type and never report a pass.
    """
    # METAL: never in a Linux build, so the session really falls back on every machine.
    fake = backends.BackendStatus("METAL", True, 1, "FAKE: pretend METAL probed fine")
    monkeypatch.setitem(backends._CACHE, "METAL", fake)
    result = ParityEngine().check(DEMO, RunConfig("METAL", "high"))
    assert result.category is Category.BACKEND_FALLBACK
    assert "runs on CPU" in result.message and "fell back silently" in result.message


@pytest.mark.parametrize(("content", "reason"), [
    (b"", "is empty"),
    (b"\x00" * 64, "MNN cannot load it"),
    (bytes(range(256)) * 8, "MNN cannot load it"),
])
def test_bad_model_files_raise_model_error_naming_the_file(tmp_path, content, reason):
    path = tmp_path / "bad.mnn"
    path.write_bytes(content)
    with pytest.raises(ModelError, match=reason) as info:
        LoadedModel(path)
    assert str(path) in str(info.value)


def test_truncated_model_is_a_model_error(tmp_path):
    data = DEMO.read_bytes()
    path = tmp_path / "truncated.mnn"
    path.write_bytes(data[: len(data) // 3])
    result = ParityEngine().check(path, RunConfig("CPU", "high"))
    assert result.category is Category.MODEL_ERROR
    assert "truncated.mnn" in result.message and "flatbuffer verification failed" in result.message


def test_reference_model_with_other_inputs_is_refused(tmp_path):
    engine = ParityEngine(ParitySettings(reference=str(FIXTURES / "multi_io.mnn")))
    result = engine.check(DEMO, RunConfig("CPU", "high"))
    assert result.category is Category.MODEL_ERROR
    assert "differ from the reference model" in result.message and "multi_io.mnn" in result.message


@pytest.mark.parametrize("threads", [1, 4])
def test_reference_runs_at_the_items_thread_count(threads):
    """A reference at another thread count differs from every CPU item by summation-order noise (issue 20)."""
    engine = ParityEngine(ParitySettings(threads=threads))
    assert (engine.reference_config.backend, engine.reference_config.precision) == ("CPU", "high")
    assert engine.reference_config.threads == threads
    result = engine.check(DEMO, RunConfig("CPU", "low", threads))
    assert result.reference == f"same model on CPU high, {threads} thread{'s' if threads > 1 else ''}"
    # Same thread count on this CPU: bit-identical, so nothing but exact agreement passes.
    assert result.passed and {v.decided_by for v in result.verdict.outputs} == {"exact"}
