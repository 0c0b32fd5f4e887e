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
