"""Cost of the per-layer trace on a LaMa-like graph at 512x512: time and peak memory.

Targets (issue "per-layer trace"): tracing a configuration takes at most 2x a plain
inference of the same configuration, and peak RSS stays within the RSS of plain
inference + 3 x the largest intermediate tensor.  Each measurement runs in a fresh
subprocess so peak RSS (VmHWM) is its own; the time ratio compares plain and
traced runs interleaved in the tracing process (medians), and ``trace_full``
times the full comparison of every tensor (``trace_target(fast=False)``).

    python benchmarks/bench_trace.py [--size 512] [--runs 3] [--json PATH]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r'''
import json, statistics, sys, time
from pathlib import Path
mode, path, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
from pytest_mnn_parity import ParityEngine, RunConfig
from pytest_mnn_parity.mnn.runner import reference_config, LoadedModel
from pytest_mnn_parity.trace.record import record_reference
from pytest_mnn_parity.trace.compare import trace_target
from pytest_mnn_parity.core.tolerances import resolve
try:  # the comparison thread (issue 22); absent from trees before it, which time the trace alone
    from pytest_mnn_parity.trace.stream import HELD, MAX_JOBS, ComparisonStream
except ImportError:
    ComparisonStream = None

# Where the engine runs the reference with the default --mnn-threads (4).
REFERENCE = reference_config(4)
target = RunConfig("CPU", "normal", 4)
model = LoadedModel(path)
inputs, _ = ParityEngine().inputs(model)
out = {}
def best(f):
    times = []
    for _ in range(runs):
        t0 = time.perf_counter(); f(); times.append(time.perf_counter() - t0)
    return min(times)
if mode in ("plain", "plain_pair"):
    model.run(target, inputs)
    out["target_s"] = best(lambda: model.run(target, inputs))
    if mode == "plain_pair":
        model.run(REFERENCE, inputs)
        out["reference_s"] = best(lambda: model.run(REFERENCE, inputs))
else:
    model.run(target, inputs)
    t0 = time.perf_counter(); ref, _ = record_reference(model, REFERENCE, inputs)
    out["record_reference_s"] = time.perf_counter() - t0
    tol = resolve("CPU", "normal")
    fast = mode != "trace_full"  # "trace_full": every tensor copied and fully compared (the code before the quick pass)
    # "trace": the default (streamed where a core is free beside MNN's threads); "trace_stream": always streamed.
    def streams():
        if ComparisonStream is None or mode == "trace_full":
            return {"traced": {}}
        variants = {"traced": {}, "inline": {"stream": ComparisonStream(0)},
                    "streamed": {"stream": ComparisonStream(MAX_JOBS, int(HELD * ref.largest_tensor_bytes()))}}
        return {"traced": variants["streamed"]} if mode == "trace_stream" else variants
    for name, kwargs in streams().items():
        trace_target(ref, model, target, inputs, tol, fast=fast, **kwargs)
        if name == "traced":  # its peak before the other variants run: theirs would count too
            out["traced_rss_mb"] = [int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
    # Plain and traced runs interleaved in one process, medians: the ratio survives a loaded machine.
    plain, traced = [], {}
    for _ in range(max(runs, 5)):
        t0 = time.perf_counter(); model.run(target, inputs); plain.append(time.perf_counter() - t0)
        for name, kwargs in streams().items():
            t0 = time.perf_counter(); trace_target(ref, model, target, inputs, tol, fast=fast, **kwargs)
            traced.setdefault(name, []).append(time.perf_counter() - t0)
    out["trace_target_s"], out["plain_interleaved_s"] = statistics.median(traced["traced"]), statistics.median(plain)
    for name in ("inline", "streamed"):
        if name in traced:
            out[f"{name}_s"] = statistics.median(traced[name])
    sizes = [p.stat().st_size for p in set(ref.files.values())]
    out["largest_intermediate_mb"] = max(sizes) / 2**20
    out["all_intermediates_mb"] = sum(sizes) / 2**20
    out["layers"] = len(ref.order)
    ref.close()
for line in open("/proc/self/status"):
    if line.startswith("VmHWM"):
        out["peak_rss_mb"] = int(line.split()[1]) / 1024
print(json.dumps(out))
'''


def build(size: int, folder: Path) -> Path:
    spec = importlib.util.spec_from_file_location("build_fixtures", REPO / "fixtures" / "build_fixtures.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    import onnx

    from pytest_mnn_parity.onnx.convert import convert_onnx

    onnx_path = folder / f"lama_like_{size}.onnx"
    onnx.save(builder.lama_like(size), str(onnx_path))
    return convert_onnx(onnx_path, folder / f"lama_like_{size}.mnn").target


def child(mode: str, path: Path, runs: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(path), str(runs)], capture_output=True, text=True,
                          check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = build(args.size, Path(tmp))
        plain = child("plain", path, args.runs)
        pair = child("plain_pair", path, args.runs)
        traced = child("trace", path, args.runs)
        forced = child("trace_stream", path, args.runs) if "streamed_s" in traced else None
        full = child("trace_full", path, args.runs)
    largest = traced["largest_intermediate_mb"]
    result = {
        "size": args.size, "layers": traced["layers"],
        "plain_inference_s": plain["target_s"], "traced_inference_s": traced["trace_target_s"],
        "time_ratio": traced["trace_target_s"] / traced["plain_interleaved_s"],
        "plain_interleaved_s": traced["plain_interleaved_s"],
        "full_compare_traced_s": full["trace_target_s"],
        "full_compare_time_ratio": full["trace_target_s"] / full["plain_interleaved_s"],
        "full_compare_rss_mb": full["peak_rss_mb"],
        "load_average": os.getloadavg(),
        "reference_plain_s": pair["reference_s"], "record_reference_s": traced["record_reference_s"],
        "plain_rss_mb": plain["peak_rss_mb"], "plain_pair_rss_mb": pair["peak_rss_mb"],
        "trace_rss_mb": traced.get("traced_rss_mb", traced["peak_rss_mb"]), "largest_intermediate_mb": largest,
        "all_intermediates_mb": traced["all_intermediates_mb"],
        "rss_budget_mb": pair["peak_rss_mb"] + 3 * largest,
    }
    if forced is not None:
        result.update(inline_traced_s=traced["inline_s"], streamed_traced_s=traced["streamed_s"],
                      inline_time_ratio=traced["inline_s"] / traced["plain_interleaved_s"],
                      streamed_time_ratio=traced["streamed_s"] / traced["plain_interleaved_s"],
                      streamed_rss_mb=forced["peak_rss_mb"], cores=len(os.sched_getaffinity(0)))
    print(f"LaMa-like {args.size}x{args.size}, {result['layers']} layers, intermediates "
          f"{result['all_intermediates_mb']:.0f} MB in all, largest {largest:.1f} MB")
    print(f"time:   plain target run {traced['plain_interleaved_s'] * 1e3:.0f} ms, "
          f"traced {traced['trace_target_s'] * 1e3:.0f} ms "
          f"-> {result['time_ratio']:.2f}x (issue 22: <= 1.5x; medians, interleaved in one process); full comparison of "
          f"every tensor: {full['trace_target_s'] * 1e3:.0f} ms vs {full['plain_interleaved_s'] * 1e3:.0f} ms -> "
          f"{result['full_compare_time_ratio']:.2f}x; recording the reference once: "
          f"{traced['record_reference_s'] * 1e3:.0f} ms vs {pair['reference_s'] * 1e3:.0f} ms plain")
    if forced is not None:
        print(f"        comparisons in the callback {result['inline_traced_s'] * 1e3:.0f} ms "
              f"({result['inline_time_ratio']:.2f}x), streamed to the comparison thread "
              f"{result['streamed_traced_s'] * 1e3:.0f} ms ({result['streamed_time_ratio']:.2f}x); the default "
              f"above judges in the callback ({result['cores']} usable cores, MNN on 4 threads)")
    print(f"memory: plain {plain['peak_rss_mb']:.0f} MB, "
          f"plain with the reference session {pair['peak_rss_mb']:.0f} MB, "
          f"traced {result['trace_rss_mb']:.0f} MB; budget plain-with-reference + 3 x largest = "
          f"{result['rss_budget_mb']:.0f} MB (full comparison: {full['peak_rss_mb']:.0f} MB"
          + (f"; always streamed: {forced['peak_rss_mb']:.0f} MB" if forced is not None else "") + ")")
    load = " ".join(f"{x:.2f}" for x in result["load_average"])
    print(f"load average while measuring: {load} on {os.cpu_count()} cores")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
