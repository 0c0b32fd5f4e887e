"""Properties of the comparison metrics (metrics.py) and the health predicates (verdict.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from pytest_mnn_parity.core.metrics import compare, cosine_similarity, reference_scale, snr_db
from pytest_mnn_parity.core.verdict import has_new_non_finite, is_constant_output, is_zero_output

finite32 = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)
shapes = hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=6)


@st.composite
def array_pairs(draw, elements=finite32):
    shape = draw(shapes)
    a = draw(hnp.arrays(np.float32, shape, elements=elements))
    b = draw(hnp.arrays(np.float32, shape, elements=elements))
    return a, b


@given(array_pairs())
def test_max_abs_rmse_and_cosine_are_symmetric(pair):
    a, b = pair
    ab, ba = compare(a, b, atol=1e-3, rtol=1e-3), compare(b, a, atol=1e-3, rtol=1e-3)
    assert ab.max_abs == ba.max_abs
    assert ab.mean_abs == pytest.approx(ba.mean_abs)
    assert ab.rmse == pytest.approx(ba.rmse)
    assert ab.cosine == pytest.approx(ba.cosine, abs=1e-12)


@given(array_pairs())
def test_identical_arrays_pass_with_zero_tolerance(pair):
    a, _ = pair
    m = compare(a, a.copy(), atol=0.0, rtol=0.0)
    assert m.max_abs == 0 and m.outside_fraction == 0 and m.rmse == 0
    assert m.cosine == pytest.approx(1.0) or not np.any(a)


@given(array_pairs(), st.integers(-20, 20))
def test_scaled_tolerance_is_scale_invariant(pair, exponent):
    """Multiplying target and reference by a power of two changes no verdict-relevant metric.

    (An all-zero reference has no scale of its own; it is judged in absolute terms.)
    """
    a, b = pair
    assume(np.any(b))
    k = np.float64(2.0) ** exponent
    m1 = compare(a.astype(np.float64), b.astype(np.float64), atol=1e-2, rtol=1e-2)
    m2 = compare(a.astype(np.float64) * k, b.astype(np.float64) * k, atol=1e-2, rtol=1e-2)
    assert m1.outside_fraction == m2.outside_fraction
    assert m1.cosine == pytest.approx(m2.cosine, abs=1e-9)
    assert m1.max_rel == pytest.approx(m2.max_rel, rel=1e-9)
    assert m2.ref_scale == pytest.approx(m1.ref_scale * k)


@given(array_pairs())
def test_fractions_are_fractions(pair):
    a, b = pair
    m = compare(a, b, atol=1e-3, rtol=0.0)
    for value in (m.outside_fraction, m.zero_fraction, m.ref_zero_fraction, m.new_zero_fraction):
        assert 0.0 <= value <= 1.0
    assert -1.0 <= m.cosine <= 1.0
    assert m.new_zero_fraction <= m.zero_fraction


@given(array_pairs())
def test_worst_index_holds_the_largest_violation(pair):
    a, b = pair
    m = compare(a, b, atol=0.0, rtol=0.0)
    assume(m.max_abs > 0)
    assert abs(a[m.worst_index] - b[m.worst_index]) == pytest.approx(m.max_abs)
    assert m.worst_target == a[m.worst_index] and m.worst_reference == b[m.worst_index]


def test_nan_in_target_only_is_outside_tolerance_and_counted():
    ref = np.ones(8, np.float32)
    tgt = ref.copy()
    tgt[3] = np.nan
    m = compare(tgt, ref, atol=1.0, rtol=1.0)
    assert m.nonfinite_count == 1 and m.ref_nonfinite_count == 0
    assert m.outside_fraction == pytest.approx(1 / 8)
    assert m.worst_index == (3,)
    # An unbounded error must not hide behind perfect-looking summary numbers.
    assert math.isinf(m.max_abs) and math.isinf(m.rmse) and math.isnan(m.cosine)


def test_shared_nan_and_inf_are_not_differences():
    ref = np.array([np.nan, np.inf, 1.0], np.float32)
    m = compare(ref.copy(), ref, atol=0.0, rtol=0.0)
    assert m.outside_fraction == 0 and m.max_abs == 0


def test_opposite_infinities_are_outside():
    ref = np.array([np.inf, 1.0], np.float32)
    tgt = np.array([-np.inf, 1.0], np.float32)
    assert compare(tgt, ref, atol=1.0, rtol=1.0).outside_fraction == 0.5


def test_reference_scale_of_zeros_and_nonfinite_is_one():
    assert reference_scale(np.zeros(4)) == 1.0
    assert reference_scale(np.array([np.nan, np.inf])) == 1.0
    assert reference_scale(np.array([-3.0, 2.0, np.nan])) == 3.0


def test_cosine_edge_cases():
    assert cosine_similarity(np.zeros(3), np.zeros(3)) == 1.0
    assert cosine_similarity(np.zeros(3), np.ones(3)) == 0.0
    assert cosine_similarity(np.ones(3), -np.ones(3)) == pytest.approx(-1.0)
    big = np.full(4, 1e300)
    assert cosine_similarity(big, big) == pytest.approx(1.0)


def test_snr_is_capped_and_ordered():
    ref = np.linspace(-1, 1, 100)
    assert snr_db(ref, ref) == 200.0
    assert snr_db(ref + 1e-3, ref) > snr_db(ref + 1e-1, ref)


def test_empty_arrays_compare_as_equal():
    m = compare(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.float32), atol=0, rtol=0)
    assert m.size == 0 and m.outside_fraction == 0


# -- health predicates -----------------------------------------------------------

@given(hnp.arrays(np.float32, shapes, elements=finite32))
def test_zero_output_needs_a_nonzero_reference(ref):
    zeros = np.zeros_like(ref)
    assert is_zero_output(zeros, ref) == bool(np.any(ref != 0))
    assert not is_zero_output(ref + 1.0, ref) or not np.any(ref + 1.0)


@given(hnp.arrays(np.float32, shapes, elements=finite32), finite32)
def test_constant_output_needs_a_varying_reference(ref, value):
    const = np.full_like(ref, value)
    assert is_constant_output(const, ref) == (ref.size > 1 and bool(np.any(ref != ref.flat[0])))


def test_single_element_is_never_constant():
    assert not is_constant_output(np.array([1.0]), np.array([2.0]))


def test_constant_with_nan_is_not_constant_output():
    assert not is_constant_output(np.array([np.nan, np.nan]), np.array([1.0, 2.0]))


@given(hnp.arrays(np.float32, shapes, elements=finite32), st.sampled_from([np.nan, np.inf, -np.inf]))
@settings(max_examples=50)
def test_new_non_finite_detected_only_where_reference_is_finite(ref, bad):
    tgt = ref.copy()
    tgt.flat[0] = bad
    assert has_new_non_finite(tgt, ref)
    ref_with_same = ref.copy()
    ref_with_same.flat[0] = bad
    assert not has_new_non_finite(ref_with_same, ref_with_same)
