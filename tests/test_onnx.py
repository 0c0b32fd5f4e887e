"""ONNX models through the engine: real conversions, ONNX Runtime as reference, localisation against ONNX."""
from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest

from pytest_mnn_parity.mnn import arithmetic as mnn_arithmetic
from onnx import TensorProto, helper, numpy_helper

from pytest_mnn_parity import ParityEngine, ParitySettings, RunConfig
from pytest_mnn_parity.onnx import variants
from pytest_mnn_parity.onnx.convert import convert_onnx
from pytest_mnn_parity.mnn.library import mnn_version
from pytest_mnn_parity.onnx.runtime import OnnxRuntimeModel
from pytest_mnn_parity.mnn.runner import reference_config, LoadedModel, OpObserver, to_numpy
from pytest_mnn_parity.onnx.variants import ConversionCache
from pytest_mnn_parity.core.verdict import Category

from conftest import COLLAPSE, FIXTURES

# Where the engine runs the reference with the default --mnn-threads (4).
REFERENCE = reference_config(4)

ONNX = FIXTURES / "onnx"
HIGH, LOW = RunConfig("CPU", "high"), RunConfig("CPU", "low")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return ParityEngine(ParitySettings(convert_cache=str(tmp_path_factory.mktemp("convert"))))


@pytest.mark.parametrize("name", ["collapse_healthy", "lama_like"])
def test_healthy_fp32_and_fp16_variants_pass_against_onnx_runtime_with_default_tolerances(engine, name):
    worst = {}
    for variant in ("fp32", "fp16"):
        for config in (HIGH, LOW):
            result = engine.check(ONNX / f"{name}.onnx", config, variant=variant)
            assert result.category is Category.OK, result.message
            assert result.variant == variant and result.reference.startswith("ONNX Runtime ")
            measured = mnn_arithmetic.probe_arithmetic(config.backend, config.precision).kind
            assert result.tolerance.tier == ("fp16" if variant == "fp16" or measured == "fp16" else "fp32")
            worst[variant] = max(v.metrics.max_abs for v in result.verdict.outputs)
    # The fp16 variant really stores half weights: it is measurably further from ONNX than fp32.
    assert worst["fp16"] > 20 * worst["fp32"] > 0


def test_fp16_variant_collapse_is_zero_output_localised_to_the_responsible_node(engine):
    result = engine.check(ONNX / "collapse_zero.onnx", HIGH, variant="fp16")
    assert result.category is Category.ZERO_OUTPUT, result.message
    first = result.first_divergent_layer
    assert (first["name"], first["type"], first["tensor"], first["health"]) == ("tiny_conv", "Conv", "tiny_conv",
                                                                               ["zero"])
    summary = result.trace.summary()
    assert "re-converted with the same tensors kept as graph outputs" in summary["method"]
    assert summary["compared"] == 2 and summary["probes"] == 1
    assert "first divergent layer: tiny_conv (Conv, #0) [zero]; its inputs were within tolerance" in result.message
    assert "converted: " in result.message and "variant fp16 (MNNConvert --fp16)" in result.message
    assert engine.check(ONNX / "collapse_zero.onnx", HIGH, variant="fp32").passed


class _Outputs(OpObserver):
    def __init__(self):
        self.tensors = {}

    def after(self, tensors, name, op_type):
        self.tensors[name] = to_numpy(tensors[0])


def test_fused_conv_relu_is_not_blamed_for_the_relu_it_absorbed(engine, tmp_path):
    # The trap is real: MNN's op "enc_conv" holds post-Relu values, ONNX's tensor enc_conv does not.
    source = ONNX / "fused_conv_relu.onnx"
    model = LoadedModel(convert_onnx(source, tmp_path / "fused.mnn").target)
    inputs = engine.inputs(model)[0]
    observer = _Outputs()
    model.run(REFERENCE, inputs, observer=observer)
    assert "enc_relu" not in observer.tensors and observer.tensors["enc_conv"].min() >= 0
    copy = onnx.load(str(source))
    copy.graph.output.append(helper.make_empty_tensor_value_info("enc_conv"))
    (tmp_path / "with_enc_conv.onnx").write_bytes(copy.SerializeToString())
    assert OnnxRuntimeModel(tmp_path / "with_enc_conv.onnx").run(inputs, ["enc_conv"])["enc_conv"].min() < -0.1

    result = engine.check(source, HIGH, variant="fp16")
    assert result.category is Category.ZERO_OUTPUT
    assert (result.first_divergent_layer["name"], result.first_divergent_layer["type"]) == ("tiny_conv", "Conv")
    compared = {layer.tensor: layer for layer in result.trace.layers}
    assert not compared["enc_conv"].failed and not compared["enc_relu"].failed
    assert compared["enc_conv"].outputs[0].metrics.cosine > 0.9999
    assert engine.check(source, HIGH, variant="fp32").passed


@pytest.mark.parametrize(("name", "variant", "category", "blamed"), [
    ("overflow_activation", "fp16", Category.MISMATCH, ("scale_up", "Mul")),  # 1e6 clamps to 65504
    ("collapse_partial_zero", "fp16", Category.PARTIAL_ZERO, ("tiny_conv", "Conv")),
    ("collapse_zero", "int8", Category.MISMATCH, ("tiny_conv", "Conv")),  # 8-bit scales of ~1e-8 weights
])
def test_other_variant_failures_are_localised(engine, name, variant, category, blamed):
    result = engine.check(ONNX / f"{name}.onnx", HIGH, variant=variant)
    assert result.category is category, result.message
    assert (result.first_divergent_layer["name"], result.first_divergent_layer["type"]) == blamed
    assert result.trace.first_divergent.inputs_ok


