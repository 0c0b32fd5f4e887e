"""Repro bundles (``--mnn-repro DIR``): for a failing item, a folder someone with plain MNN can run.

The folder holds the smallest graph that still shows the failure: the op the
sweep proved broken, alone; else the model cut after its first divergent layer
(everything upstream of that layer's outputs); else the whole model.  A smaller
graph is kept only when it is checked here to still fail on the item's
configuration.  Beside it: ``inputs.npz`` and ``expected.npz`` (the reference's
tensors), ``repro.py`` (plain MNN and numpy, no plugin: prints the same
metrics and exits 1 when the tolerance is exceeded), the ``.onnx`` cut where
the model came from an ONNX file, and ``ISSUE.md`` for MNN's tracker.
"""
from __future__ import annotations

import json
import platform
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..core.metrics import compare
from ..core.tolerances import Tolerance
from ..core.verdict import tolerance_decision
from ..mnn.library import device_support_line, mnn, mnn_version
from ..mnn.model import ModelError
from ..mnn.native_output import capture_native_output
from ..mnn.runner import LoadedModel, RunConfig
from ..mnn.weights import op_tensors
from ..trace.record import TraceResult, layer_key

SCRIPT = "repro.py"


@dataclass
class Repro:
    """What one bundle holds: which graph, fed what, expected to give what, judged how."""

    what: str  # "op alone", "prefix up to LAYER", "whole model"
    model: Path
    inputs: dict[str, np.ndarray]
    expected: dict[str, np.ndarray]
    abs_floor: float
    onnx: Path | None = None
    notes: list[str] = field(default_factory=list)


def write_repro(side, result, model: LoadedModel, config: RunConfig, tol: Tolerance, inputs: Mapping[str, Any],
                input_set, reproduce: str) -> None:
    """Write the bundle of one failing item; ``result.repro`` says where (or why it could not be written)."""
    engine = side.engine
    folder = Path(engine.settings.repro) / _item_folder(result)
    try:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        candidates = _candidates(side, result, model, tol, inputs, input_set, folder)
        chosen, numbers, notes = None, None, []
        for candidate in candidates:
            found = _still_fails(candidate, config, tol)
            if isinstance(found, str):
                notes.append(f"{candidate.what}: {found}")
                continue
            chosen, numbers = candidate, found
            break
        if chosen is None:
            raise RuntimeError("no graph reproduced the failure here: " + "; ".join(notes))
        chosen.notes = notes + chosen.notes
        _write(folder, chosen, numbers, result, config, tol, reproduce, engine)
        result.repro = {"dir": str(folder), "what": chosen.what, "failed": True}
    except Exception as exc:  # noqa: BLE001 - a bundle that cannot be made is said in the report, never a crash
        result.repro = {"error": f"no repro bundle for this item: {type(exc).__name__}: {exc}"}


def _item_folder(result) -> str:
    parts = [Path(result.model).name, result.variant or "", result.config.id]
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", "-".join(p for p in parts if p))


