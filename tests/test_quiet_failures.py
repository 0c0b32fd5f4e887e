"""MNN's chatter and Python internals stay out of pytest's output; the messages keep what matters."""
from __future__ import annotations

import pytest

from pytest_mnn_parity.engine.engine import ParityEngine
from pytest_mnn_parity.engine.results import ParitySettings
from pytest_mnn_parity.mnn.runner import RunConfig

from conftest import FIXTURES

CPU = ("--mnn-only", "--mnn-backends", "CPU", "--mnn-precisions", "high")
DYNAMIC = FIXTURES / "dynamic" / "dynamic_hw.mnn"


def test_reference_resize_chatter_of_a_dynamic_model_is_captured_and_quoted(capfd):
    # 5 channels where the conv wants 3: MNN prints "Compute Shape Error for conv" from C++
    # while the reference session is resized to the given shape, at model load.
    engine = ParityEngine(ParitySettings(input_shapes={"image": (1, 5, 16, 16)}, api="session"))
    capfd.readouterr()
    result = engine.check(DYNAMIC, RunConfig("CPU", "high"))
    out, err = capfd.readouterr()
    assert "Compute Shape Error" not in out + err
    assert "Error for compute convolution shape" not in out + err
    assert result.category.value == "runtime_error"
    assert "Compute Shape Error for conv" in result.message
    # Load time chatter is the reference session's log, so a reference failure quotes it too.
    model = engine.model(DYNAMIC)
    assert "inputChannel: 5" in model.session_backend(RunConfig("CPU", "high", 1))[1]


def test_a_dynamic_model_that_resizes_cleanly_prints_nothing(capfd):
    engine = ParityEngine(ParitySettings(input_shapes={"image": (1, 3, 16, 16)}, api="session"))
    capfd.readouterr()
    result = engine.check(DYNAMIC, RunConfig("CPU", "high"))
    out, err = capfd.readouterr()
    assert result.passed, result.message
    assert (out, err) == ("", "")


@pytest.mark.parametrize("args, expected", [
    (("--mnn-seed", "3"), "input-set hash mismatch"),
    (("--mnn-model", "multi_io.mnn"), "holds no outputs of this model"),
])
def test_a_bundle_that_does_not_match_fails_setup_with_the_message_only(pytester, models, args, expected):
    models("demo/lama_like.mnn", "multi_io.mnn")
    pytester.runpytest(*CPU, "--mnn-model", "lama_like.mnn", "--mnn-save-outputs", "B").assert_outcomes(passed=1)
    model = () if "--mnn-model" in args else ("--mnn-model", "lama_like.mnn")
    result = pytester.runpytest(*CPU, *model, *args, "--mnn-reference", "B", "-rE", "-vv")
    result.assert_outcomes(errors=1)
    text = result.stdout.str()
    assert expected in text and "fix:" in text
    # No traceback, no source line, no Python class path: not in the error section, not in the summary.
    for python in ("Traceback", "pytest_mnn_parity.", ".py:", "raise ", "ModelLoadFailure", "\nE   "):
        assert python not in text, python
    summary = [line for line in result.outlines if line.startswith("ERROR ")]
    # The summary line gives the message itself (untrimmed with -vv), starting with the model.
    message = summary[0].split(" - ", 1)[1] if len(summary) == 1 else ""
    assert message.startswith(str(pytester.path)) and expected in message, summary
