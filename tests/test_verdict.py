"""Verdict logic on hand-made arrays: categories, their order, and that health never fails a correct output."""
from __future__ import annotations

import numpy as np
import pytest

from pytest_mnn_parity.core.tolerances import TIERS
from pytest_mnn_parity.core.verdict import CATEGORY_ORDER, Category, judge_output, judge_outputs, worst

TOL = TIERS["fp32"]
REF = np.linspace(0.1, 1.0, 64, dtype=np.float32).reshape(1, 4, 4, 4)
REF_B = REF[..., ::-1].copy()


def test_identical_output_is_ok():
    v = judge_output("y", REF.copy(), REF, TOL, target_b=REF_B.copy(), reference_b=REF_B)
    assert v.category is Category.OK and v.passed


def test_all_zeros_is_zero_output():
    v = judge_output("y", np.zeros_like(REF), REF, TOL)
    assert v.category is Category.ZERO_OUTPUT
    assert "every element is exactly 0" in v.detail


def test_zeros_in_some_channels_is_partial_zero_with_location():
    tgt = REF.copy()
    tgt[:, 2:] = 0
    v = judge_output("y", tgt, REF, TOL)
    assert v.category is Category.PARTIAL_ZERO
    assert "50.0% of elements became exactly 0" in v.detail
    assert "axis 1: 2-3 of 4" in v.detail


def test_constant_output():
    v = judge_output("y", np.full_like(REF, 0.5), REF, TOL)
    assert v.category is Category.CONSTANT_OUTPUT and "0.5" in v.detail


def test_nan_beats_every_other_category():
    tgt = np.zeros_like(REF)
    tgt.flat[5] = np.nan
    v = judge_output("y", tgt, REF, TOL)
    assert v.category is Category.NON_FINITE and "1 NaN and 0 Inf" in v.detail


def test_stale_output_same_target_for_different_inputs():
    tgt = REF * 1.5  # wrong, neither zero nor constant, and it never changes
    v = judge_output("y", tgt, REF, TOL, target_b=tgt.copy(), reference_b=REF_B)
    assert v.category is Category.STALE_OUTPUT


def test_same_target_is_not_stale_when_the_reference_did_not_change_either():
    tgt = REF * 1.5
    v = judge_output("y", tgt, REF, TOL, target_b=tgt.copy(), reference_b=REF.copy())
    assert v.category is Category.MISMATCH


def test_stale_on_second_input_fails_even_if_first_input_passes():
    v = judge_output("y", REF.copy(), REF, TOL, target_b=REF.copy(), reference_b=REF_B)
    assert v.category is Category.STALE_OUTPUT


def test_tiny_zero_flush_within_tolerance_is_not_a_failure():
    ref = REF.copy()
    ref[0, 0] = 1e-9  # values far below the tolerance scale
    tgt = ref.copy()
    tgt[0, 0] = 0.0
    assert judge_output("y", tgt, ref, TOL).category is Category.OK


def test_small_error_is_ok_large_error_is_mismatch():
    assert judge_output("y", REF * (1 + 1e-5), REF, TOL).category is Category.OK
    v = judge_output("y", REF * 1.1, REF, TOL)
    assert v.category is Category.MISMATCH and "outside tolerance" in v.detail


def test_shape_mismatch_and_empty_output():
    assert judge_output("y", REF[..., :2], REF, TOL).category is Category.SHAPE_MISMATCH
    empty = judge_output("y", np.zeros((0, 0, 0, 0), np.float32), REF, TOL)
    assert empty.category is Category.RUNTIME_ERROR and "empty tensor" in empty.detail


def test_every_reference_output_is_judged_and_extra_outputs_are_named():
    verdict = judge_outputs({"a": REF, "extra": REF}, {"a": REF, "b": REF}, TOL)
    cats = {v.name: v.category for v in verdict.outputs}
    assert cats == {"a": Category.OK, "b": Category.SHAPE_MISMATCH, "extra": Category.SHAPE_MISMATCH}
    assert verdict.category is Category.SHAPE_MISMATCH


