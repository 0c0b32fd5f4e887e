"""A cheap first pass for per-layer comparison: proves a layer passes, or hands it to ``metrics.compare``.

``compare`` takes about ten passes over a tensor in float64-accumulated sums;
most traced layers pass by a wide margin and only their verdict matters. This
pass computes ``|target - reference|`` in float32 exactly as ``compare`` does
(same values, same max) and accepts a tensor only when the verdict is certain:

* every element within ``atol x scale`` (the tier's absolute bound alone, so
  ``compare``'s per-element test ``|d| <= atol x scale + rtol x |ref|`` holds
  and ``outside_fraction`` is exactly 0);
* the cosine provably at or above the tier's minimum: with ``||e||^2 <= n
  max|d|^2``, ``cos(t, r) >= sqrt(1 - n max|d|^2 / ||r||^2)``, with a margin of
  1e-6 for rounding in ``compare``'s own sums.

Anything else (NaN/Inf, non-float32 tensors, a tensor near the bound) goes to
the full comparison, so verdicts are unchanged.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from .metrics import CHUNK
from .tolerances import Tolerance

COSINE_MARGIN = 1e-6


@dataclass(frozen=True)
class RefStats:
    """What the quick pass needs of a reference tensor, computed once when it is recorded."""

    scale: float  # as metrics.reference_scale: max finite |x|, 1.0 for all-zero
    sum_sq: float  # sum of squares in float64
    finite: bool


def ref_stats(ref: np.ndarray) -> RefStats | None:
    if ref.dtype != np.float32 or ref.size == 0:
        return None
    flat = np.asarray(ref).reshape(-1)
    top, sum_sq, finite = 0.0, 0.0, True
    for i in range(0, flat.size, CHUNK):
        part = flat[i:i + CHUNK]
        m = float(np.max(np.abs(part)))
        if not math.isfinite(m):
            finite = False
            break
        top = max(top, m)
        # Squares in float32, summed in float64 (np.dot's BLAS threads thrash on a loaded 2-core machine).
        sum_sq += float(np.sum(np.square(part, dtype=np.float64 if m > 1e18 else np.float32), dtype=np.float64))
    return RefStats(top if top > 0 else 1.0, sum_sq, finite)


@dataclass(frozen=True)
class QuickMetrics:
    """A layer that provably passes: its exact largest difference and a lower bound on its cosine."""

    shape: tuple[int, ...]
    max_abs: float
    ref_scale: float
    cosine_min: float  # at most what ``compare`` computes, rounding included

    def as_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "max_abs": self.max_abs, "ref_scale": self.ref_scale,
                "outside_fraction": 0.0, "cosine_min": self.cosine_min, "metrics": "quick"}


def quick_pass(target: np.ndarray, ref: np.ndarray, stats: RefStats | None, tol: Tolerance, *,
               workers: int | None = None) -> QuickMetrics | None:
    """``QuickMetrics`` when ``target`` certainly passes ``tol`` against ``ref`` (same shape), else None.

    ``workers`` (default: ``parallel_workers()``) splits a large tensor into that many spans read by threads at
    once (numpy lets go of the GIL in these loops); the largest difference is the same whichever order the spans
    finish in, so the answer is too.
    """
    if stats is None or not stats.finite or target.dtype != np.float32 or ref.dtype != np.float32:
        return None
    size = int(target.size)
    if size == 0 or target.shape != ref.shape:
        return None
    bound = np.float32(tol.atol * stats.scale)  # as compare: the bound in the working precision
    t_all, r_all = target.reshape(-1), np.asarray(ref).reshape(-1)
    workers = parallel_workers() if workers is None else workers
    chunks = -(-size // CHUNK)
    if workers > 1 and chunks >= 2 * workers:
        per = -(-chunks // workers) * CHUNK
        spans = [(lo, min(lo + per, size)) for lo in range(0, size, per)]
        tops = list(_pool().map(lambda span: _largest_difference(t_all, r_all, *span, bound), spans))
        top = None if any(t is None for t in tops) else max(tops)
    else:
        top = _largest_difference(t_all, r_all, 0, size, bound)
    if top is None:
        return None
    if stats.sum_sq == 0.0:
        cosine_min = 1.0 if top == 0.0 else 0.0
    else:
        ratio = size * top * top / stats.sum_sq
        cosine_min = math.sqrt(1.0 - ratio) if ratio < 1.0 else 0.0
    if cosine_min < tol.min_cosine + COSINE_MARGIN or tol.max_outside_fraction < 0:
        return None
    # Reported less the margin: a bound on the cosine compare would compute, rounding included.
    return QuickMetrics(tuple(target.shape), top, stats.scale, cosine_min - COSINE_MARGIN)


def _largest_difference(t_all: np.ndarray, r_all: np.ndarray, start: int, stop: int, bound) -> float | None:
    """max |t - r| over [start, stop), or None as soon as a chunk is beyond ``bound`` (or NaN)."""
    buf = np.empty(min(CHUNK, stop - start), dtype=np.float32)
    top = 0.0
    for i in range(start, stop, CHUNK):
        n = min(CHUNK, stop - i)
        d = np.subtract(t_all[i:i + n], r_all[i:i + n], out=buf[:n])
        # max|d| is max(max d, -min d), bit for bit: two reads instead of an |d| pass that writes the chunk.
        hi, lo = d.max(), d.min()
        if not (hi <= bound and -lo <= bound):  # also NaN: a new non-finite value
            return None
        top = max(top, float(hi), float(-lo))
    return top


# Threads for one quick pass: none below 4 usable cores, where they would only take turns with MNN's own.
MAX_WORKERS = 4
_POOL: list[ThreadPoolExecutor] = []


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def parallel_workers() -> int:
    cores = usable_cores()
    return min(MAX_WORKERS, cores) if cores >= 4 else 1


def _pool() -> ThreadPoolExecutor:
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(MAX_WORKERS, thread_name_prefix="mnn-parity-quick"))
    return _POOL[0]