def _candidates(side, result, model: LoadedModel, tol: Tolerance, inputs, input_set, folder: Path) -> list[Repro]:
    """The graphs worth trying, smallest first."""
    engine = side.engine
    found: list[Repro] = []
    session = side.session_model(model)
    onnx_source = engine.onnx.source_of(_key(model.path))
    trace = result.trace if isinstance(result.trace, TraceResult) and type(result.trace) is TraceResult else None
    reference = None
    if session is not None and trace is not None and engine.onnx.reference_path(model) is None \
            and engine.bundle is None:
        reference = engine.reference_trace(session, inputs, input_set)
    culprit = result.op_sweep.culprit if result.op_sweep is not None else None
    proof = side.onnx_proofs.pop(id(result), {}).get(culprit.op) if culprit is not None else None
    if proof is not None:  # judged against ONNX Runtime: the node cut from the ONNX model, and its conversion
        cut, fed, expected = proof
        how = " ".join(side.engine.onnx.probe_flags(model)[0]) or "no flags"
        found.append(Repro(f"the node {culprit.op} ({culprit.type}) alone, cut from the ONNX model (`model.onnx`) "
                           f"and converted by MNNConvert ({how})", cut.mnn, fed, expected, 0.0, onnx=cut.onnx))
    if culprit is not None and reference is not None:
        key = layer_key(culprit.op, culprit.occurrence)
        side.cache.declare_inputs(session.path, session.shapes)
        cut = side.cache.cut(session.path, culprit.op, reference.input_shapes(key))
        if cut.path is not None:
            fed = {name: np.asarray(reference.load(key, "in", index)) for name, index in cut.inputs.items()}
            expected = {name: np.asarray(reference.load(key, "out", i)) for i, name in enumerate(cut.outputs)}
            repro = Repro(f"the op {culprit.op} ({culprit.type}) alone", cut.path, fed, expected, 0.0)
            repro.onnx = _onnx_cut(onnx_source, session.path, culprit.op, folder, inputs_are_graph_inputs=False)
            found.append(repro)
    first = trace.first_divergent if trace is not None else None
    if first is not None and reference is not None:
        prefix = _prefix(session.path, first.name, folder / "prefix.mnn")
        if prefix is not None:
            key = layer_key(first.name, first.occurrence)
            expected = {name: np.asarray(reference.load(key, "out", i)) for i, name in enumerate(prefix[1])}
            if all(v.ndim or v.size for v in expected.values()):
                repro = Repro(f"the model up to its first divergent layer {first.name} ({first.type})", prefix[0],
                              {k: np.asarray(v) for k, v in inputs.items()}, expected, 0.0)
                repro.onnx = _onnx_cut(onnx_source, session.path, first.name, folder, inputs_are_graph_inputs=True)
                found.append(repro)
    ref = engine.reference(model, input_set, result.config)
    whole = Repro("the whole model", Path(model.path), {k: np.asarray(v) for k, v in inputs.items()},
                  {k: np.asarray(v) for k, v in ref.outputs_a.items()}, tol.abs_floor)
    if onnx_source is not None:
        whole.onnx = Path(onnx_source)
    found.append(whole)
    return found


def _key(path):
    from ..mnn.model import model_key  # noqa: PLC0415

    return model_key(path)


def _prefix(model_path: Path, op: str, target: Path) -> tuple[Path, list[str]] | None:
    """The model cut after ``op``: every op its outputs depend on, saved through MNN's Express API."""
    try:
        tensors = op_tensors(model_path)
    except (OSError, ValueError):
        return None
    if op not in tensors:
        return None
    names = tensors[op][1]
    with capture_native_output():
        variables = mnn().expr.load_as_dict(str(model_path))
        outputs = [variables.get(name) for name in names]
        if not outputs or any(v is None for v in outputs):
            return None
        mnn().expr.save(outputs, str(target))
    return target, names


def _onnx_cut(source, mnn_path: Path, op: str, folder: Path, inputs_are_graph_inputs: bool) -> Path | None:
    """The same graph cut from the source ONNX model (``onnx.utils.extract_model``), where the converter kept the
    tensor names; None when there is no ONNX source or the names do not match it."""
    if source is None:
        return None
    try:
        import onnx  # noqa: PLC0415
        from onnx.utils import extract_model  # noqa: PLC0415

        ins, outs = op_tensors(mnn_path)[op]
        graph = onnx.load(str(source), load_external_data=False).graph
        known = {t for node in graph.node for t in node.output} | {i.name for i in graph.input}
        initializers = {t.name for t in graph.initializer}
        if inputs_are_graph_inputs:
            ins = [i.name for i in graph.input if i.name not in initializers]
        else:
            ins = [t for t in ins if t in known and t not in initializers]
        if not all(t in known for t in [*ins, *outs]):
            return None
        target = folder / "model.onnx"
        extract_model(str(source), str(target), ins, outs)
        return target
    except Exception:  # noqa: BLE001 - the .onnx is a courtesy; the .mnn is the repro
        return None


def _still_fails(repro: Repro, config: RunConfig, tol: Tolerance) -> dict[str, Any] | str:
    """Run the candidate here as the script will: its numbers when it fails, else why it is not kept."""
    try:
        model = LoadedModel(repro.model)
        run = model.run(config, {spec.name: repro.inputs[spec.name] for spec in model.info.inputs})
    except (ModelError, KeyError) as exc:
        return f"could not run ({exc})"
    if not run.ok:
        return {"error": f"runSession returned {run.error}", "outputs": {}}
    numbers: dict[str, Any] = {"outputs": {}}
    failed = False
    for name, ref in repro.expected.items():
        target = run.outputs.get(name)
        if target is None or target.size != ref.size:
            return f"output {name} missing or of another size"
        m = compare(target.reshape(ref.shape), ref, atol=tol.atol, rtol=tol.rtol, abs_floor=repro.abs_floor)
        decision = tolerance_decision(m, tol)
        bad = decision in ("outside fraction", "outlier size", "cosine")
        failed |= bad
        numbers["outputs"][name] = {"max_abs": m.max_abs, "cosine": m.cosine, "outside_fraction": m.outside_fraction,
                                    "decision": decision, "failed": bad}
    return numbers if failed else "passes here (the failure needs more of the graph)"


