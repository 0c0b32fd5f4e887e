"""What the op sweep (--mnn-op-sweep) costs: a whole pytest run with it against the same run without it.

Target (issue 23): the sweep of the demo model over the default matrix stays within 3x the plain
matrix's time.  Each run is a fresh ``python -m pytest`` process, as a user runs it; plain and swept
runs are interleaved and the medians compared, so the ratio survives a machine shared with others.
``all`` sweeps every op of every item (the demo passes, so ``flagged`` sweeps nothing there); the
failing ``sweep/broken`` pair measures ``flagged`` where it does work, with ``--mnn-repro`` on top.

    python benchmarks/bench_sweep.py [--runs 3] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = ["--mnn-model", "fixtures/demo/lama_like.mnn"]
BROKEN = ["--mnn-model", "fixtures/sweep/broken.fp16.mnn", "--mnn-reference", "fixtures/sweep/broken.mnn"]

CASES = {
    # name: (plain argv, swept argv)
    "demo, default matrix, --mnn-op-sweep=all": (DEMO, DEMO + ["--mnn-op-sweep=all"]),
    "demo, default matrix, --mnn-op-sweep (flagged)": (DEMO, DEMO + ["--mnn-op-sweep"]),
    "sweep/broken (failing), --mnn-op-sweep": (BROKEN, BROKEN + ["--mnn-op-sweep"]),
    "sweep/broken (failing), --mnn-op-sweep --mnn-repro": (BROKEN, BROKEN + ["--mnn-op-sweep", "--mnn-repro", "@TMP"]),
}


def run(argv: list[str]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        argv = [tmp if a == "@TMP" else a for a in argv]
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pytest", "--mnn-only", "-q", "-p", "no:cacheprovider", *argv],
                       cwd=REPO, capture_output=True, text=True, check=False)
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    results = {}
    for name, (plain_argv, swept_argv) in CASES.items():
        plain, swept = [], []
        for _ in range(args.runs):
            plain.append(run(plain_argv))
            swept.append(run(swept_argv))
        p, s = statistics.median(plain), statistics.median(swept)
        results[name] = {"plain_s": p, "swept_s": s, "ratio": s / p}
        print(f"{name:55s} plain {p:6.2f} s  swept {s:6.2f} s  ratio {s / p:5.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
