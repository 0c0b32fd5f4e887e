"""Code as it was before its fast paths (main at 9367f45), frozen: the oracle that
``tests/test_fast_engine.py`` holds the fast code to, bit for bit.  Not imported by the package.

metrics.py's ``compare`` and its helpers verbatim; verdict.py's ``judge_output``, ``_classify``,
``_zero_region``, ``_ranges``, ``degenerate`` and ``judge_outputs`` verbatim except that they call
the frozen ``compare``; trace/record.py's ``activation_risk`` verbatim.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from pytest_mnn_parity.core.metrics import OutputMetrics
from pytest_mnn_parity.core.tolerances import Tolerance
from pytest_mnn_parity.core.verdict import (
    PASSING_DECISIONS,
    Category,
    OutputVerdict,
    Verdict,
    dtype_family,
    fails_tolerance,
    has_new_non_finite,
    is_constant_output,
    is_zero_output,
    tolerance_decision,
    worst,
)
from pytest_mnn_parity.mnn.weights import FP16_MAX, FP16_MIN_NORMAL
from pytest_mnn_parity.trace.record import SATURATING_OPS, ActivationRisk

# Below this many dB of signal-to-noise an output is visibly wrong; above
# 140 dB the difference is at float32 rounding level.  Report as finite
# numbers so the JSON stays valid.
_SNR_CAP_DB = 200.0


# Elements per slice: float64 temporaries of a slice stay in cache-sized
# blocks, so comparing a 512x512x64 activation costs a few MB, not hundreds.
CHUNK = 1 << 18


def compare(target: np.ndarray, reference: np.ndarray, *, atol: float, rtol: float,
            abs_floor: float = 0.0) -> OutputMetrics:
    """All metrics for one output; shapes must already match (see ``verdict``).

    An element is outside when ``|t - r| > max(atol * scale + rtol * |r|, abs_floor)``.

    Works slice by slice in float64 (two passes: the reference's scale, then
    everything else), so memory stays bounded and sums stay exact enough for
    cosines near 1 on tensors of millions of elements.
    """
    tgt, ref = np.asarray(target), np.asarray(reference)
    shape, size = tuple(tgt.shape), int(tgt.size)
    if size == 0:
        return OutputMetrics(shape, tuple(ref.shape), 0, 0.0, 0.0, 0.0, 0.0, 1.0, _SNR_CAP_DB, 1.0, 0.0, (),
                             0.0, 0.0, 0.0, 0.0, 0.0, 0, 0)
    t_all, r_all = tgt.reshape(-1), ref.reshape(-1)
    slices = [slice(i, min(i + CHUNK, size)) for i in range(0, size, CHUNK)]
    scale = 0.0
    for sl in slices:
        r = np.abs(r_all[sl].astype(np.float64, copy=False))
        is_finite = np.isfinite(r)
        finite = r if is_finite.all() else r[is_finite]
        if finite.size:
            scale = max(scale, float(finite.max()))
    scale = scale if scale > 0 else 1.0
    # float32 outputs are compared in float32 (their own precision: differences
    # are exact to a rounding of the tolerance) with float64 sums; anything
    # else (float64, integers) in float64.
    work = np.float32 if tgt.dtype == np.float32 and ref.dtype == np.float32 else np.float64
    acc = _Accumulator()
    for sl in slices:
        acc.add(t_all[sl].astype(work, copy=False), r_all[sl].astype(work, copy=False),
                sl.start, atol * scale, rtol, abs_floor)
    worst_flat = acc.worst_bad if acc.worst_bad is not None else acc.worst
    if acc.new_nonfinite:
        # An unbounded error: numbers computed over the finite rest would make a
        # broken output look perfect.
        max_abs = max_rel = mean_abs = rmse = float("inf")
        cosine, snr = float("nan"), -_SNR_CAP_DB
    else:
        max_abs, max_rel = acc.max_abs, acc.max_rel
        mean_abs = acc.sum_abs / size
        rmse = float(np.sqrt(acc.sum_sq / size))
        cosine = _cosine_from_sums(acc.tt, acc.rr, acc.tr)
        snr = _snr_from_sums(acc.rr, acc.sum_sq)
    return OutputMetrics(
        shape=shape,
        ref_shape=tuple(ref.shape),
        size=size,
        max_abs=max_abs,
        max_rel=max_rel,
        mean_abs=mean_abs,
        rmse=rmse,
        cosine=cosine,
        snr_db=snr,
        ref_scale=scale,
        outside_fraction=acc.outside / size,
        worst_index=tuple(int(i) for i in np.unravel_index(worst_flat, shape)),
        worst_target=float(t_all[worst_flat]),
        worst_reference=float(r_all[worst_flat]),
        zero_fraction=acc.zeros / size,
        ref_zero_fraction=acc.ref_zeros / size,
        new_zero_fraction=acc.new_zeros / size,
        nonfinite_count=acc.nonfinite,
        ref_nonfinite_count=acc.ref_nonfinite,
        excess_ratio=float("inf") if acc.new_nonfinite else acc.excess_ratio,
        zeroed_fraction=acc.zeroed / size,
        abs_floor=float(abs_floor),
    )


class _Accumulator:
    """Running sums and extremes over slices; see ``compare``."""

    def __init__(self):
        self.max_abs = self.max_rel = self.sum_abs = self.sum_sq = 0.0
        self.tt = self.rr = self.tr = 0.0
        self.outside = self.zeros = self.ref_zeros = self.new_zeros = self.nonfinite = self.ref_nonfinite = 0
        self.zeroed = 0
        self.excess_ratio = 0.0
        self.worst, self.worst_excess = 0, -np.inf
        self.worst_bad: int | None = None
        self.new_nonfinite = False

    def add(self, t: np.ndarray, r: np.ndarray, offset: int, abs_bound: float, rtol: float,
            abs_floor: float = 0.0) -> None:
        t_finite, r_finite = np.isfinite(t), np.isfinite(r)
        all_finite = bool(t_finite.all() and r_finite.all())
        if all_finite:
            tf, rf, bad = t, r, None
        else:
            finite = t_finite & r_finite
            # A NaN/Inf the reference shares at the same place (same inf, both
            # NaN) is not a difference; any other one is outside by definition.
            with np.errstate(invalid="ignore"):
                same = ~finite & ((t == r) | (np.isnan(t) & np.isnan(r)))
            bad = ~finite & ~same
            zero = t.dtype.type(0)
            tf, rf = np.where(finite, t, zero), np.where(finite, r, zero)
            self.nonfinite += int(t.size - np.count_nonzero(t_finite))
            self.ref_nonfinite += int(r.size - np.count_nonzero(r_finite))
        abs_r = np.abs(rf)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            diff = np.abs(tf - rf)
            allowed = abs_r * t.dtype.type(rtol) + t.dtype.type(abs_bound)
            if abs_floor:
                allowed = np.maximum(allowed, t.dtype.type(abs_floor))
            excess = diff - allowed
            outside = excess > 0
            if outside.any():
                ratio = diff[outside] / allowed[outside]
                self.excess_ratio = max(self.excess_ratio, float(ratio.max()))
        if bad is not None and bad.any():
            outside |= bad
            if self.worst_bad is None:
                self.worst_bad = offset + int(np.argmax(bad))
            self.new_nonfinite = True
        i = int(np.argmax(excess))
        if excess[i] > self.worst_excess:
            self.worst, self.worst_excess = offset + i, float(excess[i])
        nonzero_r = abs_r > 0
        nonzero_count = int(np.count_nonzero(nonzero_r))
        # Huge fp16/bf16 values overflow the ratio to inf: that is its value, not a warning.
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            if nonzero_count == abs_r.size:  # the same ratios without two masked copies
                self.max_rel = max(self.max_rel, float((diff / abs_r).max()))
            elif nonzero_count:
                self.max_rel = max(self.max_rel, float((diff[nonzero_r] / abs_r[nonzero_r]).max()))
        dmax = float(diff.max())
        self.max_abs = max(self.max_abs, dmax)
        self.sum_abs += float(diff.sum(dtype=np.float64))
        if t.dtype == np.float32 and dmax + float(abs_r.max()) > 1e18:
            # Squares of |x| > 1.8e19 overflow float32 (inf inputs drive activations to ~3e38): this
            # slice's products go to float64, or identical outputs would get cosine NaN and fail.
            tf, rf, diff = tf.astype(np.float64), rf.astype(np.float64), diff.astype(np.float64)
        # Products in the working precision, sums in float64 (pairwise): not
        # np.dot, whose BLAS threads thrash on a loaded 2-core CI machine and
        # which would sum float32 in float32.
        # ndarray.sum is np.sum's own reduction without its Python wrapper (same result, less per-call cost).
        self.sum_sq += float((diff * diff).sum(dtype=np.float64))
        self.tt += float((tf * tf).sum(dtype=np.float64))
        self.rr += float((rf * rf).sum(dtype=np.float64))
        self.tr += float((tf * rf).sum(dtype=np.float64))
        zero_t = t == 0
        self.zeros += int(np.count_nonzero(zero_t))
        # All finite: r is rf, so ``r != 0`` is ``nonzero_r`` already counted (NaN would differ, hence the test).
        r_nonzero = nonzero_r if all_finite else r != 0
        self.ref_zeros += t.size - nonzero_count if all_finite else int(np.count_nonzero(r == 0))
        self.outside += int(np.count_nonzero(outside))
        zeroed = zero_t & r_nonzero
        self.zeroed += int(np.count_nonzero(zeroed))
        self.new_zeros += int(np.count_nonzero(zeroed & outside))


def _cosine_from_sums(tt: float, rr: float, tr: float) -> float:
    if tt == 0.0 and rr == 0.0:
        return 1.0
    if tt == 0.0 or rr == 0.0:
        return 0.0
    if not (np.isfinite(tt) and np.isfinite(rr) and np.isfinite(tr)):
        return float("nan")  # values near float64's limit: only from float64 inputs
    # min/max rather than np.clip: the same value (NaN included) without numpy's per-call cost on a scalar.
    return float(min(max(tr / (math.sqrt(tt) * math.sqrt(rr)), -1.0), 1.0))


def _snr_from_sums(signal: float, noise: float) -> float:
    if noise == 0.0:
        return _SNR_CAP_DB
    if signal == 0.0:
        return -_SNR_CAP_DB
    ratio = signal / noise
    if not 0.0 < ratio < math.inf:  # under- or overflowed (found by fuzzing: log10(0) raised)
        return float("nan") if math.isnan(ratio) else (-_SNR_CAP_DB if ratio == 0.0 else _SNR_CAP_DB)
    return float(min(max(10.0 * math.log10(ratio), -_SNR_CAP_DB), _SNR_CAP_DB))  # as _cosine_from_sums


# -- verdict.py's judging, verbatim but for the frozen compare above --

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


def judge_output(name: str, target: np.ndarray, reference: np.ndarray, tol: Tolerance,
                 *, target_b: np.ndarray | None = None, reference_b: np.ndarray | None = None,
                 floor: float = 0.0) -> OutputVerdict:
    """Judge one output. ``*_b`` are the same output for the second input set (stale check).

    ``floor``: an absolute floor measured for this output (its thread-count noise), used where it is
    above the tier's ``abs_floor``."""
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
    m = compare(target, reference, atol=tol.atol, rtol=tol.rtol, abs_floor=floor)
    decided = tolerance_decision(m, tol)
    stale_m = None
    stale = False
    if target_b is not None and reference_b is not None and np.shape(target_b) == reference.shape:
        stale_m = compare(target_b, reference_b, atol=tol.atol, rtol=tol.rtol, abs_floor=floor)
        # Only a bit-identical target needs the (costlier) check that the reference moved.
        stale = (bool(np.array_equal(target, target_b, equal_nan=True))
                 and compare(reference_b, reference, atol=tol.atol, rtol=tol.rtol, abs_floor=floor).outside_fraction > 0)
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


