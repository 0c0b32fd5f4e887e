#!/usr/bin/env python
"""How much slower a multi-threaded ``runSession`` gets when Python work comes before it.

The engine judges each configuration between MNN runs; the raw loop in
``bench_parity.py`` runs back to back.  MNN's CPU worker threads spin briefly
after a run and then sleep; on a loaded machine waking them waits for a core.
This runs one 4-thread session of MODEL after a busy-wait gap of 0, 0.2, 0.5 and
2 ms (interleaved, ``--rounds`` rounds of 10 runs, median reported)::

    python benchmarks/bench_wakeup.py [--model fixtures/demo/lama_like.mnn] [--rounds 20]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="fixtures/demo/lama_like.mnn")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=4)
    args = ap.parse_args(argv)
    os.chdir(REPO)
    import MNN

    interp = MNN.Interpreter(args.model)
    session = interp.createSession({"backend": "CPU", "precision": 2, "numThread": args.threads})
    for name, tensor in interp.getSessionInputAll(session).items():
        shape = tuple(tensor.getShape())
        data = np.random.default_rng(0).random(shape, dtype=np.float32)
        tensor.copyFrom(MNN.Tensor(shape, MNN.Halide_Type_Float, data, MNN.Tensor_DimensionType_Caffe))
    gaps = (0.0, 0.0002, 0.0005, 0.002)
    medians: dict[float, list[float]] = {gap: [] for gap in gaps}
    for r in range(args.rounds):
        for gap in gaps[r % len(gaps):] + gaps[:r % len(gaps)]:
            times = []
            for _ in range(10):
                busy(gap)
                start = time.perf_counter()
                interp.runSession(session)
                times.append(time.perf_counter() - start)
            medians[gap].append(statistics.median(times))
    print(f"{args.model}, {args.threads} threads, load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs")
    for gap, values in medians.items():
        print(f"  after {gap * 1e3:3.1f} ms of Python: runSession {statistics.median(values) * 1e6:7.0f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
