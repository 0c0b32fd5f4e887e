"""The default matrix on the demo model on every backend this MNN build has, plugin engine vs raw MNN.

Meant for a machine with a GPU build of MNN (docs/gpu.md); on a CPU-only build it measures the
CPU part of the matrix only.  Raw does the same MNN work the engine does for the available
configurations (one interpreter, a CPU/high/1-thread reference session and one session per
configuration, two inferences each, inputs copied in and outputs copied out every time); it
creates its sessions the way a plain user would, without a shared runtime.

    python benchmarks/bench_gpu.py [--rounds 3] [--json PATH]

The engine is measured twice: in-process (--mnn-isolate never) and as the plugin runs by default
(--mnn-isolate auto: GPU configurations in a worker process, whose start-up is counted).

Where the isolated matrix's time goes is printed as a breakdown (timers around the isolation's own
calls, in this process only; ``src/`` is not modified): each worker's start to ready (Python, numpy,
MNN and the engine importing), the time the matrix waited for that, each backend's first check in
its worker (the model loaded, the worker's own reference, the backend's runtime created: a GPU
context per process) against its later checks, release and close.  Two more variants say which part
is per process and which per model: ``raw_fresh`` (the raw matrix in a fresh interpreter, imports
included, against ``import_only``) and ``isolated_run_warm`` (one isolation with run-scoped workers
kept across rounds, as a second model of a run with ``--mnn-worker-scope run`` sees it).
``isolated_gpu_worker_later`` is the default path as it was before the GPU worker started with the
CPU one (at the first GPU check instead), measured in the same rounds.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from pytest_mnn_parity import ParityEngine, RunConfig, backends
from pytest_mnn_parity.mnn import arithmetic as mnn_arithmetic
from pytest_mnn_parity.mnn.library import mnn, mnn_version
from pytest_mnn_parity.mnn.native_output import capture_native_output
from pytest_mnn_parity.isolation import engine as isolated_engine
from pytest_mnn_parity.isolation import process as worker_process
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


def isolated_matrix(all_configs, timers: "Timers | None" = None, variant: str = "default") -> None:
    """What the plugin does by default (--mnn-isolate auto): CPU configurations in the run's warm worker, every
    other backend's in a worker process per model (started, importing MNN, building its own GPU runtimes),
    closed at the end as the plugin does.  ``variant``: ``default`` (the plugin now: each GPU backend's worker
    starts with the run); ``gpu_worker_later`` (only the CPU worker at start, as before issue 22's second
    round: GPU workers start at their first check)."""
    t = timers or Timers()
    with t.span("isolation start (spawn the workers)"):
        isolation = Isolation(ParityEngine(), "auto", None, backends.DEFAULT_BACKENDS)
        if variant == "default":
            isolation.start()
        else:
            isolation.shared  # noqa: B018 - the CPU worker alone
    for config in all_configs:
        isolation.check(DEMO, config)
    with t.span("release (retire the per-model worker)"):
        isolation.release(DEMO)
    with t.span("close (workers told to exit, not waited for, as the plugin does)"):
        isolation.close(wait=False)
    while worker_process.reap_exiting():  # untimed: their teardown must not slow the next measurement
        time.sleep(0.01)


class Timers:
    """Seconds per named part of the isolated matrix, from wrappers around the isolation's calls."""

    def __init__(self):
        self.parts: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self._seen_backends: set[tuple[int, str]] = set()

    def add(self, name: str, seconds: float) -> None:
        self.parts[name] += seconds
        self.counts[name] += 1

    def span(self, name: str):
        timers = self

        class _Span:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timers.add(name, time.perf_counter() - self.t0)
        return _Span()


def instrument(timers: Timers):
    """Wrap Worker start/ready and IsolatedEngine.check_request; returns a function that undoes it."""
    worker_init, wait_ready = worker_process.Worker.__init__, worker_process.Worker.wait_ready
    check_request = isolated_engine.IsolatedEngine.check_request

    def init(self, *args, **kwargs):
        with timers.span("worker spawn (Popen + init line)"):
            worker_init(self, *args, **kwargs)
        self._bench_spawned = time.perf_counter()

    def ready(self):
        if self.ready:
            return wait_ready(self)
        t0 = time.perf_counter()
        try:
            return wait_ready(self)
        finally:
            now = time.perf_counter()
            timers.add("waiting for a worker's imports", now - t0)
            timers.add("worker spawn -> ready (imports; overlaps other work)", now - self._bench_spawned)

    def waited() -> float:
        return timers.parts.get("waiting for a worker's imports", 0.0)

    def check(self, request, *args, **kwargs):
        backend = request.config.backend
        before = waited()
        t0 = time.perf_counter()
        result = check_request(self, request, *args, **kwargs)
        spent = time.perf_counter() - t0 - (waited() - before)
        if result.worker is None:  # unavailable: answered here, no worker involved
            timers.add("unavailable backends' checks (answered in this process)", spent)
            return result
        first = (result.worker["pid"], backend) not in timers._seen_backends
        timers._seen_backends.add((result.worker["pid"], backend))
        kind = "first check in its worker (model load, reference, backend runtime)" if first else "later checks"
        timers.add(f"{backend}: {kind}", spent)
        return result

    worker_process.Worker.__init__, worker_process.Worker.wait_ready = init, ready
    isolated_engine.IsolatedEngine.check_request = check

    def undo():
        worker_process.Worker.__init__, worker_process.Worker.wait_ready = worker_init, wait_ready
        isolated_engine.IsolatedEngine.check_request = check_request
    return undo


