"""Every number used to compare a target output with its reference, in one place.

All metrics are computed in float64.  Where the target has NaN/Inf that the
reference does not, the error is unbounded: ``max_abs``, ``max_rel``,
``mean_abs`` and ``rmse`` are ``inf`` and ``cosine`` is NaN, so no summary
number makes a broken output look healthy.  NaN/Inf shared by both arrays at the
same place are not differences.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# Below this many dB of signal-to-noise an output is visibly wrong; above
# 140 dB the difference is at float32 rounding level.  Report as finite
# numbers so the JSON stays valid.
_SNR_CAP_DB = 200.0


@dataclass(frozen=True)
class OutputMetrics:
    """How far one target tensor is from its reference."""

    shape: tuple[int, ...]
    ref_shape: tuple[int, ...]
    size: int
    max_abs: float
    max_rel: float
    mean_abs: float
    rmse: float
    cosine: float
    snr_db: float
    ref_scale: float
    outside_fraction: float
    worst_index: tuple[int, ...]
    worst_target: float
    worst_reference: float
    zero_fraction: float
    ref_zero_fraction: float
    new_zero_fraction: float
    nonfinite_count: int
    ref_nonfinite_count: int
    # The largest |target - ref| / allowance over all elements (0 when equal; inf for new NaN/Inf or a zero
    # allowance): how far the worst element is outside, in units of what it may differ.
    excess_ratio: float = 0.0
    # Exact zeros in the target where the reference is not zero, within tolerance or not: with the rise of
    # ``zero_fraction`` over ``ref_zero_fraction``, what tells a collapse from zeros that only moved.
    zeroed_fraction: float = 0.0
    # The absolute floor the elements were judged with (the tier's, or the measured noise).
    abs_floor: float = 0.0

    @property
    def zero_rise(self) -> float:
        """How much the share of exact zeros grew over the reference's."""
        return self.zero_fraction - self.ref_zero_fraction

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["shape"] = list(self.shape)
        data["ref_shape"] = list(self.ref_shape)
        data["worst_index"] = list(self.worst_index)
        return data


def reference_scale(reference: np.ndarray) -> float:
    """The magnitude that absolute tolerances are measured against.

    The largest finite ``|x|`` of the reference: a [0, 1] image and a logits
    tensor in the hundreds are then judged by the same relative standard.  An
    all-zero reference has scale 1 so tolerances stay meaningful.
    """
    ref = np.asarray(reference, dtype=np.float64)
    finite = ref[np.isfinite(ref)]
    if finite.size == 0:
        return 1.0
    scale = float(np.max(np.abs(finite)))
    return scale if scale > 0 else 1.0


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of the angle between two tensors; 1.0 when both are all zero."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    # Divide by the largest magnitude first: squaring values near 1e300 would
    # overflow float64 long before the cosine stops being meaningful.
    ma, mb = (float(np.max(np.abs(x))) if x.size else 0.0 for x in (a, b))
    if ma == 0.0 and mb == 0.0:
        return 1.0
    if ma == 0.0 or mb == 0.0:
        return 0.0
    a, b = a / ma, b / mb
    return float(np.clip(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)), -1.0, 1.0))


def snr_db(target: np.ndarray, reference: np.ndarray) -> float:
    """Signal-to-noise ratio of the target against the reference, in dB."""
    ref = np.asarray(reference, dtype=np.float64).ravel()
    err = np.asarray(target, dtype=np.float64).ravel() - ref
    return _snr_from_sums(float(np.sum(ref * ref)), float(np.sum(err * err)))


# Elements per slice: float64 temporaries of a slice stay in cache-sized
# blocks, so comparing a 512x512x64 activation costs a few MB, not hundreds.
CHUNK = 1 << 18


@dataclass(frozen=True, eq=False)
class ReferenceStats:
    """What ``compare`` takes from a float32 reference of one slice alone (|r|, its finiteness and maximum, the
    non-zero mask and count, the sum of squares), computed once for the comparisons of every configuration's
    output with it (``reference_stats``).  ``compare`` uses it only for that very array, against a float32
    target."""

    array: np.ndarray
    abs_r: np.ndarray
    finite: np.ndarray
    all_finite: bool
    top: float
    nonzero: np.ndarray
    nonzero_count: int
    rr: float