def test_int8_variant_quantises_weights_and_is_judged_by_the_int8_tier(engine):
    result = engine.check(ONNX / "lama_like.onnx", HIGH, variant="int8")
    assert result.category is Category.OK, result.message
    assert result.tolerance.tier == "int8" and "--weightQuantBits 8" in result.conversion
    fp32 = engine.onnx.converted(ONNX / "lama_like.onnx", "fp32")[0]
    int8 = engine.onnx.converted(ONNX / "lama_like.onnx", "int8")[0]
    assert int8.stat().st_size < 0.7 * fp32.stat().st_size
    error = max(v.metrics.max_abs / v.metrics.ref_scale for v in result.verdict.outputs)
    assert 1e-4 < error < 5e-2  # quantised (not fp32-exact), and within the tier


def test_unsupported_op_is_a_model_error_naming_op_opset_and_a_hint(engine):
    result = engine.check(ONNX / "unsupported_dft.onnx", HIGH, variant="fp16")
    assert result.category is Category.MODEL_ERROR and result.variant == "fp16"
    assert "unsupported_dft.onnx: MNN cannot convert it (variant fp16: MNNConvert --fp16): unsupported ONNX " \
           "operator(s) DFT (opset 17)" in result.message
    assert "fix: DFT: write the FFT as MatMul" in result.message


def test_a_converter_crash_fails_that_model_and_not_the_process(engine):
    result = engine.check(ONNX / "converter_crash.onnx", HIGH)
    assert result.category is Category.MODEL_ERROR
    if mnn_version() != "3.6.1":  # pragma: no cover - the crash is a bug of this release
        pytest.skip(f"MNN {mnn_version()} may not crash on this graph")
    assert "the converter crashed (SIGSEGV)" in result.message and "(opset 17)" in result.message
    assert engine.check(ONNX / "collapse_healthy.onnx", HIGH).passed  # still alive, still converting


def test_conversion_cache_is_keyed_by_content_flags_and_mnn_version(tmp_path, monkeypatch):
    source = tmp_path / "model.onnx"
    shutil.copyfile(ONNX / "collapse_healthy.onnx", source)
    cache = ConversionCache(tmp_path / "cache")
    first = cache.convert(source, "fp16")
    assert cache.convert(source, "fp16") == first and cache.converted == [first]
    assert ConversionCache(tmp_path / "cache").convert(source, "fp16") == first  # a later run: a hit
    assert cache.convert(source, "fp32") != first
    assert ConversionCache(tmp_path / "cache", ["--weightQuantAsymmetric"]).convert(source, "fp16") != first
    model = onnx.load(str(source))
    weight = model.graph.initializer[0]
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 2, weight.name))
    source.write_bytes(model.SerializeToString())
    changed = cache.convert(source, "fp16")
    assert changed != first and len(cache.converted) == 3
    assert ConversionCache(tmp_path / "cache").path_for(source, ("--fp16",), "fp16") == changed
    # Another MNN release cannot be installed next to this one: a FAKE version string stands in for it.
    monkeypatch.setattr(variants, "mnn_version", lambda: "9.9.9-FAKE")
    assert ConversionCache(tmp_path / "cache").path_for(source, ("--fp16",), "fp16") != changed


def test_existing_mnn_against_its_onnx_source(tmp_path):
    settings = ParitySettings(reference=str(ONNX / "collapse_healthy.onnx"), convert_cache=str(tmp_path))
    ok = ParityEngine(settings).check(COLLAPSE / "healthy.mnn", HIGH)
    assert ok.category is Category.OK and ok.reference.startswith("ONNX Runtime") and ok.variant is None
    settings = ParitySettings(reference=str(ONNX / "collapse_zero.onnx"), convert_cache=str(tmp_path))
    bad = ParityEngine(settings).check(COLLAPSE / "zero.fp16.mnn", HIGH)
    assert bad.category is Category.ZERO_OUTPUT
    # Probes convert the ONNX file without --fp16: they cannot reproduce the failure, so nothing is blamed.
    assert bad.first_divergent_layer is None
    assert any("no longer fails" in note for note in bad.trace.notes)
    assert "--mnn-convert <variant>" in bad.message
    other = ParityEngine(settings).check(FIXTURES / "demo" / "lama_like.mnn", HIGH)
    assert other.category is Category.MODEL_ERROR
    assert "its inputs ['image', 'mask'] differ from the ONNX reference" in other.message


def test_int64_onnx_outputs_are_compared_with_mnn_int32(tmp_path, engine):
    graph = helper.make_graph(
        [helper.make_node("Add", ["ids", "one"], ["ids_out"], name="ids_add")], "int64_io",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 6])],
        [helper.make_tensor_value_info("ids_out", TensorProto.INT64, [1, 6])],
        initializer=[numpy_helper.from_array(np.array([1], dtype=np.int64), "one")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / "int64_io.onnx"
    onnx.save(model, str(path))
    runtime = OnnxRuntimeModel(path)
    ids = np.arange(6, dtype=np.int32).reshape(1, 6)
    out = runtime.run({"ids": ids})["ids_out"]
    assert out.dtype == np.int32 and out.tolist() == [[1, 2, 3, 4, 5, 6]]
    result = engine.check(path, HIGH)
    assert result.category is Category.OK, result.message
    assert engine.model(engine.onnx.converted(path, "fp32")[0]).run(HIGH, {"ids": ids}).outputs["ids_out"].dtype \
        == np.int32
