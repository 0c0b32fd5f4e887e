"""Tolerance tiers and their resolution order (tolerances.py)."""
from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from pytest_mnn_parity.core.tolerances import OVERRIDABLE, TIERS, resolve, tier_for


@pytest.mark.parametrize(("backend", "precision", "tier"), [
    ("CPU", "high", "fp32"), ("CPU", "normal", "fp32"), ("CPU", "low", "fp16"), ("CPU", "Low_BF16", "bf16"),
    ("OPENCL", "high", "fp32"), ("OPENCL", "normal", "fp16"), ("VULKAN", "low", "fp16"),
    ("CUDA", "Low_BF16", "fp16"), ("METAL", "normal", "fp16"),
])
def test_tier_table(backend, precision, tier):
    assert tier_for(backend, precision) == tier


def test_tiers_get_looser_with_fewer_mantissa_bits():
    fp32, fp16, bf16 = TIERS["fp32"], TIERS["fp16"], TIERS["bf16"]
    assert fp32.atol < fp16.atol < bf16.atol
    assert fp32.rtol < fp16.rtol < bf16.rtol
    assert fp32.min_cosine > fp16.min_cosine > bf16.min_cosine


def test_later_layers_win_field_by_field_and_are_named():
    tol = resolve("CPU", "low", ("ini", {"atol": 0.1, "rtol": 0.2}), ("command line", {"atol": 0.3}))
    assert tol.atol == 0.3 and tol.rtol == 0.2
    assert tol.min_cosine == TIERS["fp16"].min_cosine
    assert tol.tier == "fp16" and tol.sources == ("ini", "command line")
    assert "overridden by ini, command line" in tol.describe()


def test_none_values_do_not_clobber_lower_layers():
    tol = resolve("CPU", "high", ("ini", {"atol": 0.5}), ("command line", {"atol": None}))
    assert tol.atol == 0.5 and tol.sources == ("ini",)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("atol", -1.0, "non-negative"), ("min_cosine", 1.5, "at most 1"), ("rtol", float("nan"), "non-negative"),
])
def test_bad_values_are_rejected_with_their_source(field, value, message):
    with pytest.raises(ValueError, match=f"command line: {field} must be .*{message}"):
        resolve("CPU", "high", ("command line", {field: value}))


def test_unknown_fields_are_rejected():
    with pytest.raises(ValueError, match="unknown tolerance field"):
        resolve("CPU", "high", ("marker", {"atoll": 1.0}))


layer = st.dictionaries(st.sampled_from(OVERRIDABLE), st.floats(0, 1, allow_nan=False), max_size=len(OVERRIDABLE))


@given(st.lists(layer, max_size=4), st.sampled_from(["CPU", "OPENCL"]), st.sampled_from(["high", "low"]))
def test_resolution_equals_last_writer_per_field(layers, backend, precision):
    tol = resolve(backend, precision, *[(f"layer{i}", d) for i, d in enumerate(layers)])
    base = TIERS[tier_for(backend, precision)]
    for name in OVERRIDABLE:
        expected = getattr(base, name)
        for d in layers:
            if name in d:
                expected = d[name]
        assert getattr(tol, name) == expected


@given(st.sampled_from(["CPU", "OPENCL", "VULKAN"]), st.sampled_from(["normal", "high", "low", "Low_BF16"]),
       st.sampled_from([None, "fp32", "fp16", "int8"]))
def test_a_conversion_variant_never_tightens_the_tier(backend, precision, variant):
    from pytest_mnn_parity.core.tolerances import TIER_ORDER, VARIANT_TIERS

    plain = resolve(backend, precision)
    with_variant = resolve(backend, precision, variant=variant)
    assert TIER_ORDER.index(with_variant.tier) >= TIER_ORDER.index(plain.tier)
    if variant is not None:
        assert TIER_ORDER.index(with_variant.tier) >= TIER_ORDER.index(VARIANT_TIERS[variant])
    assert with_variant.tier in (tier_for(backend, precision), VARIANT_TIERS.get(variant or "fp32"))
    assert with_variant.atol >= plain.atol and with_variant.min_cosine <= plain.min_cosine


def test_variant_tiers_as_documented():
    assert resolve("CPU", "high", variant="fp16").tier == "fp16"
    assert resolve("CPU", "high", variant="int8").tier == "int8"
    assert resolve("CPU", "Low_BF16", variant="int8").tier == "bf16"
    assert resolve("CPU", "high", ("command line", {"atol": 0.5}), variant="int8").atol == 0.5
