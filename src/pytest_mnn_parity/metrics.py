"""Every number used to compare a target output with its reference, in one place.

All metrics are computed in float64 on the finite elements of both arrays, so
a single NaN does not turn the whole table into NaN; non-finite elements are
counted separately (the health checks in ``verdict.py`` judge them).
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
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    # Normalise first: squaring large values would overflow float64's range
    # long before the cosine stops being meaningful.
    return float(np.clip(np.dot(a / na, b / nb), -1.0, 1.0))


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


def allowed_error(reference: np.ndarray, atol: float, rtol: float, scale: float) -> np.ndarray:
    """Per-element bound: ``atol * scale + rtol * |reference|``."""
    return atol * scale + rtol * np.abs(np.asarray(reference, dtype=np.float64))


def compare(target: np.ndarray, reference: np.ndarray, *, atol: float, rtol: float) -> OutputMetrics:
    """All metrics for one output; shapes must already match (see ``verdict``)."""
    tgt = np.asarray(target)
    ref = np.asarray(reference)
    t = tgt.astype(np.float64, copy=False)
    r = ref.astype(np.float64, copy=False)
    finite = np.isfinite(t) & np.isfinite(r)
    scale = reference_scale(r)
    size = int(t.size)
    if size == 0:
        return OutputMetrics(tuple(tgt.shape), tuple(ref.shape), 0, 0.0, 0.0, 0.0, 0.0, 1.0, _SNR_CAP_DB,
                             scale, 0.0, (), 0.0, 0.0, 0.0, 0.0, 0.0, 0, 0)
    diff = np.where(finite, np.abs(t - r), 0.0)
    rel = np.where(finite, diff / np.maximum(np.abs(r), np.finfo(np.float64).tiny), 0.0)
    rel = np.where(diff == 0.0, 0.0, rel)
    bound = allowed_error(r, atol, rtol, scale)
    # A non-finite element the reference does not share is outside tolerance
    # by definition; one the reference shares exactly (same inf, both NaN) is not.
    same_nonfinite = ~finite & ((t == r) | (np.isnan(t) & np.isnan(r)))
    outside = (~finite & ~same_nonfinite) | (diff > bound)
    if finite.any():
        worst_flat = int(np.argmax(np.where(finite, diff - bound, -np.inf)))
    else:
        worst_flat = 0
    if (~finite & ~same_nonfinite).any():
        worst_flat = int(np.argmax((~finite & ~same_nonfinite).ravel()))
    worst = tuple(int(i) for i in np.unravel_index(worst_flat, t.shape))
    fd = diff[finite]
    return OutputMetrics(
        shape=tuple(tgt.shape),
        ref_shape=tuple(ref.shape),
        size=size,
        max_abs=float(fd.max()) if fd.size else 0.0,
        max_rel=float(rel[finite].max()) if fd.size else 0.0,
        mean_abs=float(fd.mean()) if fd.size else 0.0,
        rmse=float(np.sqrt(np.mean(fd * fd))) if fd.size else 0.0,
        cosine=cosine_similarity(np.where(finite, t, 0.0), np.where(finite, r, 0.0)),
        snr_db=snr_db(np.where(finite, t, 0.0), np.where(finite, r, 0.0)),
        ref_scale=scale,
        outside_fraction=float(np.count_nonzero(outside)) / size,
        worst_index=worst,
        worst_target=float(t.ravel()[worst_flat]),
        worst_reference=float(r.ravel()[worst_flat]),
        new_zero_fraction=float(np.count_nonzero((t == 0) & (r != 0) & outside)) / size,
        zero_fraction=float(np.count_nonzero(t == 0)) / size,
        ref_zero_fraction=float(np.count_nonzero(r == 0)) / size,
        nonfinite_count=int(np.count_nonzero(~np.isfinite(t))),
        ref_nonfinite_count=int(np.count_nonzero(~np.isfinite(r))),
    )

