"""Examine the plugin's GPU verdicts independently, with raw MNN and numpy only.

For every failed item of a JSON report (``--mnn-report``) this script reruns the
target and the reference through MNN's plain Python API (no plugin code except
the seeded input generator, to get the same data) and checks:

* the category's defining fact (all zeros, new NaN/Inf, one value everywhere,
  identical output for two inputs, or the error level for ``mismatch``);
* the first divergent layer: its inputs agree with the reference's and its
  output does not; for elementwise ops it infers the op's function from the
  reference (f(ref inputs) == ref output) and applies it to the target's own
  inputs, which tells whether the backend's kernel computes that function
  (precision loss) or something else (a kernel that deviates).

    python benchmarks/gpu_verify.py REPORT.json [REPORT.json ...] [--json OUT] [--markdown OUT]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from pytest_mnn_parity.inputs.generate import generate_inputs
from pytest_mnn_parity.mnn.library import mnn
from pytest_mnn_parity.mnn.native_output import capture_native_output
from pytest_mnn_parity.mnn.runner import LoadedModel

CODES = {"normal": 0, "high": 1, "low": 2, "Low_BF16": 3}
FORWARD = {"CPU": (0, 13), "OPENCL": (3,), "VULKAN": (7,), "CUDA": (2,)}
# The examiner is subject to the same trap as everyone else: MNN's Vulkan stops
# creating devices after ~10 models' sessions and silently runs on the CPU.  So
# interpreters are kept alive, GPU sessions share one runtime per config, and
# every session's forward type is checked.
_ALIVE: list = []
_RUNTIMES: dict = {}
UNARY = {"log": np.log, "exp": np.exp, "neg": np.negative, "abs": np.abs, "sqrt": np.sqrt,
         "sigmoid": lambda x: 1 / (1 + np.exp(-x)), "relu": lambda x: np.maximum(x, 0)}
BINARY = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide, "max": np.maximum,
          "min": np.minimum}


def run_raw(path: Path, backend: str, precision: str, threads: int, inputs: dict, watch: str | None):
    """Outputs, and the watched op's first-occurrence inputs/outputs, via MNN's API alone."""
    m = mnn()
    seen: dict = {}
    with capture_native_output():
        interpreter = m.Interpreter(str(path))
        _ALIVE.append(interpreter)
        config = {"backend": backend, "precision": CODES[precision], "numThread": threads}
        if backend == "CPU":
            session = interpreter.createSession(config)
        else:
            key = (backend, precision, threads)
            if key not in _RUNTIMES:
                _RUNTIMES[key] = m.Interpreter.createRuntime((config,))[0]
            session = interpreter.createSession(config, _RUNTIMES[key])
        forward = interpreter.getSessionInfo(session, 2)
        if forward not in FORWARD.get(backend, ()):
            raise RuntimeError(f"the examiner's own {backend} session ran on forward type {forward}")
        for name, array in inputs.items():
            tensor = interpreter.getSessionInput(session, name)
            if tuple(tensor.getShape()) != array.shape:
                interpreter.resizeTensor(tensor, array.shape)
                interpreter.resizeSession(session)
            tensor.copyFrom(m.Tensor(array.shape, m.Halide_Type_Float, array, m.Tensor_DimensionType_Caffe))

        def grab(kind):
            def callback(tensors, info):
                try:  # an exception escaping a pymnn callback poisons every later one
                    if info.getName() == watch and (kind, 0) not in seen:
                        for i, t in enumerate(tensors):
                            host = m.Tensor(t, t.getDimensionType())
                            t.copyToHostTensor(host)
                            seen[(kind, i)] = np.array(host.getNumpyData(), copy=True)
                except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                    seen[("error", 0)] = repr(exc)
                return True
            return callback

        rc = interpreter.runSessionWithCallBackInfo(session, grab("in"), grab("out"))
        outputs = {}
        for name, out in interpreter.getSessionOutputAll(session).items():
            host = m.Tensor(out, out.getDimensionType())
            out.copyToHostTensor(host)
            outputs[name] = np.array(host.getNumpyData(), copy=True)
    if ("error", 0) in seen:
        raise RuntimeError(f"reading {watch}'s tensors failed: {seen[('error', 0)]}")
    layer = {"in": [seen[k] for k in sorted(seen) if k[0] == "in"], "out": [seen[k] for k in sorted(seen) if k[0] == "out"]}
    return rc, outputs, layer


def close(a, b, tol) -> bool:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return False
    finite = np.isfinite(b)
    scale = float(np.abs(b[finite]).max()) if finite.any() else 1.0
    with np.errstate(invalid="ignore"):
        ok = np.abs(a - b) <= tol["atol"] * (scale or 1.0) + tol["rtol"] * np.abs(b)
    # Where the reference is NaN/Inf only the same value agrees (rtol x inf would accept anything).
    ok = np.where(finite, ok, (a == b) | (np.isnan(a) & np.isnan(b)))
    return bool(ok.all())


def infer_function(ref_in, ref_out):
    """The elementwise function the reference op computes, if one of the usual ones."""
    with np.errstate(all="ignore"):
        if len(ref_in) == 1:
            for name, f in UNARY.items():
                got = f(ref_in[0].astype(np.float64))
                if got.shape == ref_out.shape and np.allclose(got, ref_out, rtol=1e-4, atol=1e-6, equal_nan=True):
                    return name, lambda ins, f=f: f(ins[0].astype(np.float64))
        if len(ref_in) == 2:
            for name, f in BINARY.items():
                for order in ((0, 1), (1, 0)):
                    try:
                        got = f(ref_in[order[0]].astype(np.float64), ref_in[order[1]].astype(np.float64))
                    except ValueError:  # shapes that do not broadcast
                        continue
                    if got.shape == ref_out.shape and np.allclose(got, ref_out, rtol=1e-4, atol=1e-6, equal_nan=True):
                        return f"{name}{order}", lambda ins, f=f, o=order: f(ins[o[0]].astype(np.float64),
                                                                              ins[o[1]].astype(np.float64))
    return None, None


def examine(rec: dict, settings: dict, repo: Path) -> dict:
    model = repo / rec["model"]
    ref_path = repo / settings["reference"] if settings.get("reference") not in (None, "cpu") else model
    spec_model = LoadedModel(model)
    seed = settings.get("seed", 0)
    inputs_a = generate_inputs(spec_model.info.inputs, spec_model.shapes, seed)
    inputs_b = generate_inputs(spec_model.info.inputs, spec_model.shapes, seed + 1)
    layer_name = (rec.get("first_divergent_layer") or {}).get("name")
    tol = rec["tolerance"]
    rc_t, out_t, layer_t = run_raw(model, rec["backend"], rec["precision"], rec.get("threads", 4), inputs_a, layer_name)
    rc_r, out_r, layer_r = run_raw(ref_path, "CPU", "high", 1, inputs_a, layer_name)
    facts = {"nodeid": rec["nodeid"], "category": rec["category"], "rc": [rc_t, rc_r]}
    name = next(iter(sorted(k for k, v in rec["outputs"].items() if v.get("category") != "ok")), None)
    if name is None or name not in out_t:
        facts["confirmed"] = False
        facts["why"] = f"no failing output to check (failing: {name}, outputs: {sorted(out_t)})"
        return facts
    t, r = out_t[name].astype(np.float64), out_r[name].astype(np.float64)
    cat = rec["category"]
    if cat == "zero_output":
        facts["confirmed"] = bool(np.all(t == 0) and np.any(r != 0))
    elif cat == "non_finite":
        facts["confirmed"] = bool(np.any(~np.isfinite(t) & np.isfinite(r)))
    elif cat == "partial_zero":
        facts["confirmed"] = bool(np.mean((t == 0) & (r != 0)) >= 0.01)
    elif cat == "constant_output":
        facts["confirmed"] = bool(np.all(t == t.flat[0]) and np.any(r != r.flat[0]))
    elif cat == "stale_output":
        _, out_tb, _ = run_raw(model, rec["backend"], rec["precision"], rec.get("threads", 4), inputs_b, None)
        facts["confirmed"] = bool(np.array_equal(out_tb[name], out_t[name]))
    else:
        facts["confirmed"] = not close(t, r, tol)
    with np.errstate(invalid="ignore"):
        facts["max_abs"] = float(np.nanmax(np.abs(t - r))) if np.isfinite(t - r).any() else float("inf")
    if layer_name:
        ins_ok = all(close(a, b, tol) for a, b in zip(layer_t["in"], layer_r["in"])) and len(layer_t["in"]) == len(layer_r["in"])
        out_bad = not all(close(a, b, tol) for a, b in zip(layer_t["out"], layer_r["out"]))
        facts["layer"] = {"name": layer_name, "type": rec["first_divergent_layer"].get("type"),
                          "inputs_agree": ins_ok, "output_differs": out_bad}
        fname, f = infer_function(layer_r["in"], layer_r["out"][0]) if layer_r["out"] else (None, None)
        if f is not None:
            own = f(layer_t["in"])
            facts["layer"]["function"] = fname
            facts["layer"]["target_computes_its_function"] = close(layer_t["out"][0], own, tol)
    return facts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1])
    args = parser.parse_args()
    findings = []
    for report in args.reports:
        data = json.loads(report.read_text())
        for rec in data["results"]:
            if rec["outcome"] == "failed" and rec["backend"] not in (None, "CPU") and rec["category"] not in (
                    "runtime_error", "backend_fallback", "crashed", "timeout"):
                try:
                    findings.append(examine(rec, data["settings"], args.repo))
                except Exception as exc:  # keep examining the others
                    findings.append({"nodeid": rec["nodeid"], "category": rec["category"], "error": repr(exc)})
    for f in findings:
        layer = f.get("layer", {})
        print(f"{f['nodeid']:70s} {f['category']:16s} confirmed={f.get('confirmed')} "
              f"layer={layer.get('name')} inputs_agree={layer.get('inputs_agree')} "
              f"output_differs={layer.get('output_differs')} fn={layer.get('function')} "
              f"computes_fn={layer.get('target_computes_its_function')} {f.get('error', '')}{f.get('why', '')}")
    if args.json:
        args.json.write_text(json.dumps(findings, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