def judge_outputs(targets: Mapping[str, np.ndarray], references: Mapping[str, np.ndarray], tol: Tolerance,
                  *, targets_b: Mapping[str, np.ndarray] | None = None,
                  references_b: Mapping[str, np.ndarray] | None = None,
                  output_tolerances: Mapping[str, Tolerance] | None = None,
                  floors: Mapping[str, float] | None = None) -> Verdict:
    """Judge every output the reference has; a missing or extra output is a shape mismatch.

    ``output_tolerances`` replaces ``tol`` for the outputs it names; ``floors`` are measured absolute floors
    per output (``judge_output``).  Outputs that pass while the reference itself is degenerate on both input
    sets (all zeros, constant, not finite) make the configuration ``degenerate_reference``: nothing was tested.
    """
    verdicts: list[OutputVerdict] = []
    output_tolerances = output_tolerances or {}
    for name, ref in references.items():
        if name not in targets:
            verdicts.append(OutputVerdict(name, Category.SHAPE_MISMATCH, None,
                                          f"the target has no output named {name!r} (it has {sorted(targets)})"))
            continue
        own = output_tolerances.get(name)
        ref_b = None if references_b is None else references_b.get(name)
        verdicts.append(judge_output(name, targets[name], ref, own or tol,
                                     target_b=None if targets_b is None else targets_b.get(name),
                                     reference_b=ref_b, floor=(floors or {}).get(name, 0.0)))
        if own is not None:
            verdicts[-1].tolerance = own
        note = degenerate(ref)
        if note and (ref_b is None or degenerate(ref_b)):
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




