"""An LSTM kept as one op (``--useOriginRNNImpl``): tensors MNN's callback hands over unwritten are not judged.

MNN's geometry (``GeometryLSTM.cpp``) computes the ONNX LSTM as loop commands.
The first time step's loop declares outputs ``{Y, Cell, O, I, C, F}`` and
writes neither ``O`` nor ``F``; the loop of the later steps lists ``O`` among
its inputs ``{Gate, R, O, Cell}`` without reading it.  Those tensors hold
uninitialised or stale memory, so they must never be compared or risk-scanned.
"""
from __future__ import annotations

import numpy as np

from pytest_mnn_parity import ParityEngine, ParitySettings, RunConfig
from pytest_mnn_parity.mnn.runner import reference_config, LoadedModel
from pytest_mnn_parity.trace.record import RiskScanner, record_reference

from conftest import FIXTURES, read_report
from test_module_api import _lstm_reference

# Where the engine runs the reference with the default --mnn-threads (4).
REFERENCE = reference_config(4)

LSTM_ORIGIN = FIXTURES / "control_flow" / "lstm_origin.mnn"


def _loops(trace):
    """The LSTM's loop ops in execution order, by their output count: gates matmul (1), first step (6), rest (6)."""
    keys = [f"{n}#{o}" for n, t, o in trace.order if t == "While"]
    counts = [len([k for k in trace.files if k[0] == key and k[1] == "out"]) +
              len([k for k in trace.unobservable if k[0] == key and k[1] == "out"]) for key in keys]
    return keys, counts


def test_unwritten_loop_tensors_are_found_on_a_fresh_session():
    model = LoadedModel(LSTM_ORIGIN)  # fresh: its scratch memory is uninitialised, not just stale
    inputs = ParityEngine().inputs(model)[0]
    trace, run = record_reference(model, REFERENCE, inputs)
    try:
        keys, counts = _loops(trace)
        assert counts == [1, 6, 6], (keys, counts)
        first_step, later_steps = keys[1], keys[2]
        assert set(trace.unobservable) == {(first_step, "out", 2), (first_step, "out", 5), (later_steps, "in", 2)}
        assert all(why.startswith("not observable") for why in trace.unobservable.values())
        # What the loop does write is still recorded and right: Y's first time step and the cell state.
        expected = _lstm_reference(inputs["x"])
        y = np.asarray(trace.load(first_step, "out", 0))
        np.testing.assert_allclose(y[0].ravel(), expected["y"][0].ravel(), atol=1e-5)
        assert (first_step, "out", 2) not in trace.files
        # The probe (a run with poisoned scratch tensors) leaves the model's results intact.
        after = model.run(REFERENCE, inputs).outputs
        for name in ("y", "y_h", "y_c"):
            np.testing.assert_allclose(after[name].ravel(), expected[name].ravel(), atol=1e-5)
            np.testing.assert_array_equal(after[name], run.outputs[name])
    finally:
        trace.close()


def test_risk_scan_ignores_unwritten_tensors():
    """LSTM activations lie in (-1, 1): no fp16 risk is real; the unwritten scratch used to give 1e31 'overflows'."""
    model = LoadedModel(LSTM_ORIGIN)
    scanner = RiskScanner()
    model.run(REFERENCE, ParityEngine().inputs(model)[0], observer=scanner)
    assert scanner.risks == []
    assert ParityEngine().check(LSTM_ORIGIN, RunConfig("CPU", "low")).fp16_risks == []


def test_trace_lists_not_observable_tensors_and_judges_the_rest(pytester, models):
    result = ParityEngine(ParitySettings(layers="always")).check(LSTM_ORIGIN, RunConfig("CPU", "low"))
    trace = result.trace
    assert len(trace.not_observable) == 3 and trace.first_divergent is None
    by_name = {layer.name: layer for layer in trace.layers}
    hidden = [(layer, o) for layer in trace.layers for o in layer.outputs + layer.inputs if not o.observable]
    assert len(hidden) == 3 and all(not o.failed and o.metrics is None and o.quick is None for _, o in hidden)
    first_step = next(layer for layer in trace.layers if len(layer.outputs) == 6)
    assert first_step.as_dict()["not_observable"] == [2, 5]
    assert all(o.metrics is not None or o.quick is not None for o in first_step.outputs if o.observable)
    assert all(layer.inputs_ok for layer in by_name.values())

    models("control_flow/lstm_origin.mnn")
    run = pytester.runpytest("--mnn-only", "--mnn-backends", "CPU", "--mnn-precisions", "low", "--mnn-model",
                             "lstm_origin.mnn", "--mnn-layers", "always", "--mnn-report", "l.json")
    run.assert_outcomes(passed=1)
    assert "fp16 risk in lstm_origin.mnn" not in run.stdout.str()
    rec = read_report(pytester.path / "l.json")["results"][0]
    listed = rec["layer_trace"]["not_observable"]
    assert len(listed) == 3 and all(why.startswith("not observable") for why in listed.values())
    assert rec["fp16_risks"] == []