# The raw matrix as a script of its own: numpy and MNN only (no package import), inputs from the parent's file.
RAW_CHILD = r"""
import json, os, sys, time
t0 = time.perf_counter()
import numpy as np
import MNN
imported = time.perf_counter() - t0
if sys.argv[1] == "raw":
    data = np.load(sys.argv[2])
    configs = json.loads(sys.argv[3])
    inputs_a = {k[2:]: data[k] for k in data.files if k.startswith("A/")}
    inputs_b = {k[2:]: data[k] for k in data.files if k.startswith("B/")}
    devnull = os.open(os.devnull, os.O_WRONLY)
    saved = os.dup(1), os.dup(2)
    os.dup2(devnull, 1), os.dup2(devnull, 2)  # MNN's chatter, as the in-process raw matrix captures it
    t1 = time.perf_counter()
    interpreter = MNN.Interpreter(sys.argv[4])
    sessions = [interpreter.createSession({"backend": "CPU", "precision": 1, "numThread": 1})]
    sessions += [interpreter.createSession({"backend": b, "precision": p, "numThread": n}) for b, p, n in configs]
    for session in sessions:
        for inputs in (inputs_a, inputs_b):
            for name, array in inputs.items():
                staging = MNN.Tensor(array.shape, MNN.Halide_Type_Float, array, MNN.Tensor_DimensionType_Caffe)
                interpreter.getSessionInput(session, name).copyFrom(staging)
            interpreter.runSession(session)
            for name, out in interpreter.getSessionOutputAll(session).items():
                host = MNN.Tensor(out, out.getDimensionType())
                out.copyToHostTensor(host)
                np.array(host.getNumpyData(), copy=True)
    matrix = time.perf_counter() - t1
    os.dup2(saved[0], 1), os.dup2(saved[1], 2)
    print("matrix_s", matrix)
print("import_s", imported)
"""


