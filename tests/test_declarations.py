"""Declarations are never dropped without a word (issue 21): every name a user gives is one of the model's,
a dynamic ONNX model runs after one try, and what was done to each input is said.

Each test runs pytest with the plugin on real fixture models (or a tiny ONNX graph made here) and checks
what the user reads.
"""
from __future__ import annotations

import re

import pytest

from conftest import read_report

CPU_HIGH = ("--mnn-only", "--mnn-backends", "CPU", "--mnn-precisions", "high")


def _message(pytester) -> str:
    return read_report(pytester.path / "r.json")["results"][0]["message"]


def test_every_misspelt_sidecar_name_is_listed_at_once_with_the_closest_real_one(pytester, models):
    models("inputs/lama_like.mnn", "inputs/photo1.png", "inputs/mask1.png")
    (pytester.path / "lama_like.mnn.toml").write_text(
        '[input_sets.photo1]\nimage = { image = "photo1.png" }\nmask = { mask = "mask1.png" }\n\n'
        '[tolerance.outputs.inpianted]\natol = 0.1\n\n'
        '[tolerance.layers.enc_cnv]\natol = 0.1\n')  # an op name: a layer tolerance for nothing, before
    result = pytester.runpytest(*CPU_HIGH, "--mnn-model", "lama_like.mnn", "--mnn-report", "r.json")
    result.assert_outcomes(errors=1)
    message = _message(pytester)
    assert message.startswith(f"{pytester.path / 'lama_like.mnn.toml'}: 2 names that the model lama_like.mnn does "
                              "not have:"), message
    assert "[tolerance.outputs.inpianted]: no output 'inpianted' (did you mean 'inpainted'?)" in message
    assert re.search(r"\[tolerance\.layers\.enc_cnv\]: no layer 'enc_cnv' \(did you mean 'enc_conv'", message)
    assert "its outputs: inpainted; its layers: image, mask, " in message
    # Spelt right, the same sidecar runs.
    (pytester.path / "lama_like.mnn.toml").write_text(
        (pytester.path / "lama_like.mnn.toml").read_text().replace("inpianted", "inpainted").replace("enc_cnv",
                                                                                                      "enc_conv"))
    pytester.runpytest(*CPU_HIGH, "--mnn-model", "lama_like.mnn").assert_outcomes(passed=1)


def test_a_misspelt_input_of_an_input_set_gets_the_closest_name(pytester, models):
    models("inputs/lama_like.mnn", "inputs/photo1.png", "inputs/mask1.png")
    (pytester.path / "lama_like.mnn.toml").write_text(
        '[input_sets.photo1]\nimgae = { image = "photo1.png" }\nmask = { mask = "mask1.png" }\n')
    result = pytester.runpytest(*CPU_HIGH, "--mnn-model", "lama_like.mnn", "--mnn-report", "r.json")
    result.assert_outcomes(errors=1)
    assert ("[input_sets.photo1] imgae: the model lama_like.mnn has no input 'imgae' (did you mean 'image'?) "
            "(its inputs: image, mask)") in _message(pytester)


def test_a_stream_declaration_names_every_wrong_name_and_the_users_onnx_file(pytester, models):
    models("onnx/rnn_step.onnx")
    result = pytester.runpytest(*CPU_HIGH, "--mnn-convert", "fp32", "--mnn-model", "rnn_step.onnx",
                                "--mnn-stream", "h_ot->hh;steps=3", "--mnn-report", "r.json")
    result.assert_outcomes(errors=1)
    message = _message(pytester)
    assert message.startswith(f"{pytester.path / 'rnn_step.onnx'} (its fp32 conversion): --mnn-stream "
                              "'h_ot->hh;steps=3': the model has no output 'h_ot' (did you mean 'h_out'?), no input "
                              "'hh' (did you mean 'h'?) (its outputs: h_out, y; its inputs: h, x)"), message
    assert "mnn-parity-convert" not in message and ".pytest_cache" not in message


