"""Both MNN runtime APIs against real models: the Module API, the auto choice, backend honesty, interfaces."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from pytest_mnn_parity import ParityEngine, ParitySettings, RunConfig, backends
from pytest_mnn_parity.engine.apis import NO_TRACE, TRACE_VIA_SESSION, parse_api
from pytest_mnn_parity.mnn.model import ModelError
from pytest_mnn_parity.mnn.module_runner import NO_BACKEND_READBACK, ModuleModel
from pytest_mnn_parity.mnn.runner import LoadedModel
from pytest_mnn_parity.core.verdict import Category, judge_output
from pytest_mnn_parity.core.tolerances import TIERS

from conftest import COLLAPSE, DEMO, FIXTURES

IF_BRANCH = FIXTURES / "control_flow" / "if_branch.mnn"
LSTM_WHILE = FIXTURES / "control_flow" / "lstm_while.mnn"
LSTM_ORIGIN = FIXTURES / "control_flow" / "lstm_origin.mnn"
INTERFACE = FIXTURES / "interface"
CONTROL_FLOW = [IF_BRANCH, LSTM_WHILE]
LOW = RunConfig("CPU", "low")


@pytest.fixture(scope="module")
def auto():
    return ParityEngine()


@pytest.fixture(scope="module")
def session_only():
    return ParityEngine(ParitySettings(api="session"))


@pytest.fixture(scope="module")
def both():
    return ParityEngine(ParitySettings(api="both"))


def _lstm_reference(x: np.ndarray) -> dict[str, np.ndarray]:
    """ONNX LSTM semantics (gates i, o, f, c) in float64 from the fixture's own ONNX weights."""
    model = onnx.load(FIXTURES / "onnx" / "lstm_seq.onnx")
    w = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    weights, recurrent, bias = w["lstm_W"][0], w["lstm_R"][0], w["lstm_B"][0]
    hidden = recurrent.shape[1]
    h, c, ys = np.zeros((1, hidden)), np.zeros((1, hidden)), []
    sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    for step in x.astype(np.float64):
        gates = step @ weights.T + h @ recurrent.T + bias[:4 * hidden] + bias[4 * hidden:]
        i, o, f, g = np.split(gates, 4, axis=1)
        c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
        h = sigmoid(o) * np.tanh(c)
        ys.append(h)
    return {"y": np.stack(ys)[:, None], "y_h": h[None], "y_c": c[None]}


# -- the auto choice and the session API's failure ---------------------------------------

@pytest.mark.parametrize("path", CONTROL_FLOW, ids=lambda p: p.name)
def test_auto_runs_control_flow_on_the_module_api_and_says_why(auto, path):
    result = auto.check(path, LOW)
    assert result.category is Category.OK, result.message
    assert result.api == "module"
    assert "the session API cannot run this model" in result.api_reason
    assert "COMPUTE_SIZE_ERROR" in result.api_reason and "Compute Shape Error for" in result.api_reason
    assert result.verdict.outputs and all(v.metrics is not None and v.metrics.size > 0 for v in result.verdict.outputs)


@pytest.mark.parametrize("path", CONTROL_FLOW, ids=lambda p: p.name)
def test_session_api_on_control_flow_is_a_named_runtime_error_not_empty_tensors(session_only, path):
    result = session_only.check(path, LOW)
    assert result.category is Category.RUNTIME_ERROR and result.rc == 3
    assert result.verdict.outputs == []  # nothing was judged from the empty tensors
    assert "runSession returned 3 (COMPUTE_SIZE_ERROR)" in result.message
    assert "MNN said: Compute Shape Error for" in result.message
    assert "--mnn-api auto or module" in result.message and "--useOriginRNNImpl" in result.message


def test_module_outputs_are_the_right_numbers():
    """Independent of MNN: the If takes its then-branch (image*2) for positive inputs; the LSTM matches numpy."""
    engine = ParityEngine()
    if_model = engine.model(IF_BRANCH, "module")
    image = engine.inputs(if_model)[0]["image"]
    np.testing.assert_allclose(if_model.run(LOW, {"image": image}).outputs["out"], image * 2, rtol=1e-6)
    lstm = engine.model(LSTM_WHILE, "module")
    x = engine.inputs(lstm)[0]["x"]
    outputs = lstm.run(LOW, {"x": x}).outputs
    expected = _lstm_reference(x)
    assert set(outputs) == set(expected) == {"y", "y_h", "y_c"}
    for name, value in expected.items():
        assert outputs[name].shape == value.shape
        np.testing.assert_allclose(outputs[name], value, atol=1e-5)