def test_worst_follows_category_order():
    assert worst([Category.OK, Category.MISMATCH, Category.ZERO_OUTPUT]) is Category.ZERO_OUTPUT
    assert worst([]) is Category.OK
    assert CATEGORY_ORDER[-1] is Category.OK and len(set(CATEGORY_ORDER)) == len(Category)


@pytest.mark.parametrize("dtype", [np.int32, np.uint8])
def test_integer_outputs_compare_exactly_enough(dtype):
    ref = np.arange(16, dtype=dtype)
    assert judge_output("ids", ref.copy(), ref, TOL).category is Category.OK
    off = ref.copy()
    off[3] += 1
    assert judge_output("ids", off, ref, TOL).category is Category.MISMATCH


# -- issue 20: the tolerance model of trained models ------------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pytest_mnn_parity.core.metrics import compare  # noqa: E402
from pytest_mnn_parity.core.verdict import PASSING_DECISIONS, degenerate, tolerance_decision  # noqa: E402

FP16 = TIERS["fp16"]


def _image(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(n, dtype=np.float32)


def test_an_output_whose_whole_range_is_tiny_does_not_fail_on_rounding():
    """A text detector's probability map on noise: values up to 8e-5, moved by 1e-7 (seen on PP-OCRv4 det)."""
    ref = _image(4096) * np.float32(8e-5)
    tgt = ref + np.float32(1.2e-7) * np.sign(_image(4096, 1) - 0.5).astype(np.float32)
    v = judge_output("maps", tgt, ref, TOL)
    assert v.passed and v.decided_by == "absolute floor"
    # The same relative error at the scale of an image is not below any floor: it fails.
    assert not judge_output("maps", tgt / np.float32(8e-5), ref / np.float32(8e-5), TOL).passed


def test_a_few_outliers_pass_within_the_budget_and_their_size_bound():
    ref = _image(409_600)
    tgt = ref.copy()
    tgt[[7, 70_000]] += np.float32(3e-3)  # 2 of 409,600, about 2x their allowance (seen on a real text map)
    v = judge_output("maps", tgt, ref, TOL)
    assert v.passed and v.decided_by == "outliers allowed" and v.metrics.outside_fraction > 0
    tgt[7] += np.float32(0.5)  # one element far outside: the size bound decides
    big = judge_output("maps", tgt, ref, TOL)
    assert big.category is Category.MISMATCH and big.decided_by == "outlier size"


def test_a_broken_row_fails_on_the_outside_fraction():
    ref = _image(320 * 320).reshape(1, 1, 320, 320)
    tgt = ref.copy()
    tgt[..., 0, :] += np.float32(0.3)  # one border row wrong: 0.3% of the elements
    v = judge_output("maps", tgt, ref, TOL)
    assert v.category is Category.MISMATCH and v.decided_by == "outside fraction"
    assert "decided by: outside fraction" in v.detail
    assert not judge_output("maps", tgt, ref, FP16).passed  # at fp16 the cosine floor still catches it


def test_only_the_cosine_can_catch_a_change_inside_every_elements_allowance():
    ref = np.linspace(-1, 1, 1000).astype(np.float32)
    tol = TIERS["fp32"].__class__(atol=2.5, rtol=0.0, min_cosine=0.9999, tier="custom")
    v = judge_output("y", -ref, ref, tol)  # every element within 2.5 x scale, the sign of all of them flipped
    assert not v.passed and v.decided_by == "cosine"


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 2000), st.floats(0, 0.02), st.floats(0, 30), st.sampled_from(["fp32", "fp16", "bf16", "int8"]))
def test_the_decision_is_the_bound_it_names(size, share, excess, tier):
    """A passing decision never hides a broken bound; a failing one names the first bound broken."""
    tol = TIERS[tier]
    rng = np.random.default_rng(size)
    ref = rng.random(size).astype(np.float32)
    tgt = ref.copy()
    hit = rng.random(size) < share
    tgt[hit] += np.float32(excess) * (np.float32(tol.atol) + np.float32(tol.rtol) * ref[hit])
    m = compare(tgt, ref, atol=tol.atol, rtol=tol.rtol, abs_floor=tol.abs_floor)
    decision = tolerance_decision(m, tol)
    if decision in PASSING_DECISIONS:
        assert m.outside_fraction <= tol.max_outside_fraction and m.cosine >= tol.min_cosine
        assert m.outside_fraction == 0 or m.excess_ratio <= tol.outlier_limit
    elif decision == "outside fraction":
        assert m.outside_fraction > tol.max_outside_fraction
    elif decision == "outlier size":
        assert m.outside_fraction <= tol.max_outside_fraction and m.excess_ratio > tol.outlier_limit
    else:
        assert decision == "cosine" and not m.cosine >= tol.min_cosine