def reference_stats(reference: np.ndarray) -> ReferenceStats | None:
    """``reference``'s stats, or None for a reference ``compare`` does not take in one float32 slice."""
    if not isinstance(reference, np.ndarray) or reference.dtype != np.float32 or not 0 < reference.size <= CHUNK:
        return None
    flat = reference.reshape(-1)
    abs_r = np.abs(flat)
    finite = np.isfinite(abs_r)
    all_finite = bool(finite.all())
    kept = abs_r if all_finite else abs_r[finite]
    nonzero = abs_r > 0
    top = float(kept.max()) if kept.size else 0.0
    # Above 1e18 ``compare`` squares in float64 (see ``_Accumulator.add``) and does not use this sum, whose float32
    # squares could overflow (and warn, where compare does not).
    rr = float((flat * flat).sum(dtype=np.float64)) if all_finite and top <= 1e18 else float("nan")
    return ReferenceStats(reference, abs_r, finite, all_finite, top, nonzero, int(np.count_nonzero(nonzero)), rr)


def compare(target: np.ndarray, reference: np.ndarray, *, atol: float, rtol: float,
            abs_floor: float = 0.0, stats: ReferenceStats | None = None) -> OutputMetrics:
    """All metrics for one output; shapes must already match (see ``verdict``).

    An element is outside when ``|t - r| > max(atol * scale + rtol * |r|, abs_floor)``.

    Works slice by slice in float64 (two passes: the reference's scale, then
    everything else), so memory stays bounded and sums stay exact enough for
    cosines near 1 on tensors of millions of elements.

    ``stats``: ``reference_stats(reference)``, when the same reference is compared again and again (the
    same numbers, without the passes over the reference alone).
    """
    tgt, ref = np.asarray(target), np.asarray(reference)
    shape, size = tuple(tgt.shape), int(tgt.size)
    if size == 0:
        return OutputMetrics(shape, tuple(ref.shape), 0, 0.0, 0.0, 0.0, 0.0, 1.0, _SNR_CAP_DB, 1.0, 0.0, (),
                             0.0, 0.0, 0.0, 0.0, 0.0, 0, 0)
    t_all, r_all = tgt.reshape(-1), ref.reshape(-1)
    # float32 outputs are compared in float32 (their own precision: differences
    # are exact to a rounding of the tolerance) with float64 sums; anything
    # else (float64, integers) in float64.
    work = np.float32 if tgt.dtype == np.float32 and ref.dtype == np.float32 else np.float64
    acc = _Accumulator()
    if size <= CHUNK:
        # One slice (every output of a small model): the scale pass's |r| and finiteness are the ones the
        # comparison needs, so they are computed once, in the working precision (|r| and float32 -> float64
        # are exact, so the maximum is the one a float64 pass finds).  Numpy's cost per call, not per element,
        # is what small outputs pay.
        r = r_all.astype(work, copy=False)
        if stats is not None and stats.array is reference and work is np.float32:
            abs_r, r_finite, r_all_finite, top = stats.abs_r, stats.finite, stats.all_finite, stats.top
        else:
            stats = None
            abs_r = np.abs(r)
            r_finite = np.isfinite(abs_r)
            r_all_finite = bool(r_finite.all())
            finite = abs_r if r_all_finite else abs_r[r_finite]
            top = float(finite.max()) if finite.size else 0.0
        scale = top if top > 0 else 1.0
        acc.add(t_all.astype(work, copy=False), r, 0, atol * scale, rtol, abs_floor,
                reference=(abs_r, r_finite, r_all_finite, top, stats))
    else:
        slices = [slice(i, min(i + CHUNK, size)) for i in range(0, size, CHUNK)]
        scale = 0.0
        for sl in slices:
            r = np.abs(r_all[sl].astype(np.float64, copy=False))
            is_finite = np.isfinite(r)
            finite = r if is_finite.all() else r[is_finite]
            if finite.size:
                scale = max(scale, float(finite.max()))
        scale = scale if scale > 0 else 1.0
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
        rmse = math.sqrt(acc.sum_sq / size)  # a Python float: IEEE's sqrt, as np.sqrt's, without its call
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
            abs_floor: float = 0.0, reference: tuple | None = None) -> None:
        """One slice.  ``reference``: (|r|, isfinite(r), all of it finite, max finite |r|, ``ReferenceStats`` or
        None) when the caller has them already (``compare`` on a single slice)."""
        t_finite = np.isfinite(t)
        if reference is None:
            abs_r_given, r_finite, stats = None, np.isfinite(r), None
            r_all_finite = bool(r_finite.all())
        else:
            abs_r_given, r_finite, r_all_finite, _, stats = reference
        all_finite = bool(t_finite.all()) and r_all_finite
        if all_finite:
            tf, rf, bad = t, r, None
            abs_r = abs_r_given if abs_r_given is not None else np.abs(rf)
        else:
            stats = None  # its masks and sums are of the reference whole, not of its finite-masked copy
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
        # One errstate for everything that can warn here (the calls between cannot): each costs a microsecond.
        # Huge fp16/bf16 values overflow the ratios to inf: that is their value, not a warning.
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            diff = np.abs(tf - rf)
            allowed = abs_r * t.dtype.type(rtol) + t.dtype.type(abs_bound)
            if abs_floor:
                allowed = np.maximum(allowed, t.dtype.type(abs_floor))
            excess = diff - allowed
            outside = excess > 0
            any_outside = bool(outside.any())
            if any_outside:
                ratio = diff[outside] / allowed[outside]
                self.excess_ratio = max(self.excess_ratio, float(ratio.max()))
            if bad is not None and bad.any():
                outside |= bad
                any_outside = True
                if self.worst_bad is None:
                    self.worst_bad = offset + int(np.argmax(bad))
                self.new_nonfinite = True
            i = int(excess.argmax())
            if excess[i] > self.worst_excess:
                self.worst, self.worst_excess = offset + i, float(excess[i])
            if stats is not None:
                nonzero_r, nonzero_count = stats.nonzero, stats.nonzero_count
            else:
                nonzero_r = abs_r > 0
                nonzero_count = int(np.count_nonzero(nonzero_r))
            if nonzero_count == abs_r.size:  # the same ratios without two masked copies
                self.max_rel = max(self.max_rel, float((diff / abs_r).max()))
            elif nonzero_count:
                self.max_rel = max(self.max_rel, float((diff[nonzero_r] / abs_r[nonzero_r]).max()))
        dmax = float(diff.max())
        self.max_abs = max(self.max_abs, dmax)
        self.sum_abs += float(diff.sum(dtype=np.float64))
        if t.dtype == np.float32 and dmax + (reference[3] if reference is not None and all_finite
                                             else float(abs_r.max())) > 1e18:
            # Squares of |x| > 1.8e19 overflow float32 (inf inputs drive activations to ~3e38): this
            # slice's products go to float64, or identical outputs would get cosine NaN and fail.
            tf, rf, diff = tf.astype(np.float64), rf.astype(np.float64), diff.astype(np.float64)
            stats = None  # its sum of squares is of float32 products
        # Products in the working precision, sums in float64 (pairwise): not
        # np.dot, whose BLAS threads thrash on a loaded 2-core CI machine and
        # which would sum float32 in float32.
        # ndarray.sum is np.sum's own reduction without its Python wrapper (same result, less per-call cost).
        self.sum_sq += float((diff * diff).sum(dtype=np.float64))
        self.tt += float((tf * tf).sum(dtype=np.float64))
        self.rr += stats.rr if stats is not None else float((rf * rf).sum(dtype=np.float64))
        self.tr += float((tf * rf).sum(dtype=np.float64))
        zero_t = t == 0
        zeros = int(np.count_nonzero(zero_t))
        self.zeros += zeros
        self.ref_zeros += t.size - nonzero_count if all_finite else int(np.count_nonzero(r == 0))
        if any_outside:
            self.outside += int(np.count_nonzero(outside))
        if zeros:  # no zero in the target: nothing zeroed, nothing newly zero (two masks and counts saved)
            # All finite: r is rf, so ``r != 0`` is ``nonzero_r`` already counted (NaN would differ, hence the test).
            zeroed = zero_t & (nonzero_r if all_finite else r != 0)
            zeroed_count = int(np.count_nonzero(zeroed))
            self.zeroed += zeroed_count
            if zeroed_count and any_outside:
                self.new_zeros += int(np.count_nonzero(zeroed & outside))


def _cosine_from_sums(tt: float, rr: float, tr: float) -> float:
    if tt == 0.0 and rr == 0.0:
        return 1.0
    if tt == 0.0 or rr == 0.0:
        return 0.0
    if not (math.isfinite(tt) and math.isfinite(rr) and math.isfinite(tr)):
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
