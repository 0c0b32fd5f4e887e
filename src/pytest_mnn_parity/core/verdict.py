"""Decide, per output and per configuration, whether MNN gave the right answer.

Health checks classify *how* an output is wrong; they never make a correct
output fail.  An output first fails or passes on numbers (``metrics`` against
``tolerances``); a failing output is then given the most specific category
that fits, in the order of ``CATEGORY_ORDER``.  The configuration's category
is its worst output's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

# The categories live apart (``categories``): the plugin reads them at every start-up without importing numpy.
from .categories import CATEGORY_ORDER as CATEGORY_ORDER
from .categories import SESSION_MADE as SESSION_MADE
from .categories import Category, worst
from .categories import session_made as session_made
from .metrics import OutputMetrics, ReferenceStats, compare, reference_stats
from .tolerances import Tolerance


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
    # Which bound decided (``tolerance_decision``), for input set A; and the set that failed, A or B.
    decided_by: str = ""
    failing_set: str = ""
    # What is wrong with the reference's own output, if anything (``degenerate``): "all zeros", ...
    reference_note: str = ""

    @property
    def passed(self) -> bool:
        return self.category is Category.OK

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"category": self.category.value, "detail": self.detail}
        if self.metrics is not None:
            data.update(self.metrics.as_dict())
        if self.tolerance is not None:
            data["tolerance"] = self.tolerance.as_dict()
        data["decided_by"] = self.decided_by
        if self.failing_set:
            data["failing_set"] = self.failing_set
        if self.stale_metrics is not None and self.failing_set == "B":
            data["set_b"] = self.stale_metrics.as_dict()
        if self.reference_note:
            data["reference_note"] = self.reference_note
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


# What ``tolerance_decision`` says when an output passes.
PASSING_DECISIONS = ("exact", "absolute floor", "within tolerance", "outliers allowed")


def tolerance_decision(m: OutputMetrics, tol: Tolerance) -> str:
    """The bound that decided, for the report: one of ``PASSING_DECISIONS`` when the output passes, else
    "outside fraction", "outlier size" or "cosine" (the first bound it breaks, in that order)."""
    if m.max_abs == 0 and m.nonfinite_count == m.ref_nonfinite_count:
        return "exact"
    if m.outside_fraction == 0 and m.max_abs <= max(tol.abs_floor, m.abs_floor):
        return "absolute floor"
    if m.outside_fraction > tol.max_outside_fraction:
        return "outside fraction"
    if m.outside_fraction > 0 and not m.excess_ratio <= tol.outlier_limit:
        return "outlier size"
    # ``not >=`` so that a NaN cosine (new non-finite values) fails.
    if not m.cosine >= tol.min_cosine:
        return "cosine"
    return "within tolerance" if m.outside_fraction == 0 else "outliers allowed"


def fails_tolerance(m: OutputMetrics, tol: Tolerance) -> bool:
    return tolerance_decision(m, tol) not in PASSING_DECISIONS


def degenerate(reference: np.ndarray) -> str:
    """What makes a reference output useless to compare against ("" when it is fine): a float output that is
    all zeros, one constant value, or not finite anywhere."""
    r = np.asarray(reference)
    if r.size < 2 or r.dtype.kind not in "fc":
        return ""
    low, high = r.min(), r.max()
    if low != high and np.isfinite(low) and np.isfinite(high):
        return ""  # two reductions settle a healthy output: the judging of every configuration calls this
    finite = np.isfinite(r)
    if not finite.any():
        return "not finite anywhere"
    if not r.any():
        return "all zeros"
    if finite.all() and bool(np.all(r == r.flat[0])):
        return f"constant ({float(r.flat[0]):.6g} everywhere)"
    return ""


def dtype_family(dtype) -> str:
    """``float`` or ``integer``: widths are not compared, since MNN stores int64 as int32 and float64 as
    float32 where ONNX Runtime keeps them, and bool as an integer type."""
    return "float" if np.dtype(dtype).kind in "fc" else "integer"


def judge_output(name: str, target: np.ndarray, reference: np.ndarray, tol: Tolerance,
                 *, target_b: np.ndarray | None = None, reference_b: np.ndarray | None = None,
                 floor: float = 0.0, stats: ReferenceStats | None = None,
                 stats_b: ReferenceStats | None = None) -> OutputVerdict:
    """Judge one output. ``*_b`` are the same output for the second input set (stale check).

    ``floor``: an absolute floor measured for this output (its thread-count noise), used where it is
    above the tier's ``abs_floor``.  ``stats``, ``stats_b``: ``reference_stats`` of the two references."""
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
    # A floor the user set explicitly is the floor: the measured one no longer applies.
    floor = tol.abs_floor if "abs_floor" in tol.overridden else max(tol.abs_floor, floor)
    m = compare(target, reference, atol=tol.atol, rtol=tol.rtol, abs_floor=floor, stats=stats)
    decided = tolerance_decision(m, tol)
    stale_m = None
    stale = False
    if target_b is not None and reference_b is not None and np.shape(target_b) == reference.shape:
        stale_m = compare(target_b, reference_b, atol=tol.atol, rtol=tol.rtol, abs_floor=floor, stats=stats_b)
        # Only a bit-identical target needs the (costlier) check that the reference moved.
        stale = (_same_values(target, np.asarray(target_b), m)
                 and compare(reference_b, reference, atol=tol.atol, rtol=tol.rtol, abs_floor=floor,
                             stats=stats).outside_fraction > 0)
    failed_a = decided not in PASSING_DECISIONS
    failed_b = stale_m is not None and fails_tolerance(stale_m, tol)
    if not failed_a and not failed_b:
        return OutputVerdict(name, Category.OK, m, "", stale_m, decided_by=decided)
    # The failure is described with the numbers of the set that failed: set A's when it did, else B's.
    shown, shown_ref = (m, reference) if failed_a else (stale_m, reference_b)
    shown_t = target if failed_a else target_b
    cat, detail = _classify(shown_t, shown_ref, shown, tol, stale)
    if not failed_a:
        decided = tolerance_decision(stale_m, tol)
        detail = f"input set B: {detail} (set A passes)" if cat is not Category.STALE_OUTPUT else detail
    elif cat is Category.MISMATCH:
        detail += f" (decided by: {decided})"
    return OutputVerdict(name, cat, m, detail, stale_m, decided_by=decided, failing_set="A" if failed_a else "B")