def test_collapse_counts_zeros_inside_tolerance_and_ignores_zeros_that_moved():
    ref = np.full(1000, 1e-4, np.float32)
    ref[:20] = 1.0  # 2% of the elements carry the signal; the rest is within atol of zero
    tgt = np.zeros_like(ref)
    tgt[:20] = 0.9  # the signal is off too, so the output fails
    v = judge_output("y", tgt, ref, TOL)
    assert v.category is Category.PARTIAL_ZERO and "98.0% of elements became exactly 0" in v.detail
    # The same zeros in other places (a permutation): the share of zeros did not rise, no collapse.
    rng = np.random.default_rng(0)
    ref2 = rng.random(10_000).astype(np.float32)
    ref2[rng.random(10_000) < 0.124] = 0
    tgt2 = rng.permutation(ref2)
    moved = judge_output("y", tgt2, ref2, TOL)
    assert moved.category is Category.MISMATCH, moved.detail


def test_a_failure_on_input_set_b_alone_is_described_with_set_bs_numbers():
    tgt_b = REF_B.copy()
    tgt_b[..., 0] *= np.float32(1.5)
    v = judge_output("y", REF.copy(), REF, TOL, target_b=tgt_b, reference_b=REF_B)
    assert v.category is Category.MISMATCH and v.failing_set == "B"
    assert v.detail.startswith("input set B: ") and "(set A passes)" in v.detail
    data = v.as_dict()
    assert data["failing_set"] == "B" and data["set_b"]["outside_fraction"] > 0 and data["outside_fraction"] == 0


@pytest.mark.parametrize("ref, note", [(np.zeros(8, np.float32), "all zeros"),
                                       (np.full(8, 0.25, np.float32), "constant (0.25 everywhere)"),
                                       (np.full(8, np.nan, np.float32), "not finite anywhere"),
                                       (np.arange(8, dtype=np.float32), ""),
                                       (np.zeros(8, np.int32), "")])
def test_degenerate_reference_outputs(ref, note):
    assert degenerate(ref) == note


def test_agreeing_outputs_on_a_degenerate_reference_test_nothing_and_fail():
    zeros = {"y": np.zeros(8, np.float32)}
    verdict = judge_outputs(zeros, zeros, TOL, targets_b=zeros, references_b=zeros)
    assert verdict.category is Category.DEGENERATE_REFERENCE and "'y' all zeros" in verdict.detail
    # One degenerate output beside a live one is a note, not a verdict: the live one is tested.
    live = {"y": np.zeros(8, np.float32), "z": np.arange(8, dtype=np.float32)}
    mixed = judge_outputs(live, live, TOL, targets_b=live, references_b=live)
    assert mixed.category is Category.OK and mixed.outputs[0].reference_note == "all zeros"


def test_huge_half_precision_values_give_unbounded_numbers_without_warnings():
    import warnings

    ref = np.array([6e4, -6e4, 1.0, 0.0], np.float16)
    tgt = np.array([np.inf, -6e4, 1.0, 0.0], np.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = compare(tgt, ref, atol=TOL.atol, rtol=TOL.rtol)
    assert m.max_rel == float("inf") or m.max_abs == float("inf")