def _write(folder: Path, repro: Repro, numbers: dict[str, Any], result, config: RunConfig, tol: Tolerance,
           reproduce: str, engine) -> None:
    shutil.copyfile(repro.model, folder / "model.mnn")
    weight = Path(str(repro.model) + ".weight")
    if weight.is_file():
        shutil.copyfile(weight, folder / "model.mnn.weight")
    if repro.onnx is not None and repro.onnx != folder / "model.onnx":
        shutil.copyfile(repro.onnx, folder / "model.onnx")
    (folder / "prefix.mnn").unlink(missing_ok=True)
    np.savez(folder / "inputs.npz", **repro.inputs)
    np.savez(folder / "expected.npz", **repro.expected)
    # The session config as the plugin made it (precision as MNN's code; numThread: threads, or a GPU mode).
    settings = {"backend": config.backend, "precision": config.precision, "session": config.session_config(),
                "atol": tol.atol, "rtol": tol.rtol, "min_cosine": tol.min_cosine,
                "max_outside_fraction": tol.max_outside_fraction, "outlier_limit": tol.outlier_limit,
                "abs_floor": repro.abs_floor}
    (folder / SCRIPT).write_text(SCRIPT_TEXT.replace("@SETTINGS@", json.dumps(settings, indent=4)))
    (folder / "ISSUE.md").write_text(_issue(repro, numbers, result, config, tol, reproduce, settings))


def _issue(repro: Repro, numbers, result, config: RunConfig, tol: Tolerance, reproduce: str, settings) -> str:
    rows = ["| output | max abs diff | cosine | outside tolerance | decided by |", "|---|---|---|---|---|"]
    for name, n in numbers.get("outputs", {}).items():
        rows.append(f"| {name} | {n['max_abs']:.4g} | {n['cosine']:.6f} | {n['outside_fraction']:.2%} | "
                    f"{n['decision']} |")
    device = [f"- MNN: {mnn_version()} (pip `mnn`); {device_support_line() or 'CPU features not reported'}",
              f"- backend requested: {config.backend}; ran on: {result.backend_used or '?'} (forward type "
              f"{result.forward_type}); precision: {config.precision}; {config.how()}",
              f"- machine: {platform.system()} {platform.machine()}, Python {platform.python_version()}"]
    if result.arithmetic is not None:
        device.append(f"- measured arithmetic: {result.arithmetic.describe()}")
    if result.backend_note:
        device.append(f"- device: {result.backend_note}")
    swept = result.op_sweep.conclusion() if result.op_sweep is not None else ""
    lines = [f"# Wrong result on {config.backend} precision {config.precision}: {result.category.value}", "",
             f"`model.mnn` is {repro.what} of `{result.model}`"
             + (f" (its {result.variant or 'fp32'} conversion)" if result.conversion else "")
             + ("; `model.onnx` is the same graph in ONNX" if repro.onnx is not None else "") + ".", "",
             f"Run on {config.backend} at precision {config.precision}, its outputs differ from `expected.npz` "
             f"(the same graph's tensors from {result.reference}):", "", *rows, "",
             f"Tolerance: {tol.describe()}.", ""]
    if swept:
        lines += [f"Op sweep: {swept}.", ""]
    lines += ["## Environment", "", *device, "", "## Reproduce", "", "With plain MNN (`pip install mnn numpy`):", "",
              "```sh", f"python {SCRIPT}", "```", "",
              f"It loads `model.mnn` into a session on {config.backend} / {config.precision}, feeds "
              "`inputs.npz`, compares each output with `expected.npz`, prints the numbers above and exits 1 while "
              "the difference exceeds the tolerance.", ""]
    if reproduce:
        lines += ["Found by pytest-mnn-parity with:", "", "```sh", reproduce, "```", ""]
    if repro.notes:
        lines += ["Smaller graphs tried first:", "", *(f"- {n}" for n in repro.notes), ""]
    return "\n".join(lines)


