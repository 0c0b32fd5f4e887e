"""The in-process engine's short cuts give bit for bit what the code before them gave.

``tests/frozen_code.py`` is ``compare``, ``judge_outputs`` and ``activation_risk`` as they were before
(judging: one scale pass shared with the comparison, skipped counts that must be 0, one equality pass for
the stale check; the activation scan: one count of small values, boolean counts, no callback before each
op); every number, category and message must be the same, NaN and the sign of zero included (compared
through ``repr``).
"""
from __future__ import annotations

import dataclasses
from unittest import mock

import frozen_code
import numpy as np
import pytest
from conftest import COLLAPSE, DEMO, FIXTURES
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pytest_mnn_parity import ParityEngine, RunConfig
from pytest_mnn_parity.core import metrics
from pytest_mnn_parity.core.tolerances import Tolerance, resolve
from pytest_mnn_parity.core.verdict import judge_outputs, prepare_references
from pytest_mnn_parity.mnn.runner import LoadedModel, OpObserver, to_numpy
from pytest_mnn_parity.trace.record import (
    SATURATING_OPS,
    RiskScanner,
    activation_risk,
    record_reference,
)

# Values at every boundary the code tests: zeros of both signs, tiny and huge (float32 squares overflow
# above 1.8e19), NaN and both infinities.
SPECIAL_VALUES = [0.0, -0.0, 1e-30, 1e-6, 0.5, -2.0, 7e4, -1e9, 3e19, -3e38, float("nan"), float("inf"), float("-inf")]
SPECIAL = st.sampled_from(SPECIAL_VALUES)
SPECIAL_FP16 = st.sampled_from([v for v in SPECIAL_VALUES if not abs(v) < float("inf") or abs(v) < 6e4])
DTYPES = st.sampled_from([np.float32, np.float32, np.float64, np.float16, np.int32])


@st.composite
def output_pairs(draw, with_b: bool = False):
    """A reference, a target of the same shape (near it, equal to it, zeroed or unrelated), and with ``with_b``
    the same for a second input set, whose target is sometimes the first one (a stale output)."""
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, max_side=9))
    ref_dtype, tgt_dtype = draw(DTYPES), draw(st.one_of(st.just(None), DTYPES))

    def array(dtype):
        if np.dtype(dtype).kind == "i":
            return draw(hnp.arrays(dtype, shape, elements=st.integers(-5, 5)))
        half = dtype == np.float16
        elements = st.one_of(SPECIAL_FP16 if half else SPECIAL, st.floats(-1e3, 1e3, width=16 if half else 32))
        return draw(hnp.arrays(dtype, shape, elements=elements))

    def target_of(ref):
        dtype = tgt_dtype or ref.dtype
        how = draw(st.sampled_from(["near", "equal", "zero", "other", "partly zero"]))
        if how == "other" or ref.dtype.kind == "i" or np.dtype(dtype).kind == "i":
            return array(dtype)
        with np.errstate(all="ignore"):
            if how == "equal":
                return ref.astype(dtype)
            if how == "zero":
                return np.zeros(shape, dtype)
            noise = draw(hnp.arrays(np.float64, shape, elements=st.floats(-1e-2, 1e-2)))
            out = (ref.astype(np.float64) * (1 + noise)).astype(dtype)
            if how == "partly zero":
                out.reshape(-1)[::2] = 0
            return out

    ref = array(ref_dtype)
    target = target_of(ref)
    if not with_b:
        return target, ref
    ref_b = draw(st.one_of(st.just(ref), st.builds(lambda: array(ref_dtype))))
    target_b = target if draw(st.booleans()) else target_of(ref_b)
    return target, ref, target_b, ref_b


TOLERANCES = st.builds(
    lambda base, atol, rtol, floor, outside, outliers: dataclasses.replace(
        base, atol=atol, rtol=rtol, abs_floor=floor, max_outside_fraction=outside, outlier_limit=outliers),
    st.sampled_from([resolve("CPU", p) for p in ("high", "low", "Low_BF16")]),
    st.sampled_from([0.0, 1e-6, 1e-3, 0.1]), st.sampled_from([0.0, 1e-3, 0.5]),
    st.sampled_from([0.0, 1e-4, 2.0]), st.sampled_from([0.0, 0.01, 0.5]), st.sampled_from([1.0, 4.0, float("inf")]))


