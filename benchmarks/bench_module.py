#!/usr/bin/env python
"""What the Module-API path of pytest-mnn-parity costs on top of raw Module inference.

All in one warm process, interleaved, median of ``--rounds`` (minimum in brackets):

* **raw**: the MNN work the CPU matrix needs, written against pymnn's Module API
  with no plugin code: a module per configuration (reference CPU/high/1 thread,
  then normal/high/low/Low_BF16 with 4 threads) loaded with
  ``MNN.nn.load_module_from_file(path, [], [], runtime_manager=...)``, input sets
  A and B built with ``MNN.expr.const``, two ``forward`` calls per module (10 in
  all), every output read with ``np.array(var.read(), copy=True)``.  Runtime
  managers are created once, before timing, as the engine shares them per
  process.  No fd capture.
* **engine module**: ``ParityEngine(ParitySettings(api="module"))`` checking the
  same 4 configurations (loading, reference, judging, messages included), then
  ``release`` - a fresh engine per sample.
* **engine auto** (control-flow models only): the default ``api="auto"``, which
  first tries the session API's reference run, sees it fail, and then runs the
  Module path: the price of the automatic choice.
* **raw session** / **engine session** (models a session can run): the same
  matrix on the session API, raw and through the engine, measured in the same
  rounds, so the Module path's overhead can be read next to the session path's
  on the same machine and load.

* **runner** vs **raw forward**: only the inference plumbing, on a module
  already loaded: ``ModuleModel.run`` (inputs built in the module's order and
  dtypes, fd capture, failure check, outputs copied out) against the bare
  ``expr.const`` + ``forward`` + ``read`` loop, 20 inferences each.

Each sample is the mean of ``--inner`` matrices; the machine's load average is
recorded, since on a busy machine medians move a lot (minimums less).

Usage::

    python benchmarks/bench_module.py [--rounds 7] [--json out.json]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

import numpy as np  # noqa: E402

from pytest_mnn_parity import ParityEngine, ParitySettings, RunConfig  # noqa: E402
from pytest_mnn_parity.mnn.library import mnn, mnn_version  # noqa: E402
from pytest_mnn_parity.mnn.module_runner import runtime_manager  # noqa: E402
from pytest_mnn_parity.mnn.native_output import capture_native_output  # noqa: E402

MODELS = ["fixtures/demo/lama_like.mnn", "fixtures/deep/deep_fp32.mnn", "fixtures/control_flow/lstm_while.mnn",
          "fixtures/control_flow/if_branch.mnn"]
CONTROL_FLOW = {"fixtures/control_flow/lstm_while.mnn", "fixtures/control_flow/if_branch.mnn"}
PRECISIONS = ("normal", "high", "low", "Low_BF16")
CONFIGS = [RunConfig("CPU", "high", 1)] + [RunConfig("CPU", p, 4) for p in PRECISIONS]
GOAL = 1.15


def raw_matrix(path: str) -> int:
    """The raw Module work; returns the number of forwards that gave every output."""
    MNN = mnn()
    F = MNN.expr
    done = 0
    sets = None
    for config in CONFIGS:
        module = MNN.nn.load_module_from_file(path, [], [], runtime_manager=runtime_manager(config).manager)
        if sets is None:
            info = module.get_info()
            sets = []
            for seed in (0, 1):
                rng = np.random.default_rng(seed)
                sets.append([rng.random(tuple(v.shape), dtype=np.float32) for v in info["inputs"]])
        for arrays in sets:
            outs = module.forward([F.const(a, list(a.shape), F.NCHW) for a in arrays])
            results = [np.array(v.read(), copy=True) for v in outs]
            done += bool(results)
    return done


def raw_session_matrix(path: str) -> int:
    """The same matrix on the raw session API (as benchmarks/bench_parity.py's raw variant)."""
    MNN = mnn()
    interp = MNN.Interpreter(path)
    done, sets = 0, None
    for config in CONFIGS:
        session = interp.createSession(config.session_config())
        inputs = interp.getSessionInputAll(session)
        if sets is None:
            sets = []
            for seed in (0, 1):
                rng = np.random.default_rng(seed)
                sets.append({n: rng.random(tuple(t.getShape()), dtype=np.float32) for n, t in inputs.items()})
        for arrays in sets:
            for name, a in arrays.items():
                inputs[name].copyFrom(MNN.Tensor(a.shape, MNN.Halide_Type_Float, a, MNN.Tensor_DimensionType_Caffe))
            done += interp.runSession(session) == 0
            for out in interp.getSessionOutputAll(session).values():
                host = MNN.Tensor(out, out.getDimensionType())
                out.copyToHostTensor(host)
                np.array(host.getNumpyData(), copy=True)
    return done


def forward_loops(path: str):
    """(raw forward loop, runner loop) on one preloaded module each, 20 inferences."""
    from pytest_mnn_parity.inputs.generate import generate_inputs
    from pytest_mnn_parity.mnn.module_runner import ModuleModel

    config = RunConfig("CPU", "high", 4)
    model = ModuleModel(path)
    inputs = generate_inputs(model.info.inputs, model.shapes, 0)
    module = mnn().nn.load_module_from_file(path, [], [], runtime_manager=runtime_manager(config).manager)
    names = module.get_info()["inputNames"]
    F = mnn().expr
    model.run(config, inputs)

    def raw():
        for _ in range(20):
            outs = module.forward([F.const(inputs[n], list(inputs[n].shape), F.NCHW) for n in names])
            [np.array(v.read(), copy=True) for v in outs]

    def runner():
        for _ in range(20):
            model.run(config, inputs)

    return raw, runner


def engine_matrix(path: str, api: str) -> int:
    engine = ParityEngine(ParitySettings(api=api))
    ok = sum(engine.check(path, config).passed for config in CONFIGS[1:])
    engine.release(path)
    return ok


def timed(fn) -> float:
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(path: str, rounds: int, inner: int) -> dict:
    raw_forward, runner = forward_loops(path)
    variants = {"raw": lambda: raw_matrix(path), "engine_module": lambda: engine_matrix(path, "module"),
                "raw_forward": raw_forward, "runner": runner}
    if path in CONTROL_FLOW:
        variants["engine_auto"] = lambda: engine_matrix(path, "auto")
    else:
        variants["raw_session"] = lambda: raw_session_matrix(path)
        variants["engine_session"] = lambda: engine_matrix(path, "session")
    with capture_native_output():  # raw MNN prints nothing here, but the engine's session attempt does
        for fn in variants.values():  # warm-up: imports, discovery, probes, runtime managers
            fn()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            with capture_native_output():
                samples[name].append(statistics.mean(timed(variants[name]) for _ in range(inner)))
    out = {name: {"median_s": statistics.median(s), "min_s": min(s)} for name, s in samples.items()}
    for name, base in (("engine_module", "raw"), ("engine_auto", "raw"), ("engine_session", "raw_session"),
                       ("runner", "raw_forward")):
        if name in out:
            out[name]["ratio"] = out[name]["median_s"] / out[base]["median_s"]
            out[name]["ratio_min"] = out[name]["min_s"] / out[base]["min_s"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--inner", type=int, default=3, help="matrices per sample (their mean is the sample)")
    ap.add_argument("--model", action="append", help="model(s) to bench (default: four fixtures)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    os.chdir(REPO)
    report = {"mnn_version": mnn_version(), "python": platform.python_version(), "cpus": os.cpu_count(),
              "load_average_start": os.getloadavg(), "rounds": args.rounds, "inner": args.inner, "models": {}}
    for model in args.model or MODELS:
        report["models"][model] = bench(model, args.rounds, args.inner)
    report["load_average_end"] = os.getloadavg()
    print(f"MNN {report['mnn_version']}, {report['cpus']} CPUs, load {report['load_average_start'][0]:.1f} -> "
          f"{report['load_average_end'][0]:.1f}; ms per CPU matrix (5 configurations, 10 inferences), median of "
          f"{args.rounds} rounds x {args.inner} [min]; goal engine/raw <= {GOAL}x")
    for model, res in report["models"].items():
        print(f"== {model}")
        for name, r in res.items():
            ratio = (f"  {r['ratio']:.2f}x (min/min {r['ratio_min']:.2f}x)" if "ratio" in r else "")
            print(f"  {name:16s} {r['median_s'] * 1e3:8.1f} [{r['min_s'] * 1e3:7.1f}]{ratio}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