def _same_values(target: np.ndarray, target_b: np.ndarray, m: OutputMetrics) -> bool:
    """``np.array_equal(target, target_b, equal_nan=True)`` for arrays of one shape, where ``m`` is
    ``target``'s metrics: without a NaN in ``target`` (``m.nonfinite_count``) that is plain equality, one
    pass instead of array_equal's four (it ran for every output of every configuration)."""
    if m.nonfinite_count == 0:
        return bool((target == target_b).all())
    return bool(np.array_equal(target, target_b, equal_nan=True))


def _classify(t: np.ndarray, r: np.ndarray, m: OutputMetrics, tol: Tolerance, stale: bool) -> tuple[Category, str]:
    if has_new_non_finite(t, r):
        nan, inf = int(np.count_nonzero(np.isnan(t))), int(np.count_nonzero(np.isinf(t)))
        return Category.NON_FINITE, (f"{nan} NaN and {inf} Inf of {t.size} elements where the reference is finite")
    if is_zero_output(t, r):
        return Category.ZERO_OUTPUT, (f"every element is exactly 0; the reference is {m.ref_zero_fraction:.1%} "
                                      f"zeros with max |ref| {m.ref_scale:.4g}")
    # A collapse is judged from the share of zeros, whatever the tolerance: zeros inside tolerance still count
    # (98% zeros is a collapse even where the reference is small), and zeros that only moved (the same share,
    # other places) do not.
    if m.zeroed_fraction >= tol.partial_zero_fraction and m.zero_rise >= tol.partial_zero_fraction:
        return Category.PARTIAL_ZERO, (f"{m.zeroed_fraction:.1%} of elements became exactly 0 where the reference "
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


@dataclass(frozen=True, eq=False)
class PreparedReferences:
    """What judging takes from a reference's outputs alone (``prepare_references``), computed once for the
    outputs of every configuration judged against them: a model's reference is judged against 4 to 28."""

    references: Mapping[str, np.ndarray]
    references_b: Mapping[str, np.ndarray] | None
    # Per output: ``reference_stats`` of A and of B, and ``degenerate`` of A and of B.
    stats: dict[str, tuple[ReferenceStats | None, ReferenceStats | None]]
    notes: dict[str, tuple[str, str | None]]

    def of(self, references, references_b) -> "PreparedReferences | None":
        """Itself for these very mappings, else None (never numbers of other arrays)."""
        return self if references is self.references and references_b is self.references_b else None


# Elements of reference outputs whose ``reference_stats`` are kept, in all: they hold |r| and two masks per
# element (1.5 times the reference's own size), which small outputs save passes with and large ones do not.
PREPARED_ELEMENTS = 1 << 18


def prepare_references(references: Mapping[str, np.ndarray],
                       references_b: Mapping[str, np.ndarray] | None = None) -> PreparedReferences:
    """For ``judge_outputs(..., prepared=)``: the references must not change while it is used."""
    stats, notes = {}, {}
    budget = PREPARED_ELEMENTS
    for name, ref in references.items():
        ref_b = None if references_b is None else references_b.get(name)
        pair = []
        for array in (ref, ref_b):
            size = int(np.size(array)) if array is not None else 0
            pair.append(reference_stats(array) if array is not None and size <= budget else None)
            budget -= size if pair[-1] is not None else 0
        stats[name] = (pair[0], pair[1])
        note = degenerate(ref)
        notes[name] = (note, None if not note or ref_b is None else degenerate(ref_b))
    return PreparedReferences(references, references_b, stats, notes)


def judge_outputs(targets: Mapping[str, np.ndarray], references: Mapping[str, np.ndarray], tol: Tolerance,
                  *, targets_b: Mapping[str, np.ndarray] | None = None,
                  references_b: Mapping[str, np.ndarray] | None = None,
                  output_tolerances: Mapping[str, Tolerance] | None = None,
                  floors: Mapping[str, float] | None = None,
                  prepared: PreparedReferences | None = None) -> Verdict:
    """Judge every output the reference has; a missing or extra output is a shape mismatch.

    ``output_tolerances`` replaces ``tol`` for the outputs it names; ``floors`` are measured absolute floors
    per output (``judge_output``).  Outputs that pass while the reference itself is degenerate on both input
    sets (all zeros, constant, not finite) make the configuration ``degenerate_reference``: nothing was tested.
    ``prepared``: ``prepare_references(references, references_b)``, the same verdict with fewer passes.
    """
    verdicts: list[OutputVerdict] = []
    output_tolerances = output_tolerances or {}
    prepared = prepared.of(references, references_b) if prepared is not None else None
    for name, ref in references.items():
        if name not in targets:
            verdicts.append(OutputVerdict(name, Category.SHAPE_MISMATCH, None,
                                          f"the target has no output named {name!r} (it has {sorted(targets)})"))
            continue
        own = output_tolerances.get(name)
        ref_b = None if references_b is None else references_b.get(name)
        stats, stats_b = prepared.stats.get(name, (None, None)) if prepared is not None else (None, None)
        verdicts.append(judge_output(name, targets[name], ref, own or tol,
                                     target_b=None if targets_b is None else targets_b.get(name),
                                     reference_b=ref_b, floor=(floors or {}).get(name, 0.0), stats=stats,
                                     stats_b=stats_b))
        if own is not None:
            verdicts[-1].tolerance = own
        if prepared is not None and name in prepared.notes:
            note, note_b = prepared.notes[name]
        else:
            note = degenerate(ref)
            note_b = None if not note or ref_b is None else degenerate(ref_b)
        if note and (ref_b is None or note_b):
            verdicts[-1].reference_note = note
    for name in targets:
        if name not in references:
            verdicts.append(OutputVerdict(name, Category.SHAPE_MISMATCH, None,
                                          f"output {name!r} is not in the reference (it has {sorted(references)})"))
    category = worst(v.category for v in verdicts)
    floats = [v for v in verdicts if v.metrics is not None and np.asarray(references[v.name]).dtype.kind in "fc"]
    if category is Category.OK and floats and all(v.reference_note for v in floats):
        notes = "; ".join(f"{v.name!r} {v.reference_note}" for v in floats)
        return Verdict(Category.DEGENERATE_REFERENCE, verdicts,
                       f"the reference's outputs are degenerate on both input sets ({notes}): the outputs agree, "
                       "but these inputs test nothing")
    return Verdict(category, verdicts)
