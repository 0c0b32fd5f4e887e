"""The in-process converter wrapper: success is judged by the file, failure names the cause."""
from __future__ import annotations

import pytest

from pytest_mnn_parity.convert import ConversionError, convert_onnx
from pytest_mnn_parity.runner import LoadedModel

from conftest import FIXTURES


def test_converts_an_onnx_file_that_mnn_then_loads(tmp_path):
    result = convert_onnx(FIXTURES / "onnx" / "multi_io.onnx", tmp_path / "m.mnn")
    assert result.target.stat().st_size > 0 and "Converted Success" in result.log
    assert {s.name for s in LoadedModel(result.target).info.inputs} == {"features", "ids"}
    assert not (tmp_path / "m.mnn.partial").exists()


def test_fp16_flag_is_passed_and_shrinks_weights(tmp_path):
    fp32 = convert_onnx(FIXTURES / "onnx" / "deep_fp32.onnx", tmp_path / "a.mnn")
    fp16 = convert_onnx(FIXTURES / "onnx" / "deep_fp32.onnx", tmp_path / "b.mnn", fp16=True)
    assert fp16.flags == ("--fp16",)
    assert fp16.target.stat().st_size < 0.7 * fp32.target.stat().st_size


def test_not_an_onnx_file_fails_with_the_converters_reason_and_no_output(tmp_path):
    bogus = tmp_path / "bogus.onnx"
    bogus.write_bytes(b"definitely not protobuf")
    with pytest.raises(ConversionError) as info:
        convert_onnx(bogus, tmp_path / "out.mnn")
    assert "bogus.onnx: MNN conversion failed" in str(info.value)
    assert info.value.reason.startswith("[ERROR] Invalid ONNX Model")
    assert "opset version" not in info.value.reason  # progress chatter is not a reason
    assert not (tmp_path / "out.mnn").exists()


def test_missing_source_is_a_conversion_error(tmp_path):
    with pytest.raises(ConversionError, match="no such file"):
        convert_onnx(tmp_path / "nope.onnx", tmp_path / "out.mnn")
