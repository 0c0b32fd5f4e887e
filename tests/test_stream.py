"""Streaming models: the declaration, and step-by-step runs that feed back each side's own state."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_mnn_parity import ParityEngine, ParitySettings, RunConfig
from pytest_mnn_parity.inputs.stream_spec import DEFAULT_STEPS, StreamSpec, parse_stream, spec_for
from pytest_mnn_parity.core.verdict import Category

from conftest import FIXTURES, read_report

STEP = FIXTURES / "stream" / "rnn_step.mnn"
STEP_FP16 = FIXTURES / "stream" / "rnn_step.fp16.mnn"
HIGH = RunConfig("CPU", "high")
STATE = "h_out->h;steps=10"

# -- the declaration -------------------------------------------------------------------------

_NAME = st.text(alphabet=st.characters(whitelist_categories=("L", "N"), whitelist_characters="_./:-"),
                min_size=1, max_size=12)


@st.composite
def specs(draw):
    outs = draw(st.lists(_NAME, min_size=1, max_size=4, unique=True))
    ins = draw(st.lists(_NAME, min_size=len(outs), max_size=len(outs), unique=True))
    model = draw(st.none() | st.sampled_from(["vad*.mnn", "models/decoder_step.mnn", "*.mnn"]))
    return StreamSpec(tuple(zip(outs, ins)), draw(st.integers(1, 500)), model)


@given(specs())
def test_declaration_text_round_trips(spec):
    assert parse_stream(spec.text()) == spec
    mapping = {"state": dict(spec.state), "steps": spec.steps, **({"model": spec.model} if spec.model else {})}
    assert StreamSpec.from_mapping(mapping) == spec


def test_declaration_forms():
    assert parse_stream("h_out->h") == StreamSpec((("h_out", "h"),), DEFAULT_STEPS)
    assert parse_stream(" h_out -> h , c_out->c ; steps = 16 ") == StreamSpec((("h_out", "h"), ("c_out", "c")), 16)
    assert parse_stream("model=vad*.mnn;h_out->h").model == "vad*.mnn"


@pytest.mark.parametrize(("text", "message"), [
    ("steps=8", "declares no state"),
    ("h_out=h", "unknown key 'h_out'"),
    ("h_out>h", "is not OUTPUT->INPUT"),
    ("h_out->h;steps=0", "steps must be between 1"),
    ("h_out->h;steps=-2", "steps must be a positive integer"),
    ("h_out->h;c_out->h", "state input 'h' is named twice"),
    ("h_out->h;model=", "model= needs a file name or glob"),
])
def test_bad_declarations_name_the_problem(text, message):
    with pytest.raises(ValueError, match=message) as info:
        parse_stream(text)
    assert str(info.value).startswith(f"--mnn-stream {text!r}")


def test_scoped_declaration_wins_and_unscoped_applies_everywhere():
    scoped, unscoped = parse_stream("model=rnn_*.mnn;h_out->h"), parse_stream("a->b")
    assert spec_for([unscoped, scoped], "models/rnn_step.mnn") is scoped
    assert spec_for([unscoped, scoped], "models/other.mnn") is unscoped
    assert spec_for([scoped], "models/other.mnn") is None
    assert parse_stream("model=stream/rnn_step.mnn;h_out->h").applies_to(STEP)


# -- running streams on real models ----------------------------------------------------------

def _engine(**kwargs) -> ParityEngine:
    return ParityEngine(ParitySettings(streams=(parse_stream(STATE),), **kwargs))


@pytest.mark.parametrize("api", ["session", "module"])
def test_drift_too_small_for_one_step_is_caught_over_the_stream(api):
    """rnn_step.fp16's decay is 0.99951 instead of 0.9999: one step passes, the stream does not."""
    single = ParityEngine(ParitySettings(reference=str(STEP), api=api)).check(STEP_FP16, HIGH)
    assert single.category is Category.OK, single.message
    result = _engine(reference=str(STEP), api=api).check(STEP_FP16, HIGH, reproduce="pytest ...")
    assert result.category is Category.MISMATCH
    stream = result.stream
    first = stream["first_failing_step"]
    assert first is not None and first > 0 and stream["first_failing_output"] == "h_out"
    steps = stream["per_step"]
    assert len(steps) == 10 and all(s["category"] == "ok" for s in steps[:first])
    assert steps[0]["outputs"]["h_out"]["max_abs"] == 0.0  # W is exact in fp16: step 0 cannot differ
    drift = [s["outputs"]["h_out"]["max_abs"] for s in steps]
    assert all(b > a for a, b in zip(drift, drift[1:]))  # it grows step by step
    assert result.message.startswith(f"mismatch on CPU-high{' (module API)' if api == 'module' else ''} "
                                     f"at stream step {first} (of 0..9): output 'h_out'")
    assert f"first failing step: {first} (of steps 0..9), output 'h_out'" in result.message
    assert result.verdict.outputs[0].metrics is not None  # the failing step's outputs are the item's


@pytest.mark.parametrize("precision", ["normal", "low"])
def test_a_healthy_stream_passes_every_step_on_both_apis(precision):
    engine = _engine(api="both")
    session = engine.check(STEP, RunConfig("CPU", precision), api="session")
    module = engine.check(STEP, RunConfig("CPU", precision), api="module")
    for result in (session, module):
        assert result.category is Category.OK, result.message
        assert result.stream["first_failing_step"] is None and result.stream["steps_run"] == 10
    assert "stream of 10 steps" in session.input_set


