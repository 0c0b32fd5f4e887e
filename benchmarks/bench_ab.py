#!/usr/bin/env python
"""Before/after in ONE process: the engine of two source trees against the same raw MNN work.

On a shared 2-core machine, runs of ``bench_parity.py`` minutes apart see loads
that differ by 2x, so comparing their ratios says little.  This script imports
a second copy of the package (``--base``, e.g. main's ``src``) under another
name next to the one on ``sys.path``, and interleaves, round by round in a
rotating order: the raw matrix (``bench_parity``'s ``raw_capture_once``, the
baseline), the base tree's engine and this tree's engine.  Each sample is the
mean of ``--inner`` matrices; the median of ``--rounds`` samples is reported
(the minimum in brackets), for two clocks:

* ``wall``: ``time.perf_counter``, what ``bench_parity.py`` reports;
* ``cpu``: ``time.thread_time`` of this (the calling) thread: the Python work
  and MNN's share of it on the calling thread, without the time other
  processes held the cores.  MNN's extra compute threads are not counted, on
  either side.

Usage::

    mkdir /tmp/base && git archive main src | tar -x -C /tmp/base
    PYTHONPATH=src python benchmarks/bench_ab.py --base /tmp/base/src [--rounds 15] [--inner 5] [--components] [--warm]
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_parity  # noqa: E402


def load_as(name: str, src: Path):
    """The package under ``src/pytest_mnn_parity`` imported as ``name`` (its imports are relative)."""
    init = src / "pytest_mnn_parity" / "__init__.py"
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# Where each module lives: the layered layout first (docs/architecture.md), then the flat one of older trees.
LAYOUT = {"parity": "engine.engine", "results": "engine.results", "runner": "mnn.runner", "backends": "mnn.backends",
          "weights": "mnn.weights", "verdict": "core.verdict", "tolerances": "core.tolerances",
          "native_output": "mnn.native_output", "variants": "onnx.variants", "inputs": "inputs.generate",
          "trace": "trace.record"}


def module_of(package: str, name: str):
    """``package``'s module ``name`` (a flat-layout name), in whichever layout the tree has."""
    try:
        return importlib.import_module(f"{package}.{LAYOUT[name]}")
    except ModuleNotFoundError:
        return importlib.import_module(f"{package}.{name}")


def reference_config_of(runner):
    """The reference configuration the engine runs (at 4 threads in trees that follow --mnn-threads)."""
    return runner.reference_config(4) if hasattr(runner, "reference_config") else runner.REFERENCE_CONFIG


def engine_matrix_of(package: str):
    parity = module_of(package, "parity")
    settings_of = getattr(parity, "ParitySettings", None) or module_of(package, "results").ParitySettings
    runner = module_of(package, "runner")
    backends = module_of(package, "backends")
    backends.discover(backends.DEFAULT_BACKENDS)  # warm, as in bench_parity

    def matrix(model: str):
        engine = parity.ParityEngine(settings_of())
        results = [engine.check(model, runner.RunConfig(b, p, 4))
                   for b in backends.DEFAULT_BACKENDS for p in backends.PRECISIONS]
        engine.release(model)
        return results

    return matrix