# The standalone script: plain MNN and numpy.  Its comparison is the plugin's (core.metrics.compare and
# core.verdict.tolerance_decision), restated in a few lines so that it runs without the plugin.
SCRIPT_TEXT = '''"""Reproduce a wrong MNN result with plain MNN: python repro.py (exit 1: still wrong)."""
import json
import os
import sys

import MNN
import numpy as np

SETTINGS = json.loads("""@SETTINGS@""")
HERE = os.path.dirname(os.path.abspath(__file__))


def judge(target, reference):
    t = target.astype(np.float64).reshape(reference.shape)
    r = reference.astype(np.float64)
    finite = np.isfinite(r)
    scale = float(np.abs(r[finite]).max()) if finite.any() else 0.0
    scale = scale or 1.0
    allowed = np.maximum(SETTINGS["atol"] * scale + SETTINGS["rtol"] * np.abs(r), SETTINGS["abs_floor"])
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(t - r)
    new_nonfinite = ~np.isfinite(t) & finite
    outside = (diff > allowed) | new_nonfinite
    ratio = float((diff[outside & ~new_nonfinite] / allowed[outside & ~new_nonfinite]).max()) \\
        if (outside & ~new_nonfinite).any() else 0.0
    tt, rr, tr = float((t[finite] ** 2).sum()), float((r[finite] ** 2).sum()), float((t[finite] * r[finite]).sum())
    cosine = 1.0 if tt == rr == 0 else (0.0 if tt == 0 or rr == 0 else tr / np.sqrt(tt * rr))
    max_abs = float("inf") if new_nonfinite.any() else float(np.nanmax(diff)) if diff.size else 0.0
    fraction = float(outside.mean()) if outside.size else 0.0
    if new_nonfinite.any():
        decision = "non-finite values"
    elif max_abs == 0:
        decision = "exact"
    elif fraction == 0 and max_abs <= SETTINGS["abs_floor"]:
        decision = "absolute floor"
    elif fraction > SETTINGS["max_outside_fraction"]:
        decision = "outside fraction"
    elif fraction > 0 and not ratio <= SETTINGS["outlier_limit"]:
        decision = "outlier size"
    elif not cosine >= SETTINGS["min_cosine"]:
        decision = "cosine"
    else:
        decision = "within tolerance"
    failed = decision in ("non-finite values", "outside fraction", "outlier size", "cosine")
    return max_abs, cosine, fraction, decision, failed


def main():
    print("MNN", MNN.version(), "|", SETTINGS["backend"], "precision", SETTINGS["precision"], "|", SETTINGS["session"])
    inputs = np.load(os.path.join(HERE, "inputs.npz"))
    expected = np.load(os.path.join(HERE, "expected.npz"))
    interpreter = MNN.Interpreter(os.path.join(HERE, "model.mnn"))
    session = interpreter.createSession(SETTINGS["session"])
    for name in inputs.files:
        array = np.ascontiguousarray(inputs[name])
        tensor = interpreter.getSessionInput(session, name)
        dtype = {np.dtype(np.float32): MNN.Halide_Type_Float, np.dtype(np.float64): MNN.Halide_Type_Double,
                 np.dtype(np.int32): MNN.Halide_Type_Int, np.dtype(np.int64): MNN.Halide_Type_Int64,
                 np.dtype(np.uint8): MNN.Halide_Type_Uint8}[array.dtype]
        layout = MNN.Tensor_DimensionType_Tensorflow if tensor.getDimensionType() == \\
            MNN.Tensor_DimensionType_Tensorflow else MNN.Tensor_DimensionType_Caffe
        tensor.copyFrom(MNN.Tensor(array.shape, dtype, array, layout))
    rc = interpreter.runSession(session)
    if rc != 0:
        print("runSession returned", rc)
        return 1
    worst = 0
    for name in expected.files:
        out = interpreter.getSessionOutput(session, name)
        host = MNN.Tensor(out, out.getDimensionType())
        out.copyToHostTensor(host)
        max_abs, cosine, fraction, decision, failed = judge(np.array(host.getNumpyData()), expected[name])
        print(f"{name}: max|d| {max_abs:.4g}  cosine {cosine:.6f}  outside {fraction:.2%}  -> {decision}"
              + ("  FAIL" if failed else "  ok"))
        worst |= failed
    return 1 if worst else 0


if __name__ == "__main__":
    sys.exit(main())
'''
