"""Which tolerance applies to a configuration, and why.

Resolution order, later wins, field by field:

1. **Built-in tier**, chosen by the arithmetic a probe measured for the
   backend x precision (fp32, fp16 or bf16); when the probe cannot tell, by
   the backend x precision table below.  Raised, where the model runs a
   kernel that its own probe found rounding in a looser format (a depthwise
   convolution keeping half-precision weights on an otherwise fp32 backend),
   to that kernel's tier (``kernel_tier``; the tolerance's ``tier_reason``
   says so).  A conversion variant raises it to at least its own tier.
2. **ini / pyproject**: ``mnn_atol``, ``mnn_rtol``, ``mnn_min_cosine``,
   ``mnn_max_outside_fraction`` in ``[tool.pytest.ini_options]``.
3. **Marker** on a user's test: ``@pytest.mark.mnn_parity(atol=..., rtol=...)``,
   then keyword arguments of the test's ``mnn_parity(outputs, atol=...)`` call.
4. **Command line**: ``--mnn-atol``, ``--mnn-rtol``, ``--mnn-min-cosine``,
   ``--mnn-max-outside-fraction``.

An element passes when ``|target - ref| <= max(atol * scale + rtol * |ref|, floor)``
where ``scale`` is the largest ``|ref|`` of that output (``metrics.reference_scale``)
and ``floor`` is the larger of the tier's ``abs_floor`` and twice the output's
measured noise (how far the reference itself moves between 1 and N CPU threads,
``engine.noise_floor``).  ``atol`` is therefore a fraction of the output's own
range: a [0, 1] image and logits in the hundreds are held to the same standard.

An output passes (``verdict.tolerance_decision`` names the bound that decided):

* when every element is within ``floor`` ("absolute floor"): differences the
  arithmetic cannot resolve, whatever the output's own range;
* else when no element is outside and the cosine similarity to the reference is
  at least ``min_cosine``;
* else when at most ``max_outside_fraction`` of the elements are outside, none
  of them by more than ``outlier_limit`` times its own allowance, and the cosine
  is at least ``min_cosine`` ("outliers allowed").

=========  ==========================================  =====  =====  ==========  =======  =========  =======
tier       used for                                     atol   rtol   min_cosine  outside  abs_floor  outlier
=========  ==========================================  =====  =====  ==========  =======  =========  =======
fp32       measured fp32; else ``high``, CPU ``normal``  5e-4   1e-3   0.9999      1e-3     1e-6       10
fp16       measured fp16; a model running a kernel      2e-2   2e-2   0.999       1e-2     1e-3       10
           measured fp16 (on fp32 elementwise); else
           CPU ``low``, GPU/NPU ``normal`` and ``low``
bf16       measured bf16; else CPU ``Low_BF16``         6e-2   6e-2   0.995       2e-2     8e-3       10
int8       an ``int8`` conversion variant               5e-2   5e-2   0.995       2e-2     4e-3       10
=========  ==========================================  =====  =====  ==========  =======  =========  =======

A conversion variant (an ONNX model converted by the plugin) raises the tier
to at least its own: ``fp16`` weights use the fp16 tier even at ``high``,
``int8`` weights the int8 tier; of the two tiers the looser (later in
``TIER_ORDER``) is used.

Why these numbers (measured, see docs/verdicts.md): fp32 kernels (Winograd
convolutions, reordered reductions) differ from another fp32 implementation by
up to ~1e-4 of the output range on deep graphs; fp32 allows 5x that, while a
broken kernel is off by percent.  On trained models a handful of elements sit
on a steep activation (sigmoid edges of a text map) and move 1-3x their
allowance: one in a thousand may (one in a hundred at fp16), bounded by the
cosine floor and by ``outlier_limit``, so a broken region (a border row, a
channel) still fails.  ``abs_floor`` is what each format cannot resolve near
activations of order one (fp32: 1e-6; fp16's spacing near 1 is 1e-3; bf16's
8e-3): an output whose whole range is 1e-4 no longer fails on 1e-7 of rounding.
fp16 keeps 10-11 mantissa bits (~5e-4 relative per rounding) and errors
accumulate along a graph; bf16 keeps 8.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping

CPU_BACKENDS = frozenset({"CPU"})


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    min_cosine: float
    max_outside_fraction: float = 0.0
    # An output is ``partial_zero`` when at least this fraction of its elements
    # became exactly zero while the reference is not zero there, and its share
    # of zeros rose by as much (zeros that only moved are not a collapse).
    partial_zero_fraction: float = 0.01
    # Differences up to this (absolute) always pass: what the arithmetic cannot resolve.
    abs_floor: float = 0.0
    # An allowed outlier may exceed its allowance by at most this factor.
    outlier_limit: float = 10.0
    tier: str = "custom"
    sources: tuple[str, ...] = ()
    # Why the tier is looser than the configuration's measured arithmetic ("" when it is not), e.g. a depthwise
    # convolution that rounds like fp16 on this backend while its elementwise ops are fp32 (``kernel_tier``).
    tier_reason: str = ""
    # The fields a source set (an explicit ``abs_floor`` also replaces the measured noise floor).
    overridden: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["sources"] = list(self.sources)
        data["overridden"] = list(self.overridden)
        return data

    def describe(self) -> str:
        origin = f" (overridden by {', '.join(self.sources)})" if self.sources else ""
        reason = f" ({self.tier_reason})" if self.tier_reason else ""
        return (f"tier {self.tier}{reason}{origin}: atol {self.atol:g} x ref scale, rtol {self.rtol:g}, "
                f"min cosine {self.min_cosine:g}, max outside {self.max_outside_fraction:g} "
                f"(each within {self.outlier_limit:g}x), abs floor {self.abs_floor:g}")


TIERS: dict[str, Tolerance] = {
    "fp32": Tolerance(atol=5e-4, rtol=1e-3, min_cosine=0.9999, max_outside_fraction=1e-3, abs_floor=1e-6,
                      tier="fp32"),
    "fp16": Tolerance(atol=2e-2, rtol=2e-2, min_cosine=0.999, max_outside_fraction=1e-2, abs_floor=1e-3,
                      tier="fp16"),
    "bf16": Tolerance(atol=6e-2, rtol=6e-2, min_cosine=0.995, max_outside_fraction=2e-2, abs_floor=8e-3,
                      tier="bf16"),
    # 8-bit weights: a step of max|w|/127 per channel; on the 10-conv deep
    # fixture the int8 build is 1.7e-2 of the output range from ONNX Runtime.
    "int8": Tolerance(atol=5e-2, rtol=5e-2, min_cosine=0.995, max_outside_fraction=2e-2, abs_floor=4e-3,
                      tier="int8"),
}
# Loosest last: a variant's tier and a configuration's tier combine to the later one.
TIER_ORDER = ("fp32", "fp16", "int8", "bf16")
# The tier each conversion variant needs at least (see variants.VARIANTS).
VARIANT_TIERS = {"fp32": "fp32", "fp16": "fp16", "int8": "int8"}

OVERRIDABLE = ("atol", "rtol", "min_cosine", "max_outside_fraction", "partial_zero_fraction", "abs_floor",
               "outlier_limit")


def tier_for(backend: str, precision: str) -> str:
    """The built-in tier for a backend x precision (see the module table)."""
    p = precision.lower()
    if p == "low_bf16":
        return "bf16" if backend.upper() in CPU_BACKENDS else "fp16"
    if p == "high":
        return "fp32"
    if p == "normal":
        # MNN's CPU computes ``normal`` in fp32; GPU backends may use fp16 storage.
        return "fp32" if backend.upper() in CPU_BACKENDS else "fp16"
    return "fp16"


def variant_tier(tier: str, variant: str | None) -> str:
    """``tier`` raised to what a conversion variant needs (the looser of the two)."""
    floor = VARIANT_TIERS.get(variant or "", "fp32")
    return max(tier, floor, key=TIER_ORDER.index)


def kernel_tier(tier: str, kernels: Mapping[str, str] | None) -> tuple[str, str]:
    """``tier`` raised to the loosest format of ``kernels`` ({what the model runs: the format its probe measured},
    e.g. {"depthwise convolution (ConvolutionDepthwise)": "fp16"}), with why ("" when no kernel needs a looser
    tier).  Anything but a tier's name (a ``broken`` probe) raises nothing: a kernel off by more than any float
    format explains must fail the items that run it, not widen their tolerance."""
    raising = {what: kind for what, kind in (kernels or {}).items()
               if kind in TIERS and TIER_ORDER.index(kind) > TIER_ORDER.index(tier)}
    if not raising:
        return tier, ""
    loosest = max(raising.values(), key=TIER_ORDER.index)
    named = ", ".join(f"{what} rounds like {kind}" for what, kind in raising.items())
    return loosest, f"raised from {tier}: this configuration's {named}, and the model runs it"


def resolve(backend: str, precision: str, *layers: tuple[str, Mapping[str, Any] | None],
            arithmetic: str | None = None, variant: str | None = None,
            kernels: Mapping[str, str] | None = None) -> Tolerance:
    """The tier for ``backend`` x ``precision`` (and conversion ``variant``) with ``layers`` of overrides.

    ``arithmetic`` is what a probe measured the configuration to compute in
    (``arithmetic.probe_arithmetic``): when known it picks the tier, so an fp32
    path (``low`` on an x86 CPU, anything on OpenCL without fp16) is held to
    fp32 tolerances.  ``kernels`` are the model's kernels measured to round in
    another format (``arithmetic.model_kernels``): they raise the tier
    (``kernel_tier``).  Each layer is ``(source_name, {field: value})``; ``None``
    values are ignored so an option that was not given does not clobber a lower layer.
    """
    measured = arithmetic if arithmetic in ("fp32", "fp16", "bf16") else tier_for(backend, precision)
    tier = variant_tier(measured, variant)
    raised, reason = kernel_tier(tier, kernels)
    tol = replace(TIERS[raised], tier_reason=reason)
    for source, overrides in layers:
        if not overrides:
            continue
        given = {k: float(v) for k, v in overrides.items() if v is not None}
        unknown = set(given) - set(OVERRIDABLE)
        if unknown:
            raise ValueError(f"{source}: unknown tolerance field(s) {sorted(unknown)}; known: {list(OVERRIDABLE)}")
        for name, value in given.items():
            _check_value(source, name, value)
        if given:
            tol = replace(tol, **given, sources=tol.sources + (source,),
                          overridden=tuple(dict.fromkeys(tol.overridden + tuple(given))))
    return tol


def _check_value(source: str, name: str, value: float) -> None:
    if value != value or value < 0:  # NaN or negative
        raise ValueError(f"{source}: {name} must be a non-negative number, got {value!r}")
    if name in ("min_cosine", "max_outside_fraction", "partial_zero_fraction") and value > 1:
        raise ValueError(f"{source}: {name} must be at most 1, got {value!r}")


def field_names() -> list[str]:
    return [f.name for f in fields(Tolerance)]


# The tiers a saved reference can have been computed at, tightest first.
_REFERENCE_TIERS = ("fp32", "fp16", "bf16")


def looser_tier(kind: str, backend: str, precision: str, reference_tier: str | None) -> str:
    """The looser of the target's tier and the reference's: both sides' rounding is in the difference."""
    mine = kind if kind in TIERS else tier_for(backend, precision)
    if reference_tier not in _REFERENCE_TIERS:
        return kind
    return max(mine, reference_tier, key=_REFERENCE_TIERS.index)