def components(model: str, rounds: int) -> None:
    """The per-model and per-check pieces the engine adds, each timed alone for both trees (us, median)."""
    import numpy as np

    rows: dict[str, dict[str, list[float]]] = {}
    fixtures = {}
    for tree, package in (("base", "base_mnn_parity"), ("this", "pytest_mnn_parity")):
        mod = {name: module_of(package, name)
               for name in ("weights", "verdict", "tolerances", "native_output", "runner", "variants", "inputs")}
        reference = reference_config_of(mod["runner"])
        loaded = mod["runner"].LoadedModel(Path(model))
        inputs = [mod["inputs"].generate_inputs(loaded.info.inputs, loaded.shapes, seed) for seed in (0, 1)]
        low = mod["runner"].RunConfig("CPU", "low", 4)
        ref = [loaded.run(reference, x).outputs for x in inputs]
        tgt = [loaded.run(low, x).outputs for x in inputs]
        tol = mod["tolerances"].resolve("CPU", "low")
        scanner = module_of(package, "trace").RiskScanner

        def capture(native=mod["native_output"]):
            with native.capture_native_output():
                pass

        fixtures[tree] = {
            "fp16 weight scan (per model)": lambda m=mod: m["weights"].fp16_weight_risks(model, min_fraction=0.2),
            "judge_outputs (per configuration)": lambda m=mod: m["verdict"].judge_outputs(
                tgt[0], ref[0], tol, targets_b=tgt[1], references_b=ref[1]),
            "reference run A with the risk scan": lambda L=loaded, c=reference: L.run(
                c, inputs[0], observer=scanner()),
            "reference run A, plain (for comparison)": lambda L=loaded, c=reference: L.run(c, inputs[0]),
            "capture_native_output (per MNN call)": capture,
            "is_onnx (per check)": lambda m=mod: m["variants"].is_onnx(model),
        }
    for r in range(rounds):
        for tree in (("base", "this") if r % 2 == 0 else ("this", "base")):
            for label, fn in fixtures[tree].items():
                n = 200 if "capture" in label or "is_onnx" in label else 20
                start, cpu = time.perf_counter(), time.thread_time()
                for _ in range(n):
                    fn()
                sample = ((time.perf_counter() - start) / n * 1e6, (time.thread_time() - cpu) / n * 1e6)
                rows.setdefault(label, {}).setdefault(tree, []).append(sample)
    print(f"\n== components of {model} (us, median of {rounds} interleaved rounds; wall, then this thread's CPU)")
    for label, by_tree in rows.items():
        (bw, bc), (tw, tc) = (np.median(np.array(by_tree[t]), axis=0) for t in ("base", "this"))
        print(f"  {label:42s} wall base {bw:8.1f} this {tw:8.1f} ({tw - bw:+8.1f})   "
              f"cpu base {bc:8.1f} this {tc:8.1f} ({tc - bc:+8.1f})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="the other tree's src folder (holding pytest_mnn_parity/)")
    ap.add_argument("--model", action="append", help="model(s) (default: the demo and deep fixtures)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--inner", type=int, default=5)
    ap.add_argument("--components", action="store_true", help="also time the engine's pieces alone, both trees")
    ap.add_argument("--warm", action="store_true",
                    help="also split each tree's extra into a fixed cost per configuration and one per model "
                         "(bench_parity.warm_sides)")
    args = ap.parse_args(argv)
    os.chdir(bench_parity.REPO)
    models = args.model or [bench_parity.DEMO, bench_parity.DEEP]

    import pytest_mnn_parity  # this tree (PYTHONPATH)
    from pytest_mnn_parity.mnn.library import mnn

    load_as("base_mnn_parity", Path(args.base).resolve())
    MNN = mnn()
    raw_matrix = bench_parity.raw_ns()["raw_matrix"]
    sides = {"raw": None, "base": engine_matrix_of("base_mnn_parity"), "this": engine_matrix_of("pytest_mnn_parity")}
    print(f"this tree: {Path(pytest_mnn_parity.__file__).parent}; base: {Path(args.base).resolve()}; "
          f"load average at start {os.getloadavg()}", flush=True)
    for model in models:
        fns = {"raw": lambda: raw_matrix(MNN, model, "once"), "base": lambda: sides["base"](model),
               "this": lambda: sides["this"](model)}
        closers = []
        if args.warm:
            # bench_parity.warm_sides: each tree's 28 checks with model and reference ready, raw's 8 runs on ready
            # sessions; (engine - raw) / 4 is the fixed cost per configuration, the rest of a matrix's extra is
            # the per-model cost.
            for tree, package in (("base", "base_mnn_parity"), ("this", "pytest_mnn_parity")):
                engine_warm, raw_warm, close = bench_parity.warm_sides(model, package)
                fns[f"{tree}_warm"] = engine_warm
                closers.append(close)
            fns["raw_warm"] = raw_warm
        for fn in fns.values():
            fn()  # warm-up
        samples = {name: {"wall": [], "cpu": []} for name in fns}
        order = list(fns)
        for r in range(args.rounds):
            for name in order[r % len(order):] + order[:r % len(order)]:
                w0, c0 = time.perf_counter(), time.thread_time()
                for _ in range(args.inner):
                    fns[name]()
                samples[name]["wall"].append((time.perf_counter() - w0) / args.inner)
                samples[name]["cpu"].append((time.thread_time() - c0) / args.inner)
        print(f"\n== {model} ({args.rounds} rounds x {args.inner} matrices; ms per matrix, median [min])")
        for clock in ("wall", "cpu"):
            med = {n: statistics.median(s[clock]) for n, s in samples.items()}
            low = {n: min(s[clock]) for n, s in samples.items()}
            print(f"  {clock:4s}  raw {med['raw'] * 1e3:6.2f} [{low['raw'] * 1e3:.2f}]  "
                  f"base {med['base'] * 1e3:6.2f} [{low['base'] * 1e3:.2f}] = {med['base'] / med['raw']:.2f}x  "
                  f"this {med['this'] * 1e3:6.2f} [{low['this'] * 1e3:.2f}] = {med['this'] / med['raw']:.2f}x  "
                  f"(min/min {low['base'] / low['raw']:.2f}x -> {low['this'] / low['raw']:.2f}x)")
            if args.warm:
                per_config = {t: (med[f"{t}_warm"] - med["raw_warm"]) / 4 for t in ("base", "this")}
                per_model = {t: med[t] - med["raw"] - 4 * per_config[t] for t in ("base", "this")}
                print(f"  {clock:4s}  warm: raw 8 runs {med['raw_warm'] * 1e3:6.2f}, base 28 checks "
                      f"{med['base_warm'] * 1e3:6.2f}, this {med['this_warm'] * 1e3:6.2f}; fixed cost per configuration "
                      f"base {per_config['base'] * 1e3:.3f} ms -> this {per_config['this'] * 1e3:.3f} ms; per model "
                      f"base {per_model['base'] * 1e3:.2f} ms -> this {per_model['this'] * 1e3:.2f} ms")
        for close in closers:
            close()
    if args.components:
        components(models[0], args.rounds)
    print(f"\nload average at end {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