def test_state_is_really_fed_back():
    """The stream's step outputs equal a hand-written loop over the raw model with the state fed back."""
    engine = _engine()
    model = engine.model(STEP)
    spec = engine.settings.streams[0]
    reference = engine.streams.reference(model, spec)
    h = np.zeros((1, 8), np.float32)
    for k, step in enumerate(engine.streams._step_inputs(model, spec)):
        out = model.run(RunConfig("CPU", "high", 1), {**step, "h": h}).outputs
        np.testing.assert_array_equal(out["h_out"], reference.steps[k]["h_out"])
        h = out["h_out"]
    assert np.abs(h).max() > 1.0  # the state accumulated: it was not reset to zeros each step


@pytest.mark.parametrize(("declaration", "reason"), [
    ("state->h", "the model has no output 'state' (its outputs: "),
    ("h_out->hidden", "the model has no input 'hidden' (its outputs: h_out, y; its inputs: h, x)"),
    ("y->h", "state output 'y' has shape (1, 2) but state input 'h' takes (1, 8)"),
])
def test_a_declaration_that_does_not_fit_the_model_is_a_model_error(declaration, reason):
    engine = ParityEngine(ParitySettings(streams=(parse_stream(declaration),)))
    result = engine.check(STEP, HIGH)
    assert result.category is Category.MODEL_ERROR
    assert str(STEP) in result.message and reason in result.message and "--mnn-stream" in result.message


# -- the plugin ------------------------------------------------------------------------------

def test_stream_option_report_and_reproduce(pytester, models):
    import shlex

    models("stream/rnn_step.fp16.mnn", "stream/rnn_step.mnn")
    args = ["--mnn-only", "--mnn-backends", "CPU", "--mnn-precisions", "high", "--mnn-model", "rnn_step.fp16.mnn",
            "--mnn-reference", "rnn_step.mnn"]
    pytester.runpytest(*args).assert_outcomes(passed=1)  # one step at a time: within tolerance
    result = pytester.runpytest(*args, "--mnn-stream", STATE, "--mnn-report", "r.json")
    result.assert_outcomes(failed=1)
    rec = read_report(pytester.path / "r.json")["results"][0]
    assert rec["stream"]["first_failing_step"] > 0 and rec["stream"]["first_failing_output"] == "h_out"
    assert rec["stream"]["declaration"] == STATE and len(rec["stream"]["per_step"]) == 10
    assert read_report(pytester.path / "r.json")["settings"]["streams"] == [STATE]
    command = next(line.split("reproduce: ", 1)[1] for line in result.outlines if "reproduce: " in line)
    assert f"--mnn-stream '{STATE}'" in command
    pytester.runpytest(*shlex.split(command)[1:]).assert_outcomes(failed=1)


def test_stream_ini_key_and_bad_value(pytester, models):
    models("stream/rnn_step.mnn")
    pytester.makeini(f"[pytest]\nmnn_stream =\n    model=rnn_step.mnn;{STATE}\n")
    ok = pytester.runpytest("--mnn-only", "--mnn-backends", "CPU", "--mnn-precisions", "low",
                            "--mnn-model", "rnn_step.mnn", "--mnn-report", "r.json")
    ok.assert_outcomes(passed=1)
    assert read_report(pytester.path / "r.json")["results"][0]["stream"]["steps_run"] == 10
    bad = pytester.runpytest("--mnn-only", "--mnn-model", "rnn_step.mnn", "--mnn-stream", "h_out=h")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    assert "--mnn-stream 'h_out=h': unknown key 'h_out'" in bad.stderr.str()


def test_sidecar_stream_table(pytester, models):
    models("stream/rnn_step.fp16.mnn", "stream/rnn_step.mnn")
    args = ["--mnn-only", "--mnn-backends", "CPU", "--mnn-precisions", "high", "--mnn-model", "rnn_step.fp16.mnn",
            "--mnn-reference", "rnn_step.mnn", "--mnn-report", "r.json"]
    (pytester.path / "rnn_step.fp16.mnn.toml").write_text('[stream]\nstate = { h_out = "h" }\nsteps = 10\n')
    result = pytester.runpytest(*args)
    result.assert_outcomes(failed=1)
    stream = read_report(pytester.path / "r.json")["results"][0]["stream"]
    assert stream["declared_by"] == "sidecar rnn_step.fp16.mnn.toml [stream]" and stream["steps"] == 10
    assert stream["first_failing_step"] > 0 and stream["first_failing_output"] == "h_out"
    # The option wins over the sidecar: 3 steps stay within tolerance.
    pytester.runpytest(*args, "--mnn-stream", "h_out->h;steps=3").assert_outcomes(passed=1)
    assert read_report(pytester.path / "r.json")["results"][0]["stream"]["declared_by"] == "--mnn-stream"
    (pytester.path / "rnn_step.fp16.mnn.toml").write_text('[stream]\nstate = { state = "h" }\n')
    wrong = pytester.runpytest(*args)
    wrong.assert_outcomes(errors=1)
    assert ("sidecar rnn_step.fp16.mnn.toml [stream] 'state->h;steps=8': the model has no output 'state'"
            in wrong.stdout.str())
    (pytester.path / "rnn_step.fp16.mnn.toml").write_text('[stream]\nstate = { h_out = "h" }\nsteps = "ten"\n')
    bad = pytester.runpytest(*args)
    assert "steps must be an integer, got 'ten'" in bad.stdout.str() and "rnn_step.fp16.mnn.toml" in bad.stdout.str()
    assert bad.ret != 0
