"""MNN finding: the Module API on OpenCL can return a stale output in a fresh process (raw MNN, no plugin code).

The plugin reported ``stale_output`` for ``fixtures/control_flow/if_branch.mnn`` (an ONNX ``If``, run
through ``MNN.nn.load_module_from_file``) on OPENCL, for the first OpenCL configuration of a fresh
process, and ``ok`` when other OpenCL work had run earlier in the same process (docs/gpu.md).  This
script shows it with MNN's plain Python API: each trial is a fresh Python process that optionally does
some other MNN work first, then loads the module on a runtime manager for BACKEND, forwards input A,
then input B (seeds 0 and 1, as the plugin's input sets A and B), and checks each output against the
model's function (image * 2 where sum(image) > 0, which holds for both inputs).

    python benchmarks/gpu_module_stale.py [--backend OPENCL] [--trials 6] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

MODEL = Path(__file__).resolve().parents[1] / "fixtures" / "control_flow" / "if_branch.mnn"
DEMO = Path(__file__).resolve().parents[1] / "fixtures" / "demo" / "lama_like.mnn"

TRIAL = r'''
import json, sys
import numpy as np
import MNN
nn, F = MNN.nn, MNN.expr
model, demo, backend, before = sys.argv[1:5]
A = np.random.default_rng(0).random((1, 3, 8, 8), dtype=np.float32)
B = np.random.default_rng(1).random((1, 3, 8, 8), dtype=np.float32)

def forward(config, inputs):
    module = nn.load_module_from_file(model, [], [], runtime_manager=nn.create_runtime_manager((config,)))
    return [np.array(module.forward([F.const(x, list(x.shape), F.NCHW, F.float)])[0].read(), copy=True)
            for x in inputs]

if before == "cpu-module":        # what the plugin's reference does first: the same model on CPU
    forward({"backend": "CPU", "precision": 1, "numThread": 1}, [A, B])
elif before == "gpu-session":     # another model in a session on the same backend first
    interpreter = MNN.Interpreter(demo)
    session = interpreter.createSession({"backend": backend, "precision": 0, "numThread": 1})
    interpreter.runSession(session)
out_a, out_b = forward({"backend": backend, "precision": 0, "numThread": 4}, [A, B])
print("RESULT " + json.dumps({"stale": bool(np.array_equal(out_a, out_b)),
                              "err_a": float(np.max(np.abs(out_a - 2 * A))),
                              "err_b": float(np.max(np.abs(out_b - 2 * B)))}))
'''


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="OPENCL")
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    table = {}
    for before in ("nothing", "cpu-module", "gpu-session"):
        rows = []
        for _ in range(args.trials):
            proc = subprocess.run([sys.executable, "-c", TRIAL, str(MODEL), str(DEMO), args.backend, before],
                                  capture_output=True, text=True, timeout=120)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            rows.append(json.loads(line[0][7:]) if line else {"error": proc.returncode, "stderr": proc.stderr[-300:]})
        table[before] = rows
        stale = sum(1 for r in rows if r.get("stale"))
        worst_b = max((r.get("err_b", float("nan")) for r in rows), default=float("nan"))
        print(f"{args.backend} after {before:12s}: output B == output A in {stale} of {len(rows)} fresh processes; "
              f"worst |B - 2*B_in| {worst_b:.3g}")
    if args.json:
        args.json.write_text(json.dumps({"backend": args.backend, "trials": table}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