def test_use_origin_rnn_impl_runs_in_a_session_and_both_conversions_agree(auto):
    result = auto.check(LSTM_ORIGIN, LOW)
    assert result.category is Category.OK and result.api == "session", result.message
    assert "the session API runs this model" in result.api_reason
    assert {v.name for v in result.verdict.outputs} == {"y", "y_h", "y_c"}  # every output judged
    origin = LoadedModel(LSTM_ORIGIN)
    x = auto.inputs(origin)[0]
    plain = origin.run(LOW, x).outputs
    looped = ModuleModel(LSTM_WHILE).run(LOW, x).outputs
    for name in plain:
        np.testing.assert_allclose(looped[name], plain[name], atol=1e-6)


# -- both: the two APIs against each other --------------------------------------------------

@pytest.mark.parametrize("path", [DEMO, FIXTURES / "multi_io.mnn", LSTM_ORIGIN], ids=lambda p: p.name)
def test_both_compares_the_module_api_with_the_session_api(both, path):
    session = both.check(path, LOW, api="session")
    module = both.check(path, LOW, api="module")
    assert session.api == "session" and module.api == "module" and module.api_axis
    assert session.category is Category.OK and module.category is Category.OK, module.message
    cross = module.cross_api
    assert cross["compared"] and cross["category"] == "ok"
    assert set(cross["outputs"]) == {v.name for v in session.verdict.outputs}
    for name, metrics in cross["outputs"].items():
        assert metrics["cosine"] > 0.9999 and metrics["max_abs"] <= 1e-5, name


def test_both_on_control_flow_says_the_session_side_cannot_run(both):
    module = both.check(IF_BRANCH, LOW, api="module")
    assert module.category is Category.OK
    assert module.cross_api["compared"] is False
    assert "the session API cannot run this model: runSession returned 3" in module.cross_api["reason"]
    assert both.check(IF_BRANCH, LOW, api="session").category is Category.RUNTIME_ERROR


def test_api_mismatch_when_the_apis_disagree(monkeypatch):
    """FAKE session outputs: on this CPU both APIs compute bit-identical numbers, so the disagreement
    (seen in the field: 9e-3 on a detector) is injected into the session side only."""
    engine = ParityEngine(ParitySettings(api="both"))
    session = engine.model(DEMO)
    real_run = session.run

    def fake_run(config, inputs, observer=None):
        out = real_run(config, inputs, observer)
        if config == LOW:
            out.outputs = {k: v + np.float32(0.05) for k, v in out.outputs.items()}
        return out

    monkeypatch.setattr(session, "run", fake_run)
    result = engine.check(DEMO, LOW, api="module", reproduce="pytest ...")
    assert result.category is Category.API_MISMATCH
    assert result.verdict.passed  # the module item itself matches its reference
    assert result.message.startswith("api_mismatch on CPU-low (module API): output 'inpainted' vs the session API")
    assert "vs session API: mismatch" in result.message and "reproduce: pytest ..." in result.message


# -- backend honesty on the Module path -----------------------------------------------------

def test_module_backend_is_reported_unknown_never_guessed():
    result = ParityEngine(ParitySettings(api="module")).check(DEMO, LOW)
    assert result.category is Category.OK
    assert result.backend_used is None and result.forward_type is None
    assert NO_BACKEND_READBACK in result.backend_note and "found CPU available" in result.backend_note


def test_module_fallback_is_caught_from_what_mnn_says(monkeypatch):
    """FAKE discovery result: METAL claimed available; MNN's runtime manager really falls back to CPU
    and says so (``Can't Find type=1 backend, use 0 instead``), which must fail the item."""
    monkeypatch.setitem(backends._CACHE, "METAL", backends.BackendStatus("METAL", True, 1, "FAKE: METAL probed"))
    result = ParityEngine(ParitySettings(api="module")).check(DEMO, RunConfig("METAL", "high"))
    assert result.category is Category.BACKEND_FALLBACK
    assert result.backend_used == "CPU" and result.forward_type == 0
    assert "Can't Find type=1 backend, use 0 instead" in result.backend_note


# -- tracing ------------------------------------------------------------------------------

def test_module_items_are_traced_through_the_session_api_where_it_runs():
    engine = ParityEngine(ParitySettings(api="module", reference=str(COLLAPSE / "zero.mnn")))
    result = engine.check(COLLAPSE / "zero.fp16.mnn", RunConfig("CPU", "high"))
    assert result.category is Category.ZERO_OUTPUT
    assert result.trace.method.startswith(TRACE_VIA_SESSION + ": MNN session per-op callbacks")
    assert result.first_divergent_layer["name"] == "tiny_conv"
    assert "through the session API on the same configuration" in result.message


def test_module_items_say_they_are_not_traced_where_no_session_runs():
    engine = ParityEngine(ParitySettings(layers="always"))
    result = engine.check(IF_BRANCH, LOW)
    assert result.api == "module" and result.trace is None and result.trace_note == NO_TRACE


# -- interfaces: names, shapes and dtypes before values --------------------------------------