def test_an_onnx_models_layer_tolerance_is_checked_and_reaches_its_localisation(pytester, models):
    """An ONNX model's failures are localised to ONNX nodes: [tolerance.layers.NODE] names one of them and
    judges that node's output (it was neither checked nor used)."""
    models("onnx/dynamic_hw.onnx")
    exact = '[shapes]\nimage = "1x3x16x16"\n\n[tolerance]\natol = 0\nrtol = 0\nmax_outside_fraction = 0\nabs_floor = 0\n'
    args = (*CPU_HIGH, "--mnn-convert", "fp16", "--mnn-model", "dynamic_hw.onnx", "--mnn-report", "r.json")
    (pytester.path / "dynamic_hw.onnx.toml").write_text(exact + "\n[tolerance.layers.cnv]\natol = 1\n")
    misspelt = pytester.runpytest(*args)
    misspelt.assert_outcomes(errors=1)
    assert ("[tolerance.layers.cnv]: the model dynamic_hw.onnx has no layer 'cnv' (did you mean 'conv'?) (its "
            "layers: conv, relu;") in _message(pytester)
    # The fp16 conversion's conv is off by its weights' rounding: forgiven there, the blame moves on to relu.
    (pytester.path / "dynamic_hw.onnx.toml").write_text(exact + "\n[tolerance.layers.conv]\natol = 1\nrtol = 1\n"
                                                                "max_outside_fraction = 1\nmin_cosine = 0\n")
    localised = pytester.runpytest(*args)
    localised.assert_outcomes(failed=1)
    record = read_report(pytester.path / "r.json")["results"][0]
    assert record["first_divergent_layer"]["name"] == "relu", record["message"]


def test_dynamic_onnx_inputs_get_one_line_to_paste_named_by_the_onnx_dimensions(pytester):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])], "named_dims",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 3, "height", "width"]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 3, "height", "width"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, "height", "width"])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(pytester.path / "two.onnx"))
    args = (*CPU_HIGH, "--mnn-convert", "fp32", "--mnn-model", "two.onnx")
    result = pytester.runpytest(*args, "--mnn-report", "r.json")
    result.assert_outcomes(errors=1)
    message = _message(pytester)
    assert "2 inputs have dynamic shapes: a: 1x3x?x? float32" in message.splitlines()[0], message
    line = "--mnn-input-shape a=1x3x{height}x{width} --mnn-input-shape b=1x3x{height}x{width}"
    assert f"\n    {line}\n" in message
    assert 'two.onnx.toml:\n    [shapes]\n    a = "1x3x{height}x{width}"\n    b = "1x3x{height}x{width}"' in message
    # Pasted without filling in the names: a usage error that says what to do.
    unfilled = pytester.runpytest(*args, *line.split())
    assert unfilled.ret == pytest.ExitCode.USAGE_ERROR
    assert "replace each {NAME} by a size, e.g. a=1x3x16x16" in unfilled.stderr.str()
    filled = pytester.runpytest(*args, *line.replace("{height}", "8").replace("{width}", "4").split())
    filled.assert_outcomes(passed=1)


def test_a_failing_onnx_item_names_the_users_file_on_its_model_line(pytester, models):
    models("onnx/fused_conv_relu.onnx")
    result = pytester.runpytest("--mnn-only", "--mnn-backends", "CPU", "--mnn-precisions", "low", "--mnn-convert",
                                "fp16", "--mnn-layers", "off", "--mnn-model", "fused_conv_relu.onnx",
                                "--mnn-report", "r.json")
    result.assert_outcomes(failed=1)
    model_line = next(line for line in _message(pytester).splitlines() if line.startswith("model:"))
    assert model_line.startswith(f"model:     {pytester.path / 'fused_conv_relu.onnx'} (its fp16 conversion, "
                                 "sha256 "), model_line


def test_what_was_done_to_fit_each_input_is_said(pytester, models):
    from PIL import Image
    import numpy as np

    models("inputs/lama_like.mnn")
    Image.new("RGBA", (50, 40), (200, 30, 30, 128)).save(pytester.path / "wide.png")
    np.save(pytester.path / "hole.npy", np.ones((1, 1, 32, 32)))  # float64, fed as the model's float32
    (pytester.path / "lama_like.mnn.toml").write_text(
        '[input_sets.wide]\nimage = { image = "wide.png" }\nmask = { array = "hole.npy" }\n')
    result = pytester.runpytest(*CPU_HIGH, "--mnn-model", "lama_like.mnn", "--mnn-report", "r.json")
    detail = read_report(pytester.path / "r.json")["results"][0]["input_detail"]
    assert detail.startswith("wide from lama_like.mnn.toml: image <- wide.png (resized 50x40 -> 32x32 (bilinear), "
                             "RGBA picture as RGB, /255, as NCHW), mask <- hole.npy (float64 cast to float32)"), detail
    result.assert_outcomes(passed=1)
