"""Per-layer tracing on real models: the right layer is blamed, tensors are read in the right layout."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from pytest_mnn_parity import ParityEngine, ParitySettings, RunConfig
from pytest_mnn_parity.mnn.runner import reference_config, LoadedModel
from pytest_mnn_parity.trace.record import activation_risk, record_reference
from pytest_mnn_parity.core.verdict import Category

from conftest import COLLAPSE, DEMO, FIXTURES, read_report

# Where the engine runs the reference with the default --mnn-threads (4).
REFERENCE = reference_config(4)


def _check(name: str, config=RunConfig("CPU", "high"), layers="on-failure"):
    engine = ParityEngine(ParitySettings(reference=str(COLLAPSE / f"{name}.mnn"), layers=layers))
    return engine.check(COLLAPSE / f"{name}.fp16.mnn", config)


@pytest.mark.parametrize("name", ["zero", "partial_zero", "non_finite", "constant", "stale"])
def test_fp16_collapse_blames_the_tiny_weight_layer(name):
    """Each of these graphs collapses because one layer's weights flush to zero under --fp16."""
    result = _check(name)
    first = result.first_divergent_layer
    assert first is not None, result.message
    assert first["name"] == "tiny_conv" and first["type"] == "Convolution"
    assert result.trace.first_divergent.inputs_ok
    assert "first divergent layer: tiny_conv (Convolution" in result.message
    assert "its inputs were within tolerance" in result.message


def test_health_flip_and_non_finite_downstream_are_both_reported():
    result = _check("non_finite")
    assert result.trace.first_health_flip.name == "tiny_conv"
    assert result.trace.first_health_flip.health == ["zero"]
    out = next(layer for layer in result.trace.layers if layer.name == "out")
    assert out.health == ["non_finite"] and not out.inputs_ok


def test_downstream_layers_are_not_blamed_and_unchanged_layers_pass():
    result = _check("partial_zero")
    by_name = {layer.name: layer for layer in result.trace.layers}
    assert not by_name["ok_conv"].failed
    assert by_name["gain_mul"].failed and not by_name["gain_mul"].inputs_ok
    assert by_name["tiny_conv"].health == ["zero"]


def test_healthy_model_traced_always_passes_and_lists_every_layer():
    engine = ParityEngine(ParitySettings(layers="always"))
    result = engine.check(DEMO, RunConfig("CPU", "low"))
    assert result.category is Category.OK
    trace = result.trace
    assert trace.compared >= 20 and not trace.unmatched_target and not trace.unmatched_reference
    assert trace.first_divergent is None and not any(layer.failed for layer in trace.layers)
    assert [layer.index for layer in trace.layers] == list(range(trace.compared))
    assert result.first_divergent_layer is None and not result.fp16_risks


def test_layers_off_traces_nothing():
    result = _check("zero", layers="off")
    assert result.category is Category.ZERO_OUTPUT
    assert result.trace is None and result.first_divergent_layer is None and not result.fp16_risks
    assert "first divergent layer" not in result.message


def test_traced_tensors_are_in_logical_layout():
    """The reference's conv output, read inside the callback, equals a numpy convolution of the same weights.

    MNN keeps convolution outputs packed (NC4HW4/NC8HW8) internally; reading them
    as flat memory would give garbage that no tolerance catches.
    """
    model = LoadedModel(COLLAPSE / "healthy.mnn")
    inputs, _ = ParityEngine().inputs(model)
    trace, run = record_reference(model, REFERENCE, inputs)
    try:
        graph = onnx.load(str(FIXTURES / "onnx" / "collapse_healthy.onnx")).graph
        weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        first_conv = next(n for n in graph.node if n.op_type == "Conv")
        w = weights[first_conv.input[1]].astype(np.float64)
        b = weights[first_conv.input[2]].astype(np.float64) if len(first_conv.input) > 2 else 0.0
        expected = _conv_same(inputs["image"].astype(np.float64), w, b)
        name = first_conv.output[0]
        keys = [k for k in trace.files if k[0] == f"{name}#0" and k[1] == "out"]
        assert keys, sorted(trace.files)[:10]
        got = np.asarray(trace.load(f"{name}#0", "out", 0))
        if any(n.op_type == "Relu" and n.input[0] == name for n in graph.node):
            expected = np.maximum(expected, 0)  # the converter fuses Relu into the conv
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    finally:
        trace.close()


def _conv_same(x: np.ndarray, w: np.ndarray, b) -> np.ndarray:
    k = w.shape[-1]
    p = k // 2
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    n, c, h, wd = x.shape
    out = np.zeros((n, w.shape[0], h, wd))
    for i in range(k):
        for j in range(k):
            out += np.einsum("nchw,oc->nohw", xp[:, :, i:i + h, j:j + wd], w[:, :, i, j])
    return out + np.asarray(b).reshape(1, -1, 1, 1)


def test_risk_scan_flags_activations_beyond_fp16_range_even_when_everything_passes():
    engine = ParityEngine()
    result = engine.check(FIXTURES / "risk" / "overflow_activation.mnn", RunConfig("CPU", "low"))
    assert result.category is Category.OK  # x86 computes "low" in fp32: nothing fails here...
    risks = {(r.layer, r.kind) for r in result.fp16_risks}
    assert ("scale_up", "overflow") in risks  # ...but a phone or GPU with real fp16 would overflow here


