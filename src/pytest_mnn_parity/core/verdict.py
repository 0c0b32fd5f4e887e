"""Decide, per output and per configuration, whether MNN gave the right answer.

Health checks classify *how* an output is wrong; they never make a correct
output fail.  An output first fails or passes on numbers (``metrics`` against
``tolerances``); a failing output is then given the most specific category
that fits, in the order of ``CATEGORY_ORDER``.  The configuration's category
is its worst output's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Mapping

import numpy as np

from .metrics import OutputMetrics, compare
from .tolerances import Tolerance


class Category(str, Enum):
    OK = "ok"
    MODEL_ERROR = "model_error"
    BACKEND_UNAVAILABLE = "backend_unavailable"
    BACKEND_FALLBACK = "backend_fallback"
    # The configuration's isolated worker died (by a signal, or exited) or was
    # killed after --mnn-timeout: see isolation.py.
    CRASHED = "crashed"
    TIMEOUT = "timeout"
    RUNTIME_ERROR = "runtime_error"
    SHAPE_MISMATCH = "shape_mismatch"
    NON_FINITE = "non_finite"
    ZERO_OUTPUT = "zero_output"
    PARTIAL_ZERO = "partial_zero"
    CONSTANT_OUTPUT = "constant_output"
    STALE_OUTPUT = "stale_output"
    MISMATCH = "mismatch"
    # --mnn-api both: the Module API's outputs disagree with the session API's.
    API_MISMATCH = "api_mismatch"
    # --mnn-golden: no usable golden (missing, unreadable, or made from other inputs).
    NO_GOLDEN = "no_golden"

    def __str__(self) -> str:
        return self.value


# Most severe / most specific first.
CATEGORY_ORDER = [
    Category.MODEL_ERROR, Category.NO_GOLDEN, Category.BACKEND_UNAVAILABLE, Category.BACKEND_FALLBACK, Category.CRASHED,
    Category.TIMEOUT, Category.RUNTIME_ERROR, Category.SHAPE_MISMATCH, Category.NON_FINITE, Category.ZERO_OUTPUT,
    Category.PARTIAL_ZERO, Category.CONSTANT_OUTPUT, Category.STALE_OUTPUT, Category.MISMATCH, Category.API_MISMATCH,
    Category.OK,
]


def worst(categories) -> Category:
    cats = list(categories)
    return min(cats, key=CATEGORY_ORDER.index) if cats else Category.OK


@dataclass
class OutputVerdict:
    """The judgement on one output; ``metrics`` is for the primary input set."""

    name: str
    category: Category
    metrics: OutputMetrics | None
    detail: str = ""
    stale_metrics: OutputMetrics | None = None
    # Set when this output was judged with its own tolerance (a per-output override).
    tolerance: Tolerance | None = None

    @property
    def passed(self) -> bool:
        return self.category is Category.OK

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"category": self.category.value, "detail": self.detail}
        if self.metrics is not None:
            data.update(self.metrics.as_dict())
        if self.tolerance is not None:
            data["tolerance"] = self.tolerance.as_dict()
        return data


# -- health predicates: pure functions on arrays, property-tested -------------------

def is_zero_output(target: np.ndarray, reference: np.ndarray) -> bool:
    """Every element of the target is exactly zero while the reference has a non-zero one."""
    t, r = np.asarray(target), np.asarray(reference)
    return t.size > 0 and not np.any(t) and bool(np.any(r[np.isfinite(r)] != 0)) and bool(np.all(np.isfinite(t)))


def is_constant_output(target: np.ndarray, reference: np.ndarray) -> bool:
    """The target holds one value everywhere (not zero) while the reference varies."""
    t, r = np.asarray(target), np.asarray(reference)
    if t.size < 2 or not np.all(np.isfinite(t)):
        return False
    rf = r[np.isfinite(r)]
    return bool(np.all(t == t.flat[0])) and rf.size > 1 and bool(np.any(rf != rf.flat[0]))


def has_new_non_finite(target: np.ndarray, reference: np.ndarray) -> bool:
    """The target has NaN/Inf at a place where the reference is finite."""
    t, r = np.asarray(target), np.asarray(reference)
    return bool(np.any(~np.isfinite(t) & np.isfinite(r)))


def fails_tolerance(m: OutputMetrics, tol: Tolerance) -> bool:
    # ``not >=`` so that a NaN cosine (new non-finite values) fails.
    return m.outside_fraction > tol.max_outside_fraction or not m.cosine >= tol.min_cosine


def dtype_family(dtype) -> str:
    """``float`` or ``integer``: widths are not compared, since MNN stores int64 as int32 and float64 as
    float32 where ONNX Runtime keeps them, and bool as an integer type."""
    return "float" if np.dtype(dtype).kind in "fc" else "integer"


def judge_output(name: str, target: np.ndarray, reference: np.ndarray, tol: Tolerance,
                 *, target_b: np.ndarray | None = None, reference_b: np.ndarray | None = None) -> OutputVerdict:
    """Judge one output. ``*_b`` are the same output for the second input set (stale check)."""
    target, reference = np.asarray(target), np.asarray(reference)
    if target.size == 0 and reference.size != 0:
        return OutputVerdict(name, Category.RUNTIME_ERROR, None,
                             f"output is an empty tensor {target.shape}; the reference has shape {reference.shape}")
    same_kind = dtype_family(target.dtype) == dtype_family(reference.dtype)
    if target.shape != reference.shape:
        dtypes = "" if same_kind else f" (and dtype {target.dtype} vs {reference.dtype})"
        return OutputVerdict(name, Category.SHAPE_MISMATCH, None,
                             f"shape {target.shape} but the reference has {reference.shape}{dtypes}")
    if not same_kind:
        # An int output where the reference is float (or the reverse) is a different
        # interface even when the numbers would compare equal.
        return OutputVerdict(name, Category.SHAPE_MISMATCH, None,
                             f"dtype {target.dtype} but the reference has {reference.dtype} (shape {target.shape})")
    m = compare(target, reference, atol=tol.atol, rtol=tol.rtol)
    stale_m = None
    stale = False
    if target_b is not None and reference_b is not None and np.shape(target_b) == reference.shape:
        stale_m = compare(target_b, reference_b, atol=tol.atol, rtol=tol.rtol)
        # Only a bit-identical target needs the (costlier) check that the reference moved.
        stale = (bool(np.array_equal(target, target_b, equal_nan=True))
                 and compare(reference_b, reference, atol=tol.atol, rtol=tol.rtol).outside_fraction > 0)
    if not fails_tolerance(m, tol) and not (stale_m is not None and fails_tolerance(stale_m, tol)):
        return OutputVerdict(name, Category.OK, m, "", stale_m)
    cat, detail = _classify(target, reference, m, tol, stale)
    return OutputVerdict(name, cat, m, detail, stale_m)


def _classify(t: np.ndarray, r: np.ndarray, m: OutputMetrics, tol: Tolerance, stale: bool) -> tuple[Category, str]:
    if has_new_non_finite(t, r):
        nan, inf = int(np.count_nonzero(np.isnan(t))), int(np.count_nonzero(np.isinf(t)))
        return Category.NON_FINITE, (f"{nan} NaN and {inf} Inf of {t.size} elements where the reference is finite")
    if is_zero_output(t, r):
        return Category.ZERO_OUTPUT, (f"every element is exactly 0; the reference is {m.ref_zero_fraction:.1%} "
                                      f"zeros with max |ref| {m.ref_scale:.4g}")
    if m.new_zero_fraction >= tol.partial_zero_fraction:
        return Category.PARTIAL_ZERO, (f"{m.new_zero_fraction:.1%} of elements became exactly 0 where the reference "
                                       f"is not (zeros: target {m.zero_fraction:.1%}, reference {m.ref_zero_fraction:.1%})"
                                       + _zero_region(t, r))
    if is_constant_output(t, r):
        return Category.CONSTANT_OUTPUT, f"every element equals {float(t.flat[0]):.6g}; the reference varies"
    if stale:
        return Category.STALE_OUTPUT, ("identical output for two different inputs while the reference changed: "
                                       "the backend did not recompute (stale data)")
    return Category.MISMATCH, (f"{m.outside_fraction:.2%} of elements outside tolerance, max abs {m.max_abs:.4g} "
                               f"({m.max_abs / m.ref_scale:.3g} of ref scale), cosine {m.cosine:.6f}")


def _zero_region(t: np.ndarray, r: np.ndarray) -> str:
    """Where the new zeros are, in the first non-batch axis (channels for NCHW)."""
    if t.ndim < 2:
        return ""
    newly = (t == 0) & (r != 0)
    axis_counts = newly.reshape(newly.shape[0], newly.shape[1], -1).any(axis=(0, 2))
    hit = np.flatnonzero(axis_counts)
    if hit.size == 0 or hit.size == t.shape[1]:
        return ""
    return f"; affected indices on axis 1: {_ranges(hit)} of {t.shape[1]}"


def _ranges(idx: np.ndarray) -> str:
    parts, start, prev = [], int(idx[0]), int(idx[0])
    for i in idx[1:]:
        i = int(i)
        if i != prev + 1:
            parts.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = i
        prev = i
    parts.append(f"{start}" if start == prev else f"{start}-{prev}")
    return ",".join(parts)


@dataclass
class Verdict:
    """The judgement on one configuration: its worst category plus every output's."""

    category: Category
    outputs: list[OutputVerdict] = field(default_factory=list)
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.category is Category.OK


