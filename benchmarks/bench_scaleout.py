#!/usr/bin/env python
"""Scale-out: wall time of a pytest run over a suite of N small models, against N (issue 22).

The suite is made of copies of the shipped small fixtures (the demo LaMa-like graph, the multi-input model,
the deep fixture, ...), each under a name of its own in a temporary folder, so every copy is a model of its
own to the plugin (loaded, referenced and released on its own).  Each N runs as a fresh ``python -m pytest
--mnn-only --mnn-model DIR`` with ``-n WORKERS`` (pytest-xdist) from an empty folder, with pytest's cache warm
(one untimed run of the smallest suite first), as CI or a developer's second run would be.  Each count's line
is printed (flushed) as soon as it is measured, and ``--json`` is rewritten after each, so a run stopped by a
time limit keeps what it measured.  Reported, never asserted.

Usage::

    python benchmarks/bench_scaleout.py                          # N = 10, 20, 40 with -n auto
    python benchmarks/bench_scaleout.py --workers 16 --counts 16,32,48 --timeout 60 --json out.json   # the device's CPU
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Small models that pass on the CPU (a suite a team would run): copied round-robin.
SOURCES = ("fixtures/demo/lama_like.mnn", "fixtures/multi_io.mnn", "fixtures/deep/deep_fp32.mnn",
           "fixtures/inputs/lama_like.mnn")


def make_suite(count: int, folder: Path) -> Path:
    suite = folder / f"suite-{count}"
    suite.mkdir()
    sources = [REPO / s for s in SOURCES if (REPO / s).exists()]
    for i in range(count):
        src = sources[i % len(sources)]
        shutil.copyfile(src, suite / f"m{i:03d}_{src.stem}.mnn")
    return suite


def run(suite: Path, workers: str, cwd: Path, extra: list[str], timeout: float | None) -> tuple[float, int, str]:
    cmd = [sys.executable, "-m", "pytest", "--mnn-only", "--mnn-model", str(suite), "-q", "-p", "no:randomly",
           *(["-n", workers] if workers != "0" else []), *extra]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return time.perf_counter() - start, -1, f"timed out after {timeout:.0f} s"
    wall = time.perf_counter() - start
    return wall, proc.returncode, (proc.stdout.strip().splitlines() or [""])[-1]


def say(text: str) -> None:
    # Flushed line by line: a device run killed by its time limit still shows every count measured so far.
    print(text, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", default="10,20,40", help="model counts, comma-separated (default 10,20,40)")
    ap.add_argument("--workers", default="auto", help="pytest-xdist -n value (default auto; 0: no xdist)")
    ap.add_argument("--rounds", type=int, default=1, help="timed runs per count (median reported)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    ap.add_argument("--timeout", type=float, default=None, help="seconds one pytest run may take (reported, then "
                    "the next count runs)")
    ap.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = ap.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",") if c.strip()]
    rows = []
    say(f"bench_scaleout: counts {counts}, -n {args.workers}, {args.rounds} timed run(s) each, "
        f"{os.cpu_count()} CPUs, load {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory(prefix="bench-scaleout-") as tmp:
        folder = Path(tmp)
        # One folder for every count: pytest's cache (discovery, probes) is warmed once, by the smallest suite.
        cwd = folder / "run"
        cwd.mkdir()
        suites = {count: make_suite(count, folder) for count in counts}
        t0 = time.perf_counter()
        wall, rc, last = run(suites[min(counts)], args.workers, cwd, args.pytest_args, args.timeout)
        say(f"warm-up ({min(counts)} models, not timed): {wall:.2f} s rc {rc}  {last}")
        for count in counts:
            walls = []
            for r in range(args.rounds):
                wall, rc, last = run(suites[count], args.workers, cwd, args.pytest_args, args.timeout)
                walls.append(wall)
                if args.rounds > 1:
                    say(f"  {count} models, round {r + 1}: {wall:.2f} s rc {rc}")
            wall = statistics.median(walls)
            rows.append({"models": count, "wall_s": wall, "per_model_s": wall / count, "exit_code": rc,
                         "summary": last, "walls_s": walls, "loadavg": os.getloadavg()})
            say(f"{count:4d} models  {wall:7.2f} s  {wall / count * 1e3:7.1f} ms/model  rc {rc}  {last}  "
                f"(load {os.getloadavg()[0]:.1f}, {time.perf_counter() - t0:.0f} s so far)")
            if args.json:  # kept current, so a killed run leaves what it measured
                Path(args.json).write_text(json.dumps({"workers": args.workers, "rows": rows}, indent=2) + "\n")
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        say(f"slope {((b['wall_s'] - a['wall_s']) / (b['models'] - a['models'])) * 1e3:.0f} ms per added model; "
            f"fixed {a['wall_s'] - a['models'] * (b['wall_s'] - a['wall_s']) / (b['models'] - a['models']):.2f} s")
    report = {"machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                          "affinity": len(os.sched_getaffinity(0)), "loadavg_at_end": os.getloadavg()},
              "workers": args.workers, "date": time.strftime("%Y-%m-%d"), "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