def test_activation_risk_thresholds():
    assert [r.kind for r in activation_risk("a", "T", np.array([70000.0, 1.0], np.float32))] == ["overflow"]
    assert [r.kind for r in activation_risk("a", "T", np.array([1e-6, 2e-6, 1.0], np.float32))] == ["underflow"]
    assert activation_risk("a", "T", np.array([1e-6, 1.0, 2.0], np.float32)) == []
    assert activation_risk("a", "T", np.array([65504.0, 0.0], np.float32)) == []
    assert activation_risk("a", "T", np.array([3, 4], np.int32)) == []


def test_reference_trace_files_are_removed_on_close():
    model = LoadedModel(DEMO)
    trace, _ = record_reference(model, REFERENCE, ParityEngine().inputs(model)[0])
    folder = trace.folder
    assert any(folder.iterdir())
    trace.close()
    assert not folder.exists()


def test_plugin_layers_option_and_json_fields(pytester, models):
    models("collapse/zero.fp16.mnn", "collapse/zero.mnn", "demo/lama_like.mnn")
    failing = pytester.runpytest("--mnn-only", "--mnn-backends", "CPU", "--mnn-precisions", "low", "--mnn-model",
                                 "zero.fp16.mnn", "--mnn-reference", "zero.mnn", "--mnn-report", "f.json")
    failing.assert_outcomes(failed=1)
    failing.stdout.fnmatch_lines(["*first divergent layer: tiny_conv (Convolution, #*) [[]zero[]]*",
                                  "*tiny_conv*Convolution*zero*<- first divergent*",
                                  "*fp16 risk (from the fp32 reference's activations*",
                                  "*tiny_conv (Convolution): 100% of non-zero values below fp16's normal range*"])
    rec = read_report(pytester.path / "f.json")["results"][0]
    assert rec["first_divergent_layer"]["name"] == "tiny_conv" and rec["first_divergent_layer"]["health"] == ["zero"]
    assert rec["layer_trace"]["compared"] == len(rec["layers"]) >= 3
    assert [layer["name"] for layer in rec["layers"]][1] == "tiny_conv"
    assert rec["fp16_risks"][0]["layer"] == "tiny_conv"

    always = pytester.runpytest("--mnn-only", "--mnn-backends", "CPU", "--mnn-precisions", "high", "--mnn-model",
                                "lama_like.mnn", "--mnn-layers", "always", "--mnn-report", "a.json")
    always.assert_outcomes(passed=1)
    rec = read_report(pytester.path / "a.json")["results"][0]
    assert rec["first_divergent_layer"] is None and len(rec["layers"]) >= 20
    assert all(not layer["failed"] for layer in rec["layers"])

    off = pytester.runpytest("--mnn-only", "--mnn-backends", "CPU", "--mnn-precisions", "low", "--mnn-model",
                             "zero.fp16.mnn", "--mnn-reference", "zero.mnn", "--mnn-layers", "off",
                             "--mnn-report", "o.json")
    off.assert_outcomes(failed=1)
    assert "first divergent layer" not in off.stdout.str()
    assert "--mnn-layers off" in off.stdout.str()  # the reproduce command keeps the mode
    rec = read_report(pytester.path / "o.json")["results"][0]
    assert rec["layers"] is None and rec["first_divergent_layer"] is None

    bad = pytester.runpytest("--mnn-only", "--mnn-model", "zero.mnn", "--mnn-layers", "sometimes")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    assert "--mnn-layers: expected one of off, on-failure, always" in bad.stderr.str()


def test_risk_line_in_terminal_summary_for_a_passing_model(pytester, models):
    models("risk/overflow_activation.mnn")
    result = pytester.runpytest("--mnn-only", "--mnn-backends", "CPU", "--mnn-model", "overflow_activation.mnn")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["fp16 risk in overflow_activation.mnn: scale_up overflow (max |x| *)*"])


def test_weight_risk_scan_names_the_weights_fp16_conversion_would_lose(pytester, models):
    engine = ParityEngine(ParitySettings(reference=str(COLLAPSE / "zero.mnn")))
    result = engine.check(COLLAPSE / "zero.fp16.mnn", RunConfig("CPU", "low"))
    kinds = {(r.op_name, r.kind) for r in result.weight_risks}
    assert kinds == {("tiny_conv", "flush"), ("gain", "overflow")}
    assert "tiny_conv (Convolution weight): 108 of 108 values would flush to 0 under --fp16" in result.message
    healthy = ParityEngine().check(FIXTURES / "deep" / "deep_fp32.mnn", RunConfig("CPU", "low"))
    assert healthy.weight_risks == [] and healthy.fp16_risks == []

    models("collapse/zero.mnn")
    run = pytester.runpytest("--mnn-only", "--mnn-backends", "CPU", "--mnn-precisions", "high", "--mnn-model",
                             "zero.mnn", "--mnn-report", "w.json")
    run.assert_outcomes(passed=1)
    run.stdout.fnmatch_lines(["fp16 risk in zero.mnn: *tiny_conv weight flush under --fp16 (108/108)*"])
    rec = read_report(pytester.path / "w.json")["results"][0]
    assert {(r["op"], r["kind"]) for r in rec["fp16_weight_risks"]} == {("tiny_conv", "flush"), ("gain", "overflow")}