def judge_outputs(targets: Mapping[str, np.ndarray], references: Mapping[str, np.ndarray], tol: Tolerance,
                  *, targets_b: Mapping[str, np.ndarray] | None = None,
                  references_b: Mapping[str, np.ndarray] | None = None,
                  output_tolerances: Mapping[str, Tolerance] | None = None) -> Verdict:
    """Judge every output the reference has; a missing or extra output is a shape mismatch.

    ``output_tolerances`` replaces ``tol`` for the outputs it names.
    """
    verdicts: list[OutputVerdict] = []
    output_tolerances = output_tolerances or {}
    for name, ref in references.items():
        if name not in targets:
            verdicts.append(OutputVerdict(name, Category.SHAPE_MISMATCH, None,
                                          f"the target has no output named {name!r} (it has {sorted(targets)})"))
            continue
        own = output_tolerances.get(name)
        verdicts.append(judge_output(name, targets[name], ref, own or tol,
                                     target_b=None if targets_b is None else targets_b.get(name),
                                     reference_b=None if references_b is None else references_b.get(name)))
        if own is not None:
            verdicts[-1].tolerance = own
    for name in targets:
        if name not in references:
            verdicts.append(OutputVerdict(name, Category.SHAPE_MISMATCH, None,
                                          f"output {name!r} is not in the reference (it has {sorted(references)})"))
    return Verdict(worst(v.category for v in verdicts), verdicts)
