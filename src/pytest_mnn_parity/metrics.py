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
    signal = float(np.sum(ref * ref))
    noise = float(np.sum(err * err))
    if noise == 0.0:
        return _SNR_CAP_DB
    if signal == 0.0:
        return -_SNR_CAP_DB
    return float(np.clip(10.0 * math.log10(signal / noise), -_SNR_CAP_DB, _SNR_CAP_DB))


def compare(target: np.ndarray, reference: np.ndarray, *, atol: float, rtol: float) -> OutputMetrics:
    """All metrics for one output; shapes must already match (see ``verdict``)."""
    tgt, ref = np.asarray(target), np.asarray(reference)
    shape, size = tuple(tgt.shape), int(tgt.size)
    if size == 0:
        return OutputMetrics(shape, tuple(ref.shape), 0, 0.0, 0.0, 0.0, 0.0, 1.0, _SNR_CAP_DB, 1.0, 0.0, (),
                             0.0, 0.0, 0.0, 0.0, 0.0, 0, 0)
    t = tgt.astype(np.float64, copy=False).ravel()
    r = ref.astype(np.float64, copy=False).ravel()
    t_finite, r_finite = np.isfinite(t), np.isfinite(r)
    all_finite = bool(t_finite.all() and r_finite.all())
    if all_finite:  # the common case: skip every mask
        tf, rf, new_bad = t, r, None
        scale = reference_scale(r)
    else:
        finite = t_finite & r_finite
        # A NaN/Inf the reference shares at the same place (same inf, both NaN)
        # is not a difference; any other one is outside tolerance by definition.
        with np.errstate(invalid="ignore"):
            same = ~finite & ((t == r) | (np.isnan(t) & np.isnan(r)))
        new_bad = ~finite & ~same
        tf, rf = np.where(finite, t, 0.0), np.where(finite, r, 0.0)
        scale = reference_scale(r[r_finite]) if r_finite.any() else 1.0
    abs_r = np.abs(rf)
    with np.errstate(over="ignore", invalid="ignore"):
        diff = np.abs(tf - rf)
        excess = diff - (atol * scale + rtol * abs_r)
    outside = excess > 0
    # Relative error is only defined where the reference is non-zero; elements
    # where it is zero are judged by the scaled absolute tolerance alone.
    rel = np.divide(diff, abs_r, out=np.zeros_like(diff), where=abs_r > 0)
    new_nonfinite = new_bad is not None and bool(new_bad.any())
    if new_nonfinite:
        outside |= new_bad
        worst_flat = int(np.argmax(new_bad))
    else:
        worst_flat = int(np.argmax(excess))
    zero_t = t == 0
    new_zero = zero_t & (r != 0) & outside
    if new_nonfinite:
        # An unbounded error: numbers computed over the finite rest would make a
        # broken output look perfect.
        max_abs = max_rel = mean_abs = rmse = float("inf")
        cosine, snr = float("nan"), -_SNR_CAP_DB
    else:
        max_abs, max_rel = float(diff.max()), float(rel.max())
        mean_abs = float(diff.mean())
        rmse = float(np.sqrt(np.mean(diff * diff)))
        cosine = cosine_similarity(tf, rf)
        snr = snr_db(tf, rf)
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
        outside_fraction=float(np.count_nonzero(outside)) / size,
        worst_index=tuple(int(i) for i in np.unravel_index(worst_flat, shape)),
        worst_target=float(t[worst_flat]),
        worst_reference=float(r[worst_flat]),
        zero_fraction=float(np.count_nonzero(zero_t)) / size,
        ref_zero_fraction=float(np.count_nonzero(r == 0)) / size,
        new_zero_fraction=float(np.count_nonzero(new_zero)) / size,
        nonfinite_count=int(size - np.count_nonzero(t_finite)),
        ref_nonfinite_count=int(size - np.count_nonzero(r_finite)),
    )