@pytest.mark.parametrize("api", ["session", "module"])
@pytest.mark.parametrize(("target", "detail"), [
    ("conv_out_flat.mnn", "output 'out': shape (1, 256) but the reference has (1, 4, 8, 8)"),
    ("conv_out_int.mnn", "output 'out': dtype int32 but the reference has float32 (shape (1, 4, 8, 8))"),
])
def test_wrong_shape_or_dtype_is_a_shape_mismatch_even_when_values_look_right(api, target, detail):
    engine = ParityEngine(ParitySettings(api=api, reference=str(INTERFACE / "conv_out.mnn")))
    result = engine.check(INTERFACE / target, RunConfig("CPU", "high"))
    assert result.category is Category.SHAPE_MISMATCH
    assert detail in result.message.splitlines()[0]
    # The values themselves are the reference's (reshaped, or truncated to int): plausible, yet refused.
    model, reference = engine.model(INTERFACE / target, api), engine.model(INTERFACE / "conv_out.mnn", api)
    inputs = engine.inputs(model)[0]
    got, want = model.run(RunConfig("CPU", "high"), inputs).outputs["out"], reference.run(
        RunConfig("CPU", "high"), inputs).outputs["out"]
    np.testing.assert_allclose(got.reshape(want.shape).astype(np.float32), want, atol=1.0)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.bool_])
def test_judge_output_refuses_an_int_output_for_a_float_reference_before_comparing_values(dtype):
    reference = np.arange(12, dtype=np.float32).reshape(3, 4) % 2
    verdict = judge_output("y", reference.astype(dtype), reference, TIERS["fp32"])
    assert verdict.category is Category.SHAPE_MISMATCH and verdict.metrics is None
    assert f"dtype {np.dtype(dtype)} but the reference has float32" in verdict.detail
    back = judge_output("y", reference, reference.astype(dtype), TIERS["fp32"])
    assert back.category is Category.SHAPE_MISMATCH and "but the reference has" in back.detail


@pytest.mark.parametrize(("target", "reference"), [(np.int32, np.int64), (np.float32, np.float64)])
def test_judge_output_does_not_refuse_mnns_narrower_storage(target, reference):
    """MNN stores int64 as int32 and float64 as float32 where ONNX Runtime keeps them: same values, same verdict."""
    values = np.arange(12).reshape(3, 4)
    verdict = judge_output("y", values.astype(target), values.astype(reference), TIERS["fp32"])
    assert verdict.category is Category.OK and verdict.metrics.max_abs == 0


# -- the Module runner's own edges -----------------------------------------------------------

def test_module_inputs_keep_their_dtype():
    """pymnn's expr.const reinterprets bytes: int inputs must arrive as int32, not garbled int64."""
    model = ModuleModel(FIXTURES / "multi_io.mnn")
    ids = np.array([[0, 3, 5, 7]], dtype=np.int64)
    out = model.run(LOW, {"features": np.zeros((1, 16), np.float32), "ids": ids}).outputs
    assert out["ids_out"].dtype == np.int32
    np.testing.assert_array_equal(out["ids_out"], ids + 1)


def test_a_failed_forward_is_named_by_mnn_error():
    model = ModuleModel(DEMO)
    bad = {"image": np.zeros((1, 3, 9, 9), np.float32), "mask": np.zeros((1, 1, 9, 9), np.float32)}
    run = model.run(LOW, bad)
    assert not run.ok and run.rc == 3 and run.outputs == {}
    assert run.failure == "Module.forward returned 0 of 1 outputs (MNN error 3, COMPUTE_SIZE_ERROR)"


def test_module_api_needs_shapes_for_dynamic_inputs_like_the_session_api():
    with pytest.raises(ModelError, match=r"--mnn-input-shape image=1x3x\{H\}x\{W\}"):
        ModuleModel(FIXTURES / "dynamic" / "dynamic_hw.mnn")
    result = ParityEngine(ParitySettings(api="module", input_shapes={"image": (1, 3, 12, 20)})).check(
        FIXTURES / "dynamic" / "dynamic_hw.mnn", LOW)
    assert result.category is Category.OK and result.verdict.outputs[0].metrics.shape == (1, 8, 12, 20)


@pytest.mark.parametrize("content", [b"\x00" * 64, bytes(range(256)) * 8])
def test_bad_files_are_model_errors_on_the_module_api(tmp_path, content):
    path = tmp_path / "bad.mnn"
    path.write_bytes(content)
    result = ParityEngine(ParitySettings(api="module")).check(path, LOW)
    assert result.category is Category.MODEL_ERROR and result.api == "module"
    assert str(path) in result.message and "flatbuffer verification failed" in result.message


def test_api_mode_is_validated():
    assert [parse_api(m) for m in ("AUTO", " both ", "Module")] == ["auto", "both", "module"]
    with pytest.raises(ValueError, match="--mnn-api: expected one of auto, session, module, both"):
        parse_api("interpreter")
