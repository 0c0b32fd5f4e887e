"""The in-process converter wrapper: success is judged by the file, failure names the cause."""
from __future__ import annotations

import pytest

from pytest_mnn_parity.onnx.convert import ConversionError, convert_onnx
from pytest_mnn_parity.mnn.runner import LoadedModel

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


def test_unsupported_ops_are_named_with_the_opset_and_a_hint(tmp_path):
    with pytest.raises(ConversionError) as info:
        convert_onnx(FIXTURES / "onnx" / "unsupported_dft.onnx", tmp_path / "dft.mnn")
    error = info.value
    assert "These Op Not Support: ONNX::DFT" in error.log  # what MNN 3.6.1 really says
    assert error.ops == ("DFT",) and error.opset == 17 and error.signal is None
    assert error.reason == "unsupported ONNX operator(s) DFT (opset 17)"
    assert "MatMul with DFT matrices" in error.hint and "--OP" in error.hint
    assert not list(tmp_path.iterdir())


def test_isolated_conversion_turns_a_converter_crash_into_an_error(tmp_path):
    from pytest_mnn_parity.mnn.library import mnn_version

    with pytest.raises(ConversionError) as info:
        convert_onnx(FIXTURES / "onnx" / "converter_crash.onnx", tmp_path / "crash.mnn", isolated=True)
    if mnn_version() != "3.6.1":  # pragma: no cover - the segfault is a bug of this release
        pytest.skip(f"MNN {mnn_version()} fails differently on this graph: {info.value.reason}")
    assert info.value.signal == "SIGSEGV"
    assert info.value.reason == "the converter crashed (SIGSEGV) after 'Start to Optimize the MNN Net...' (opset 17)"
    assert "device supports" not in info.value.log  # MNN's import banner is not the converter's word
    assert not list(tmp_path.iterdir())


def test_isolated_conversion_gives_the_same_model(tmp_path):
    inline = convert_onnx(FIXTURES / "onnx" / "multi_io.onnx", tmp_path / "a.mnn")
    child = convert_onnx(FIXTURES / "onnx" / "multi_io.onnx", tmp_path / "b.mnn", isolated=True)
    assert "Converted Success" in child.log
    assert LoadedModel(child.target).info.output_names == LoadedModel(inline.target).info.output_names


def test_external_weights_are_renamed_with_the_model(tmp_path):
    convert_onnx(FIXTURES / "onnx" / "collapse_stale.onnx", tmp_path / "stale.mnn", extra_flags=["--saveExternalData"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stale.mnn", "stale.mnn.weight"]
    assert LoadedModel(tmp_path / "stale.mnn").info.output_names == ("out",)