def _same(new, old) -> None:
    assert repr(new) == repr(old)


@pytest.mark.parametrize("chunk", [metrics.CHUNK, 7], ids=["one slice", "slices of 7"])
@settings(max_examples=400, deadline=None)
@given(pair=output_pairs(), tol=TOLERANCES)
def test_compare_gives_the_frozen_numbers(chunk, pair, tol: Tolerance):
    target, reference = pair
    with mock.patch.object(metrics, "CHUNK", chunk), mock.patch.object(frozen_code, "CHUNK", chunk):
        new = metrics.compare(target, reference, atol=tol.atol, rtol=tol.rtol, abs_floor=tol.abs_floor)
        old = frozen_code.compare(target, reference, atol=tol.atol, rtol=tol.rtol, abs_floor=tol.abs_floor)
    _same(dataclasses.astuple(new), dataclasses.astuple(old))


@settings(max_examples=400, deadline=None)
@given(outputs=output_pairs(with_b=True), tol=TOLERANCES, floor=st.sampled_from([0.0, 1e-3]))
def test_judge_outputs_gives_the_frozen_verdict(outputs, tol: Tolerance, floor):
    target, ref, target_b, ref_b = outputs
    refs, refs_b = {"y": ref}, {"y": ref_b}
    kwargs = dict(targets_b={"y": target_b}, references_b=refs_b, floors={"y": floor})
    old = frozen_code.judge_outputs({"y": target}, refs, tol, **kwargs)
    _same(judge_outputs({"y": target}, refs, tol, **kwargs), old)
    prepared = prepare_references(refs, refs_b)
    for _ in range(2):  # the prepared references serve again, unchanged
        _same(judge_outputs({"y": target}, refs, tol, prepared=prepared, **kwargs), old)


# (target model, reference model): every collapse the fixtures build (fp16 build against its fp32 one), a
# healthy graph with DFT convolutions, a deep conv stack, an activation beyond fp16, an LSTM.
PAIRS = [(COLLAPSE / f"{name}.fp16.mnn", COLLAPSE / f"{name}.mnn")
         for name in ("zero", "partial_zero", "non_finite", "constant", "stale", "mismatch", "healthy")]
PAIRS += [(DEMO, DEMO), (FIXTURES / "deep" / "deep_fp32.mnn",) * 2,
          (FIXTURES / "risk" / "overflow_activation.mnn",) * 2, (FIXTURES / "control_flow" / "lstm_origin.mnn",) * 2]


@pytest.mark.parametrize("pair", PAIRS, ids=[p[0].name if p[0] == p[1] else f"{p[0].name}-vs-{p[1].name}"
                                              for p in PAIRS])
def test_real_outputs_get_the_frozen_verdicts(pair):
    """Every CPU precision of every fixture pair, judged as the engine judges it (its tolerance, both input
    sets, with and without the measured floors): the very same verdict."""
    target_path, ref_path = pair
    engine = ParityEngine()
    target = engine.model(target_path)
    reference = engine.model(ref_path)
    inputs_a, inputs_b = engine.inputs(target)
    refs = [reference.run(engine.reference_config, x).outputs for x in (inputs_a, inputs_b)]
    floors = engine.noise_floors(reference)
    prepared = prepare_references(refs[0], refs[1])  # as the engine judges every configuration
    categories = set()
    for precision in ("normal", "high", "low", "Low_BF16"):
        config = RunConfig("CPU", precision)
        tol = engine.tolerance(config, model_path=target.path)
        run_a, run_b = (target.run(config, x) for x in (inputs_a, inputs_b))
        assert run_a.ok and run_b.ok
        for measured in ({}, floors):
            kwargs = dict(targets_b=run_b.outputs, references_b=refs[1], floors=measured)
            new = judge_outputs(run_a.outputs, refs[0], tol, **kwargs)
            _same(new, frozen_code.judge_outputs(run_a.outputs, refs[0], tol, **kwargs))
            _same(judge_outputs(run_a.outputs, refs[0], tol, prepared=prepared, **kwargs), new)
            categories.add(new.category.value)
    engine.release(target_path)
    engine.release(ref_path)
    assert categories  # judged at least once


