"""The short cuts taken for speed give exactly what the plain definitions give."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from pytest_mnn_parity.core.metrics import compare
from pytest_mnn_parity.mnn.weights import FP16_MAX, FP16_MIN_NORMAL, FP16_MIN_SUBNORMAL, WeightRisk, classify_fp16

# Values around every boundary the code tests: 0, fp16's subnormal and normal limits, its max.
SPECIAL = st.sampled_from([0.0, -0.0, 1e-30, 3e-8, 1e-6, 7e-5, 0.5, -2.0, 6e4, 7e4, -1e9, float("nan"), float("inf")])
ARRAYS = hnp.arrays(np.float32, st.integers(1, 40), elements=st.one_of(SPECIAL, st.floats(-1e6, 1e6, width=32)))


def _plain_fp16_risks(values: np.ndarray, min_fraction: float) -> list[WeightRisk]:
    a = np.abs(values.astype(np.float32))
    risks = []
    for kind, mask, worst in (("flush", (a > 0) & (a < FP16_MIN_SUBNORMAL), np.min),
                              ("subnormal", (a > 0) & (a < FP16_MIN_NORMAL), np.min),
                              ("overflow", a > FP16_MAX, np.max)):
        if kind == "subnormal" and not 2 * int(mask.sum()) > int((a > 0).sum()):
            continue
        count = int(mask.sum())
        if count and count / a.size >= min_fraction:
            risks.append(WeightRisk("op", "Convolution", "weight", count, a.size, kind, float(worst(a[mask]))))
    return risks


@settings(max_examples=300, deadline=None)
@given(ARRAYS, st.sampled_from([0.0, 0.2, 1.0]))
def test_fp16_weight_classification_matches_the_plain_masks(values, min_fraction):
    assert classify_fp16("op", "Convolution", "weight", values, min_fraction) == _plain_fp16_risks(values, min_fraction)


@settings(max_examples=300, deadline=None)
@given(ARRAYS, ARRAYS, st.sampled_from([0.0, 1e-3]))
def test_relative_error_and_zero_counts_match_their_definitions(target, reference, rtol):
    n = min(target.size, reference.size)
    t, r = target[:n], reference[:n]
    m = compare(t, r, atol=1e-4, rtol=rtol)
    finite = np.isfinite(t) & np.isfinite(r)
    tf, rf = np.where(finite, t, 0).astype(np.float32), np.where(finite, r, 0).astype(np.float32)
    diff, scale = np.abs(tf - rf), np.abs(rf)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        ratios = diff[scale > 0] / scale[scale > 0]
    with np.errstate(invalid="ignore"):
        new_nonfinite = bool((~finite & ~((t == r) | (np.isnan(t) & np.isnan(r)))).any())
    # A NaN/Inf the reference lacks makes every error unbounded (see metrics).
    assert m.max_rel == (float("inf") if new_nonfinite else float(ratios.max()) if ratios.size else 0.0)
    assert m.ref_zero_fraction == int(np.count_nonzero(r == 0)) / n
    assert m.zero_fraction == int(np.count_nonzero(t == 0)) / n


def test_nonfinite_inputs_are_reported_for_every_configuration_and_rescanned_when_replaced():
    from pytest_mnn_parity.engine.engine import ParityEngine
    from pytest_mnn_parity.mnn.runner import RunConfig

    from conftest import FIXTURES

    healthy = FIXTURES / "collapse" / "healthy.mnn"
    engine = ParityEngine()
    low, high = RunConfig("CPU", "low"), RunConfig("CPU", "high")
    assert engine.check(healthy, low).inputs_nonfinite is None
    a, b = (dict(s) for s in engine.inputs(engine.model(healthy)))
    a["image"] = a["image"].copy()
    a["image"][0, 0, 0, :2] = np.nan
    engine.provide_inputs(healthy, a, b)  # new arrays: scanned again, not the cached "all finite"
    first, second = engine.check(healthy, low), engine.check(healthy, high)
    expected = {"image": {"nan": 2, "inf": 0, "size": a["image"].size, "sets": "A"}}
    assert first.inputs_nonfinite == second.inputs_nonfinite == expected
    assert first.inputs_nonfinite is not second.inputs_nonfinite  # each result owns its report
