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


# -- kernels measured to round looser than the configuration's elementwise path (arithmetic.KERNEL_PROBES) ----------

DEPTHWISE = "depthwise convolution (ConvolutionDepthwise)"


def test_a_model_running_a_reduced_kernel_gets_that_kernels_tier_and_the_reason():
    """CUDA high on the H200: fp32 elementwise, depthwise weights in half precision. A MobileNet gets fp16."""
    from pytest_mnn_parity.core.tolerances import kernel_tier

    tier, reason = kernel_tier("fp32", {DEPTHWISE: "fp16"})
    assert tier == "fp16"
    assert reason == ("raised from fp32: this configuration's depthwise convolution (ConvolutionDepthwise) rounds "
                      "like fp16, and the model runs it")
    tol = resolve("CUDA", "high", arithmetic="fp32", kernels={DEPTHWISE: "fp16"})
    assert (tol.tier, tol.atol, tol.tier_reason) == ("fp16", TIERS["fp16"].atol, reason)
    assert tol.describe().startswith(f"tier fp16 ({reason}): atol 0.02 x ref scale")
    # The same backend, a model without the kernel: fp32, nothing to say.
    plain = resolve("CUDA", "high", arithmetic="fp32", kernels={})
    assert (plain.tier, plain.tier_reason) == ("fp32", "") and plain.describe().startswith("tier fp32: atol")


@pytest.mark.parametrize(("tier", "kernels", "expected"), [
    ("fp16", {DEPTHWISE: "fp16"}, "fp16"),          # already that loose: no reason
    ("fp32", {DEPTHWISE: "broken"}, "fp32"),        # no format: the items must fail, not loosen
    ("fp32", {DEPTHWISE: "unknown"}, "fp32"),
    ("bf16", {DEPTHWISE: "fp16"}, "bf16"),          # never tightened
])
def test_kernels_never_tighten_and_only_a_format_raises(tier, kernels, expected):
    from pytest_mnn_parity.core.tolerances import kernel_tier

    assert kernel_tier(tier, kernels) == (expected, "")


def test_explicit_tolerances_still_win_over_a_kernel_raised_tier_and_both_are_named():
    tol = resolve("CUDA", "high", ("ini", {"atol": 1e-3}), ("command line", {"min_cosine": 0.99999}),
                  arithmetic="fp32", kernels={DEPTHWISE: "fp16"})
    assert (tol.atol, tol.min_cosine, tol.rtol) == (1e-3, 0.99999, TIERS["fp16"].rtol)
    assert tol.tier == "fp16" and tol.sources == ("ini", "command line")
    assert tol.describe().startswith("tier fp16 (raised from fp32: this configuration's depthwise convolution "
                                     "(ConvolutionDepthwise) rounds like fp16, and the model runs it) "
                                     "(overridden by ini, command line): atol 0.001")


kinds = st.sampled_from(["fp32", "fp16", "bf16", "broken", "unknown"])


@given(st.sampled_from(["fp32", "fp16", "bf16"]), st.sampled_from([None, "fp32", "fp16", "int8"]),
       st.dictionaries(st.sampled_from([DEPTHWISE, "convolution (Convolution)"]), kinds))
def test_the_tier_is_between_the_base_arithmetics_and_the_loosest_probed_kernels(base, variant, kernels):
    """Never tighter than what the elementwise arithmetic (and the variant) need, never looser than the loosest
    kernel the model runs; a reason exactly when a kernel moved it."""
    from pytest_mnn_parity.core.tolerances import TIER_ORDER

    without = resolve("CUDA", "high", arithmetic=base, variant=variant)
    tol = resolve("CUDA", "high", arithmetic=base, variant=variant, kernels=kernels)
    rank = TIER_ORDER.index
    assert rank(tol.tier) >= rank(without.tier)
    measured = [k for k in kernels.values() if k in TIERS]
    assert rank(tol.tier) <= max([rank(without.tier)] + [rank(k) for k in measured])
    assert (tol.tier != without.tier) == bool(tol.tier_reason)
    assert tol.atol >= without.atol and tol.min_cosine <= without.min_cosine
