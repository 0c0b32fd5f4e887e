"""Copying a traced run's tensors and judging them: in MNN's callback (the default), or in a thread beside MNN.

MNN reuses an op's output memory once the callback returns, so the callback
must copy the tensor (``copyToHostTensor``, which also unpacks the CPU's
NC4HW4 layout: ``pymnn`` reports a packed tensor as plain NCHW, so no view of
the session's memory can be read safely).  A stream with jobs leaves only
that copy in the callback: the comparison runs in one comparison thread while
MNN runs the next ops (pymnn lets go of the GIL while MNN computes, numpy in
its loops), and each judgement is read when the run ends.  Measured slower
than judging in the callback on 2 and on 16 cores (``default_stream``), it
is not the default.

Memory stays bounded: ``max_bytes`` bounds the host copies held (lent to a
comparison or kept for reuse) plus the reference tensor each unfinished
comparison maps; one tensor is always allowed when nothing else is held.
When the comparisons fall behind, the callback waits for the oldest, so MNN
waits as it did when every comparison ran inside the callback.  One thread
judges in the order the ops ran, and no judgement reads another, so none
depends on the threads' timing (``tests/test_trace_fast.py`` runs the trace
in the callback, with a queue of one and an unbounded one, under random
delays, and compares every result).
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, TypeVar

import numpy as np

from ..mnn.runner import to_numpy
from .tensor_ids import TensorInfo

T = TypeVar("T")

# Comparisons queued or running at once: enough to bridge a run of small ops, bounded besides by bytes.
MAX_JOBS = 8
# The bytes bound in units of the reference's largest tensor: what the trace held in the callback at its largest
# tensor (its copy and the reference tensor it mapped), so a comparison of a tensor half that size runs beside the
# next copy of one as large.  2.5, with a copy kept per shape, measured 284 MB at 512 on the 2-core VM against a
# budget of 277 (bench_trace.py: plain + 3 x the largest intermediate); 2 measured 266-271 MB streamed.
HELD = 2.0
# Host copies kept for reuse once their comparison is done: one, as before streaming; more kept none faster.
KEEP = 1

_WORKER: list[ThreadPoolExecutor] = []


def default_stream(largest: int) -> "ComparisonStream":
    """In the callback: each op's comparison runs while MNN's threads wait, with the quick pass's own threads.

    Streaming to the comparison thread (``ComparisonStream(MAX_JOBS, ...)``) was measured slower everywhere: on
    the H200 machine's 16 quiet cores (MNN on 4) the LaMa-like trace took 2.74x a plain run streamed against
    2.66x in the callback at 512, and 2.50x against 2.19x at 1024; on the 2-core VM up to 8% slower.  A traced
    run moves every op's output through memory twice (MNN's copy to the host, the comparison against the
    mapped reference), and streamed those passes compete with MNN's threads for memory bandwidth instead of
    using it while they wait.  Streaming stays available (``trace_target(stream=...)``; ``bench_trace.py``
    measures both) for machines where this may differ.
    """
    return ComparisonStream(0, int(HELD * largest) if largest > 0 else None)


def _worker() -> ThreadPoolExecutor:
    # One thread for every trace of the process: judgements finish in the order they were handed over.
    if not _WORKER:
        _WORKER.append(ThreadPoolExecutor(1, thread_name_prefix="mnn-parity-trace"))
    return _WORKER[0]


class ComparisonStream:
    """Copies callback tensors to host tensors and judges them in the comparison thread.

    ``max_jobs`` 0 judges inside the callback; None puts no bound on the comparisons queued.  ``max_bytes``
    None puts no bound on the bytes held.
    """

    def __init__(self, max_jobs: int | None = MAX_JOBS, max_bytes: int | None = None, *,
                 quick_workers: int | None = None):
        self.max_jobs = max_jobs
        self.max_bytes = max_bytes
        # Threads for one quick pass in the comparison thread (None: ``quickcompare``'s own choice).
        self.quick_workers = quick_workers
        # (host tensor key, host tensor, bytes): reused by the next tensor of the same shape (consecutive ops often
        # share one), which saves an allocation and its page faults.
        self._free: list[tuple[tuple, Any, int]] = []
        self._pending: deque[tuple[Future, tuple, Any, int]] = deque()
        # Host copies held, plus each unfinished comparison's reference tensor (as large as its copy).
        self.held = 0
        self.peak_held = 0
        self.peak_jobs = 0  # comparisons queued or running at once, at most

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def kept(self) -> int:
        """Bytes of the host copies kept for reuse."""
        return sum(item[2] for item in self._free)

    def judge(self, tensor: Any, info: TensorInfo, judge: Callable[[np.ndarray], T]) -> Future:
        """``judge(copy of tensor)``, now or in the comparison thread; the copy is taken before this returns."""
        if info.nbytes == 0:
            return _done(judge, to_numpy(tensor))
        from ..mnn.library import mnn

        key = (info.shape, info.dtype, tensor.getDimensionType())
        self._make_room(key, info.nbytes)
        host = self._take(key)
        if host is None:
            host = mnn().Tensor(tensor, key[2])
        self.held += 2 * info.nbytes
        self.peak_held = max(self.peak_held, self.held)
        if not tensor.copyToHostTensor(host):
            array = np.zeros((0,) * len(info.shape), dtype=info.dtype)
        else:
            array = np.asarray(host.getNumpyData())
        if self.max_jobs == 0:
            future = _done(judge, array)
            self._give_back(key, host, info.nbytes)
            return future
        future = _worker().submit(judge, array)
        self._pending.append((future, key, host, info.nbytes))
        self.peak_jobs = max(self.peak_jobs, len(self._pending))
        return future

    def drain(self) -> None:
        """Wait for every comparison handed over (their errors are read from their futures)."""
        while self._pending:
            self._retire()

    def _make_room(self, key: tuple, nbytes: int) -> None:
        while self._pending and self._pending[0][0].done():
            self._retire()
        if self.max_jobs is not None:
            while len(self._pending) >= max(self.max_jobs, 1):
                self._retire()
        while True:
            reuse = any(item[0] == key for item in self._free)
            if not reuse:
                # Freed before another is made, as before streaming: two copies at once would be a new peak.
                self.held -= sum(item[2] for item in self._free)
                self._free.clear()
            need = self.held + (nbytes if reuse else 2 * nbytes)
            if self.max_bytes is None or not self._pending or need <= self.max_bytes:
                return  # with nothing else held, one tensor is always allowed
            self._retire()

    def _take(self, key: tuple) -> Any:
        for i, item in enumerate(self._free):
            if item[0] == key:
                self.held -= item[2]
                return self._free.pop(i)[1]
        return None

    def _retire(self) -> None:
        future, key, host, nbytes = self._pending.popleft()
        future.exception()  # waits
        self._give_back(key, host, nbytes)

    def _give_back(self, key: tuple, host: Any, nbytes: int) -> None:
        self.held -= nbytes  # the reference tensor the comparison mapped is let go
        self._free.append((key, host, nbytes))
        while len(self._free) > KEEP:
            self.held -= self._free.pop(0)[2]


def _done(judge: Callable[[np.ndarray], T], array: np.ndarray) -> Future:
    future: Future = Future()
    try:
        future.set_result(judge(array))
    except Exception as exc:  # noqa: BLE001 - read from the future, as the comparison thread's are
        future.set_exception(exc)
    return future
