#!/usr/bin/env python
"""What isolation and the durable report cost, on the demo model.

Three comparisons, each repeated ``--rounds`` times with the variants
interleaved and rotated; medians are reported (minimum in brackets).  Ratios
are reported, never asserted; the project's goal is isolated / in-process
<= 1.3x.  See benchmarks/README.md.

1. **end to end**: ``python -m pytest --mnn-only --mnn-model MODEL
   --mnn-backends CPU`` with ``--mnn-isolate=never`` against ``=always``, and
   the default backend list with ``never`` against the default ``auto``
   (whose non-CPU backends are probed in a worker).
2. **engine**: the CPU matrix (4 precisions) of one model through
   ``ParityEngine`` against ``IsolatedEngine``, warm (a worker already
   started and waiting, as the plugin's spare is) and cold (worker start-up
   included).
3. **report**: N real records (a failing model with its layer trace, as in a
   bad CI run) written as they arrive by ``IncrementalReport`` against one
   ``write_json_atomically`` at the end.

Usage::

    python benchmarks/bench_reliability.py [--rounds 5] [--records 500] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
DEMO = "fixtures/demo/lama_like.mnn"


def median(xs):
    return statistics.median(xs)


def interleaved(variants: dict, rounds: int, log, label: str) -> dict[str, list[float]]:
    names = list(variants)
    for name in names:  # warm-up: page cache, .pyc files, discovery caches
        variants[name]()
    samples = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            samples[name].append(variants[name]())
        log(f"  {label} round {r + 1}/{rounds}: " + ", ".join(f"{n} {samples[n][-1]:.3f} s" for n in names))
    return samples


def summary(samples: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    return {n: {"median_s": median(s), "min_s": min(s)} for n, s in samples.items()}


# ---------------------------------------------------------------------------- end to end

def _plugin_args() -> list[str]:
    """Load the plugin by module name where it is not installed (no pytest11 entry point)."""
    from importlib.metadata import entry_points

    installed = any(ep.value.startswith("pytest_mnn_parity") for ep in entry_points(group="pytest11"))
    return [] if installed else ["-p", "pytest_mnn_parity.plugin.hooks"]


def pytest_run(model: str, *extra: str) -> float:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *_plugin_args(), "--mnn-only",
                           "-q", "--mnn-model", model, *extra], cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-2000:])
    return wall


def bench_e2e(model: str, rounds: int, log) -> dict:
    variants = {
        "cpu_never": lambda: pytest_run(model, "--mnn-backends", "CPU", "--mnn-isolate=never"),
        "cpu_always": lambda: pytest_run(model, "--mnn-backends", "CPU", "--mnn-isolate=always"),
        "all_never": lambda: pytest_run(model, "--mnn-isolate=never"),
        "all_auto": lambda: pytest_run(model),
    }
    samples = interleaved(variants, rounds, log, "e2e")
    med = {n: median(s) for n, s in samples.items()}
    return {"samples_s": samples, "summary": summary(samples),
            "ratio_always_over_never_cpu": med["cpu_always"] / med["cpu_never"],
            "ratio_auto_over_never_default_backends": med["all_auto"] / med["all_never"]}


# ---------------------------------------------------------------------------- engine

def bench_engine(model: str, rounds: int, log) -> dict:
    from pytest_mnn_parity.mnn.backends import PRECISIONS, discover
    from pytest_mnn_parity.isolation.engine import IsolatedEngine
    from pytest_mnn_parity.engine.engine import ParityEngine
    from pytest_mnn_parity.engine.results import ParitySettings
    from pytest_mnn_parity.mnn.runner import RunConfig

    configs = [RunConfig("CPU", p) for p in PRECISIONS]
    discover(["CPU"])

    def in_process() -> float:
        start = time.perf_counter()
        engine = ParityEngine(ParitySettings())
        results = [engine.check(model, c) for c in configs]
        engine.release(model)
        assert all(r.passed for r in results)
        return time.perf_counter() - start

    def isolated_warm() -> float:
        engine = IsolatedEngine(ParitySettings(), prespawn=True)
        engine.expected_models = 1  # as the plugin says for a one-model run: no spare for a next model
        engine._spare.wait_ready()  # the plugin starts it while pytest collects
        start = time.perf_counter()
        results = [engine.check(model, c) for c in configs]
        engine.release(model)
        elapsed = time.perf_counter() - start
        engine.close()
        assert all(r.passed for r in results)
        return elapsed

    def isolated_cold() -> float:
        start = time.perf_counter()
        engine = IsolatedEngine(ParitySettings(), prespawn=False)
        results = [engine.check(model, c) for c in configs]
        engine.release(model)
        engine.close()
        assert all(r.passed for r in results)
        return time.perf_counter() - start

    samples = interleaved({"in_process": in_process, "isolated_warm": isolated_warm,
                           "isolated_cold": isolated_cold}, rounds, log, "engine")
    med = {n: median(s) for n, s in samples.items()}
    return {"samples_s": samples, "summary": summary(samples),
            "ratio_warm_over_in_process": med["isolated_warm"] / med["in_process"],
            "ratio_cold_over_in_process": med["isolated_cold"] / med["in_process"]}


# ---------------------------------------------------------------------------- report

def bench_report(records: int, rounds: int, log) -> dict:
    from pytest_mnn_parity.report.durable import IncrementalReport
    from pytest_mnn_parity.engine.engine import ParityEngine
    from pytest_mnn_parity.engine.results import ParitySettings
    from pytest_mnn_parity.core.files import write_json as write_json_atomically
    from pytest_mnn_parity.report.records import build_report, record
    from pytest_mnn_parity.mnn.runner import RunConfig

    engine = ParityEngine(ParitySettings(reference=str(REPO / "fixtures/collapse/partial_zero.mnn"), layers="always"))
    real = record("x", engine.check(REPO / "fixtures/collapse/partial_zero.fp16.mnn", RunConfig("CPU", "low")), "failed")
    demo = record("y", ParityEngine(ParitySettings(layers="always")).check(REPO / DEMO, RunConfig("CPU", "low")),
                  "passed")
    recs = [dict(real if i % 2 else demo, nodeid=f"model_{i}.mnn::parity[CPU-low]") for i in range(records)]
    header = {"mnn_version": "3.6.1", "settings": {}, "backends": {}}
    folder = Path(tempfile.mkdtemp(prefix="bench-report-"))
    stats: dict[str, dict] = {}

    def final_only() -> float:
        start = time.perf_counter()
        write_json_atomically(folder / "final.json", build_report(recs, **header))
        return time.perf_counter() - start

    def incremental(ratio: float):
        def run() -> float:
            writer = IncrementalReport(folder / f"inc{ratio:g}.json", lambda: build_report([], **header), ratio=ratio)
            start = time.perf_counter()
            for rec in recs:
                writer.add(rec)
            writer.flush()
            elapsed = time.perf_counter() - start
            stats[f"incremental_ratio_{ratio:g}"] = {"writes": writer.writes, "write_seconds": writer.write_seconds}
            return elapsed
        return run

    samples = interleaved({"final_only": final_only, "incremental_ratio_10": incremental(10.0),
                           "incremental_every_item": incremental(0.0)}, rounds, log, "report")
    size = (folder / "final.json").stat().st_size
    same = (folder / "final.json").read_text() == (folder / "inc10.json").read_text()
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()
    return {"records": records, "report_bytes": size, "record_bytes_avg": size / records,
            "identical_to_final_write": same, "samples_s": samples, "summary": summary(samples), "writer": stats}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEMO)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--records", type=int, default=500)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--skip", action="append", default=[], choices=["e2e", "engine", "report"])
    args = parser.parse_args(argv)

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    out = {"cpu_count": cores, "loadavg_at_start": os.getloadavg(), "model": args.model,
           "rounds": args.rounds}
    if "engine" not in args.skip:
        out["engine"] = bench_engine(args.model, args.rounds, log)
    if "e2e" not in args.skip:
        out["e2e"] = bench_e2e(args.model, args.rounds, log)
    if "report" not in args.skip:
        out["report"] = bench_report(args.records, args.rounds, log)
    out["loadavg_at_end"] = os.getloadavg()

    print(f"cpus {out['cpu_count']}, load {out['loadavg_at_start'][0]:.1f} -> {out['loadavg_at_end'][0]:.1f}")
    for section in ("engine", "e2e", "report"):
        if section not in out:
            continue
        print(f"\n{section}: median [min] seconds")
        for name, s in out[section]["summary"].items():
            print(f"  {name:24s} {s['median_s']:.3f} [{s['min_s']:.3f}]")
        for key, value in out[section].items():
            if key.startswith("ratio"):
                print(f"  {key} = {value:.2f}x")
    if "report" in out:
        r = out["report"]
        print(f"  {r['records']} records, {r['report_bytes'] / 1e6:.1f} MB; incremental text identical to the final "
              f"write: {r['identical_to_final_write']}; writer: {r['writer']}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