# -- trace/record.py's activation scan, verbatim --

def activation_risk(name: str, op_type: str, array: np.ndarray) -> list[ActivationRisk]:
    """Overflow (|x| > 65504) and underflow (most non-zero |x| < 6.1e-5) of one activation; no underflow for
    the output of a saturating op (``SATURATING_OPS``)."""
    if array.dtype.kind != "f" or array.size == 0:
        return []
    mag = np.abs(array)
    top = float(mag.max())
    if not np.isfinite(top):  # rare: ignore NaN/Inf, the verdict judges those
        mag = mag[np.isfinite(mag)]
        if mag.size == 0:
            return []
        top = float(mag.max())
    risks = []
    if top > FP16_MAX:
        over = int(np.count_nonzero(mag > FP16_MAX))
        risks.append(ActivationRisk(name, op_type, "overflow", top, over / array.size))
    if top > 0 and op_type not in SATURATING_OPS and float(mag.min()) < FP16_MIN_NORMAL:  # cheap test first
        nonzero = int(np.count_nonzero(mag))
        tiny = nonzero - int(np.count_nonzero(mag >= FP16_MIN_NORMAL))
        if tiny * 2 > nonzero:
            risks.append(ActivationRisk(name, op_type, "underflow", top, tiny / nonzero))
    return risks
