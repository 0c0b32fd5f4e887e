"""The default matrix on the demo model on every backend this MNN build has, plugin engine vs raw MNN.

Meant for a machine with a GPU build of MNN (docs/gpu.md); on a CPU-only build it measures the
CPU part of the matrix only.  Raw does the same MNN work the engine does for the available
configurations (one interpreter, a CPU/high/1-thread reference session and one session per
configuration, two inferences each, inputs copied in and outputs copied out every time); it
creates its sessions the way a plain user would, without a shared runtime.

    python benchmarks/bench_gpu.py [--rounds 3] [--json PATH]

The engine is measured twice: in-process (--mnn-isolate never) and as the plugin runs by default
(--mnn-isolate auto: GPU configurations in a worker process, whose start-up is counted).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from pytest_mnn_parity import ParityEngine, RunConfig, backends
from pytest_mnn_parity.mnn.library import mnn, mnn_version
from pytest_mnn_parity.mnn.native_output import capture_native_output
from pytest_mnn_parity.isolation.policy import Isolation

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "fixtures" / "demo" / "lama_like.mnn"
CODES = {"normal": 0, "high": 1, "low": 2, "Low_BF16": 3}


def raw_matrix(configs, inputs_a, inputs_b) -> None:
    m = mnn()
    with capture_native_output():
        interpreter = m.Interpreter(str(DEMO))
        sessions = [(interpreter.createSession({"backend": "CPU", "precision": 1, "numThread": 1}))]
        sessions += [interpreter.createSession({"backend": c.backend, "precision": CODES[c.precision],
                                                "numThread": c.threads}) for c in configs]
        for session in sessions:
            for inputs in (inputs_a, inputs_b):
                for name, array in inputs.items():
                    staging = m.Tensor(array.shape, m.Halide_Type_Float, array, m.Tensor_DimensionType_Caffe)
                    interpreter.getSessionInput(session, name).copyFrom(staging)
                interpreter.runSession(session)
                for name, out in interpreter.getSessionOutputAll(session).items():
                    host = m.Tensor(out, out.getDimensionType())
                    out.copyToHostTensor(host)
                    np.array(host.getNumpyData(), copy=True)


def engine_matrix(all_configs) -> None:
    engine = ParityEngine()
    for config in all_configs:
        engine.check(DEMO, config)
    engine.release(DEMO)


def isolated_matrix(all_configs) -> None:
    """What the plugin does by default (--mnn-isolate auto): CPU in-process, every other backend in a worker
    process (started, importing MNN, building its own GPU runtimes), closed at the end as the plugin does."""
    isolation = Isolation(ParityEngine(), "auto", None, backends.DEFAULT_BACKENDS)
    isolation.start()
    for config in all_configs:
        isolation.check(DEMO, config)
    isolation.release(DEMO)
    isolation.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    t0 = time.perf_counter()
    status = backends.discover(backends.DEFAULT_BACKENDS)
    discovery_s = time.perf_counter() - t0
    all_configs = [RunConfig(b, p) for b in backends.DEFAULT_BACKENDS for p in backends.PRECISIONS]
    available = [c for c in all_configs if status[c.backend].available]
    t0 = time.perf_counter()
    arithmetic = {c.id: backends.probe_arithmetic(c.backend, c.precision).kind for c in available}
    arithmetic_s = time.perf_counter() - t0
    probe = ParityEngine()
    model = probe.model(DEMO)
    inputs_a, inputs_b = probe.inputs(model)
    probe.release(DEMO)
    raw_times, engine_times, isolated_times = [], [], []
    for _ in range(args.rounds):  # interleaved so drift hits all alike
        t0 = time.perf_counter()
        raw_matrix(available, inputs_a, inputs_b)
        raw_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        engine_matrix(all_configs)
        engine_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        isolated_matrix(all_configs)
        isolated_times.append(time.perf_counter() - t0)
    raw, eng = statistics.median(raw_times), statistics.median(engine_times)
    iso = statistics.median(isolated_times)
    result = {
        "mnn_version": mnn_version(), "model": str(DEMO.relative_to(REPO)), "rounds": args.rounds,
        "available_configs": [c.id for c in available], "arithmetic": arithmetic,
        "discovery_s_cold": discovery_s, "arithmetic_probes_s_cold": arithmetic_s,
        "raw_s": raw_times, "engine_s": engine_times, "raw_median_s": raw, "engine_median_s": eng,
        "engine_over_raw": eng / raw,
        "isolated_s": isolated_times, "isolated_median_s": iso, "isolated_over_raw": iso / raw,
    }
    print(f"MNN {result['mnn_version']}: {len(available)} available configs of {len(all_configs)}")
    print(f"discovery (cold) {discovery_s:.3f} s, arithmetic probes (cold) {arithmetic_s:.3f} s")
    print(f"raw matrix    median {raw:.3f} s  {['%.3f' % t for t in raw_times]}")
    print(f"engine matrix median {eng:.3f} s  {['%.3f' % t for t in engine_times]}")
    print(f"isolated (plugin default, GPU in workers) median {iso:.3f} s  {['%.3f' % t for t in isolated_times]}")
    print(f"engine / raw  {eng / raw:.2f}x   isolated / raw  {iso / raw:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