def fresh_process(kind: str, configs=(), inputs_file: Path | None = None) -> dict[str, float]:
    wire = json.dumps([[c.backend, CODES[c.precision], c.threads] for c in configs])
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", RAW_CHILD, kind, str(inputs_file), wire, str(DEMO)],
                          capture_output=True, text=True, check=True)
    found = {k: float(v) for k, v in (line.split() for line in proc.stdout.splitlines()
                                      if line.startswith(("matrix_s", "import_s")))}
    found["wall_s"] = time.perf_counter() - t0
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--no-fresh", action="store_true", help="skip the fresh-interpreter raw variant")
    args = parser.parse_args()
    t0 = time.perf_counter()
    status = backends.discover(backends.DEFAULT_BACKENDS)
    discovery_s = time.perf_counter() - t0
    all_configs = [RunConfig(b, p) for b in backends.DEFAULT_BACKENDS for p in backends.PRECISIONS]
    available = [c for c in all_configs if status[c.backend].available]
    t0 = time.perf_counter()
    arithmetic = {c.id: mnn_arithmetic.probe_arithmetic(c.backend, c.precision).kind for c in available}
    arithmetic_s = time.perf_counter() - t0
    probe = ParityEngine()
    model = probe.model(DEMO)
    inputs_a, inputs_b = probe.inputs(model)
    probe.release(DEMO)
    inputs_file = Path(tempfile.mkdtemp(prefix="bench-gpu-")) / "inputs.npz"
    np.savez(inputs_file, **{f"A/{k}": v for k, v in inputs_a.items()}, **{f"B/{k}": v for k, v in inputs_b.items()})
    print(f"MNN {mnn_version()}: {len(available)} available configs of {len(all_configs)}; "
          f"discovery (cold) {discovery_s:.3f} s, arithmetic probes (cold) {arithmetic_s:.3f} s", flush=True)
    warm = Isolation(ParityEngine(), "auto", None, backends.DEFAULT_BACKENDS, worker_scope="run")
    warm.start()
    for config in all_configs:  # untimed: workers imported, GPU runtimes created, as for a run's second model
        warm.check(DEMO, config)
    warm.release(DEMO)
    raw_matrix(available, inputs_a, inputs_b)  # untimed: the first matrix of a process pays one-off costs
    engine_matrix(all_configs)
    times: dict[str, list[float]] = defaultdict(list)
    timers = Timers()
    fresh: list[dict[str, float]] = []
    for r in range(args.rounds):  # interleaved so drift hits all alike
        t0 = time.perf_counter()
        raw_matrix(available, inputs_a, inputs_b)
        times["raw"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        engine_matrix(all_configs)
        times["engine"].append(time.perf_counter() - t0)
        undo = instrument(timers)
        try:
            t0 = time.perf_counter()
            isolated_matrix(all_configs, timers)
            times["isolated"].append(time.perf_counter() - t0)
        finally:
            undo()
        for variant in ("gpu_worker_later",):
            t0 = time.perf_counter()
            isolated_matrix(all_configs, variant=variant)
            times[f"isolated_{variant}"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for config in all_configs:
            warm.check(DEMO, config)
        warm.release(DEMO)
        times["isolated_run_warm"].append(time.perf_counter() - t0)
        if not args.no_fresh:
            raw_child = fresh_process("raw", available, inputs_file)
            import_child = fresh_process("import")
            fresh.append({"raw_fresh_wall_s": raw_child["wall_s"], "raw_fresh_matrix_s": raw_child["matrix_s"],
                          "import_only_wall_s": import_child["wall_s"], "import_mnn_s": import_child["import_s"]})
            times["raw_fresh"].append(raw_child["wall_s"])
            times["import_only"].append(import_child["wall_s"])
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()), flush=True)
    warm.close()
    shutil.rmtree(inputs_file.parent, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    raw, eng, iso = med["raw"], med["engine"], med["isolated"]
    breakdown = {name: {"s_per_matrix": total / args.rounds, "calls_per_matrix": timers.counts[name] / args.rounds}
                 for name, total in sorted(timers.parts.items(), key=lambda kv: -kv[1])}
    result = {
        "mnn_version": mnn_version(), "model": str(DEMO.relative_to(REPO)), "rounds": args.rounds,
        "available_configs": [c.id for c in available], "arithmetic": arithmetic,
        "discovery_s_cold": discovery_s, "arithmetic_probes_s_cold": arithmetic_s,
        "raw_s": times["raw"], "engine_s": times["engine"], "raw_median_s": raw, "engine_median_s": eng,
        "engine_over_raw": eng / raw,
        "isolated_s": times["isolated"], "isolated_median_s": iso, "isolated_over_raw": iso / raw,
        "isolated_run_warm_s": times["isolated_run_warm"], "isolated_run_warm_median_s": med["isolated_run_warm"],
        "isolated_gpu_worker_later_s": times["isolated_gpu_worker_later"],
        "isolated_breakdown": breakdown, "fresh_processes": fresh,
    }
    print(f"raw matrix    median {raw:.3f} s  {['%.3f' % t for t in times['raw']]}")
    print(f"engine matrix median {eng:.3f} s  {['%.3f' % t for t in times['engine']]}")
    print(f"isolated (plugin default, GPU in workers) median {iso:.3f} s  {['%.3f' % t for t in times['isolated']]}")
    print(f"isolated, the GPU worker started at the first GPU check (before) median "
          f"{med['isolated_gpu_worker_later']:.3f} s ({med['isolated_gpu_worker_later'] / raw:.2f}x raw)")
    print(f"isolated, run-scoped workers already warm (a run's next model) median {med['isolated_run_warm']:.3f} s")
    print(f"engine / raw  {eng / raw:.2f}x   isolated / raw  {iso / raw:.2f}x   "
          f"isolated warm / raw  {med['isolated_run_warm'] / raw:.2f}x")
    if fresh:
        rf, io = med["raw_fresh"], med["import_only"]
        result.update(raw_fresh_median_s=rf, import_only_median_s=io)
        print(f"raw in a fresh interpreter {rf:.3f} s (of which python + numpy + MNN import {io:.3f} s); "
              f"isolated / raw fresh {iso / rf:.2f}x")
    print("where the isolated matrix's time goes (s per matrix, summed over calls; the spawn->ready line "
          "overlaps the others):")
    for name, part in breakdown.items():
        print(f"  {part['s_per_matrix']:7.3f} s  x{part['calls_per_matrix']:<5.1f} {name}")
    accounted = sum(p["s_per_matrix"] for n, p in breakdown.items()
                    if "spawn -> ready" not in n)
    print(f"  {iso - accounted:7.3f} s         the rest (CPU/unavailable checks' own Python, pipes)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
