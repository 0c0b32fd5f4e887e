"""Where a run's wall time goes, across the pytest process and its isolated workers (issue 22's timeline).

Inert unless ``MNN_PARITY_TIMELINE`` names a file: then ``mark(label)`` appends ``<unix time> <pid> <label>`` to
it, from every process of the run (workers inherit the variable).  ``benchmarks/bench_parity.py --timeline`` reads
it back.  Unix time, not a monotonic clock: the marks of several processes are put on one axis.
"""
from __future__ import annotations

import os
import time

TIMELINE_ENV = "MNN_PARITY_TIMELINE"


def mark(label: str) -> None:
    path = os.environ.get(TIMELINE_ENV)
    if not path:
        return
    # O_APPEND writes of one short line from several processes do not interleave.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{time.time():.6f} {os.getpid()} {label}\n".encode())
    finally:
        os.close(fd)