@st.composite
def activations(draw):
    """Activations of every float width with values at fp16's limits: zeros, tiny ones, beyond its max."""
    dtype = draw(st.sampled_from([np.float32, np.float64, np.float16]))
    half = dtype == np.float16
    near_zero = st.floats(-2.0 ** -13, 2.0 ** -13, width=16 if half else 32)
    wide = st.floats(-65504.0, 65504.0, width=16) if half else st.floats(-2.0 ** 17, 2.0 ** 17, width=32)
    return draw(hnp.arrays(dtype, hnp.array_shapes(max_side=12),
                           elements=st.one_of(SPECIAL_FP16 if half else SPECIAL, near_zero, wide)))


@settings(max_examples=400, deadline=None)
@given(values=activations(), op_type=st.sampled_from(["Convolution", "Raster", *sorted(SATURATING_OPS)[:2]]))
def test_activation_risk_gives_the_frozen_risks(values, op_type):
    _same(activation_risk("op", op_type, values), frozen_code.activation_risk("op", op_type, values))


RISK_MODELS = [COLLAPSE / f"{name}.mnn" for name in ("zero", "partial_zero", "non_finite", "constant", "stale")]
RISK_MODELS += [FIXTURES / "risk" / "overflow_activation.mnn", FIXTURES / "sweep" / "broken.mnn", DEMO,
                FIXTURES / "deep" / "deep_fp32.mnn", FIXTURES / "control_flow" / "lstm_origin.mnn"]
# (if_branch.mnn and lstm_while.mnn: their session runs call no op back.)


class _Outputs(OpObserver):
    def __init__(self):
        self.arrays = []

    def after(self, tensors, name, op_type):
        self.arrays += [(name, op_type, to_numpy(t)) for t in tensors]


@pytest.mark.parametrize("path", RISK_MODELS, ids=[p.name for p in RISK_MODELS])
def test_the_risk_scan_finds_what_the_traced_reference_finds(path):
    """The scan counted after each op only finds, loop outputs settled, what the per-layer trace (called before
    and after each op) finds; and the scan of every real activation is the frozen one's."""
    model = LoadedModel(path)
    engine = ParityEngine()
    inputs = engine.inputs(model)[0]
    scanner = RiskScanner()
    model.run(engine.reference_config, inputs, observer=scanner)
    trace, _ = record_reference(model, engine.reference_config, inputs)
    try:
        _same(scanner.risks, trace.risks)
    finally:
        trace.close()
    outputs = _Outputs()
    model.run(engine.reference_config, inputs, observer=outputs)
    assert outputs.arrays
    for name, op_type, array in outputs.arrays:
        _same(activation_risk(name, op_type, array), frozen_code.activation_risk(name, op_type, array))


def test_the_weight_scan_reads_a_model_once_for_all_of_its_input_sets(monkeypatch):
    """The fp16 weight scan depends on the file alone: a model's named input sets (a reference each) share one
    scan, and every result still carries the risks (zero.mnn's tiny weights flush in fp16)."""
    from pytest_mnn_parity.engine import engine as engine_module
    from pytest_mnn_parity.inputs.sets import InputSet

    scanned = []
    real_scan = engine_module.fp16_weight_risks
    monkeypatch.setattr(engine_module, "fp16_weight_risks", lambda path, **kw: scanned.append(path) or real_scan(
        path, **kw))
    path = COLLAPSE / "zero.mnn"
    engine = ParityEngine()
    generated = engine.inputs(engine.model(path))[0]
    sets = [InputSet.from_arrays(f"set{i}", {k: v * (i + 1) for k, v in generated.items()}) for i in range(3)]
    results = [engine.check(path, RunConfig("CPU", "low"), input_set=s) for s in (None, *sets)]
    assert len(scanned) == 1
    assert results[0].weight_risks and all(r.weight_risks == results[0].weight_risks for r in results)
    assert all(r.weight_risks is not results[0].weight_risks for r in results[1:])  # each result owns its list
    engine.release(path)
    engine.check(path, RunConfig("CPU", "low"))
    assert len(scanned) == 2  # released with the model
