"""The op sweep: each op run alone on the reference's exact inputs, to prove which op is broken.

The per-layer trace names the first op whose output left tolerance, but in a
deep graph that op may only be where accumulated error crossed the line.  Here
an op is cut out of the tested ``.mnn`` (MNN's Express API: the file loaded as
variables, the op's non-constant inputs replaced by placeholders, saved as a
one-op model), fed the tensors the reference recorded for it, run on the
item's backend and precision, and judged against the reference's output of
that op, with the item's tolerance.  Wrong alone is a broken op on that
backend; right alone but wrong in the graph is upstream or accumulated error.

A one-op model's tensors are renamed (``in0``, ``out0``, ...) so that ops of
the same type, attributes and weights give the same bytes: those share one cut
file and its sessions (``CutCache``), within a run.
"""
from __future__ import annotations

import hashlib
import shutil
import tempfile
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..core.metrics import compare
from ..core.tolerances import Tolerance
from ..core.verdict import SESSION_MADE, fails_tolerance
from ..mnn.library import mnn
from ..mnn.model import ModelError, remembered
from ..mnn.native_output import capture_native_output
from ..mnn.runner import LoadedModel, RunConfig
from ..mnn.weights import op_tensors
from .record import LayerRecord, ReferenceTrace, TraceResult, health_flags, layer_key

METHOD = "each op cut alone from the tested .mnn (MNN Express), fed the reference's recorded inputs of that op"

# What the sweep concludes per op, worst first.
BROKEN = "broken"  # wrong alone, with the reference's exact inputs: this op is wrong on this backend
ACCUMULATED = "accumulated"  # right alone; in the graph its inputs were within tolerance, its output not
UPSTREAM = "upstream"  # right alone; in the graph its inputs were already out of tolerance
OK = "ok"  # right alone and in the graph
NOT_CUT = "not_cut"  # could not be run alone: the reason says why
VERDICTS = (BROKEN, ACCUMULATED, UPSTREAM, OK, NOT_CUT)

# A health flag alone (health_flags) -> the failure category it stands for.
_HEALTH_CATEGORY = {"non_finite": "non_finite", "zero": "zero_output", "partial_zero": "partial_zero",
                    "constant": "constant_output"}
_SEVERITY = ("non_finite", "zero_output", "constant_output", "partial_zero", "mismatch")


@dataclass
class SweepRow:
    """One op on one configuration: alone against the reference, and how it fared in the graph."""

    op: str
    type: str
    occurrence: int
    backend: str
    precision: str
    verdict: str
    category: str = ""  # alone: "ok" or a failure category ("" when it did not run)
    max_abs: float | None = None
    cosine: float | None = None
    outside_fraction: float | None = None
    health: list[str] = field(default_factory=list)
    in_graph: dict[str, Any] | None = None  # {"failed", "inputs_ok", "max_abs", "cosine", "health"}
    cut: str = ""  # how it was cut ("mnn-express"; "cached" when an identical op's cut was reused)
    reason: str = ""  # not_cut: why; otherwise what the verdict rests on

    @property
    def label(self) -> str:
        return self.op if self.occurrence == 0 else f"{self.op}#{self.occurrence}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SweepRow":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class SweepResult:
    """The sweep of one item (one backend x precision): a row per swept op, and what it concludes."""

    mode: str
    rows: list[SweepRow] = field(default_factory=list)
    method: str = METHOD
    # The op the trace blamed (its first divergent layer), kept to say whether the sweep agrees.
    trace_blamed: str = ""
    cuts: int = 0  # one-op models cut in this item (the rest came from the run's cache)
    # Why nothing was swept ("" when ops were): the model or its reference gives nothing to cut or feed.
    note: str = ""

    @property
    def broken(self) -> list[SweepRow]:
        return [row for row in self.rows if row.verdict == BROKEN]

    @property
    def culprit(self) -> SweepRow | None:
        """The broken op to blame: the most severe category alone (zeros over a mismatch), then the lowest
        cosine, then graph order.  None when no op is wrong alone."""
        broken = self.broken
        if not broken:
            return None

        def rank(item):
            index, row = item
            severity = _SEVERITY.index(row.category) if row.category in _SEVERITY else len(_SEVERITY)
            cosine = row.cosine if row.cosine is not None and row.cosine == row.cosine else -2.0
            return severity, cosine, index

        return min(enumerate(broken), key=rank)[1]

    @property
    def not_cut(self) -> list[SweepRow]:
        return [row for row in self.rows if row.verdict == NOT_CUT]

    def flagged(self) -> list[SweepRow]:
        """Rows of ops the graph had out of tolerance, and every op wrong alone."""
        return [row for row in self.rows if (row.in_graph or {}).get("failed") or row.verdict == BROKEN]

    def conclusion(self) -> str:
        """One line: the broken op, or why none is to blame."""
        if self.note:
            return self.note
        culprit = self.culprit
        if culprit is not None:
            others = [row.label for row in self.broken if row is not culprit]
            text = (f"broken op: {culprit.label} ({culprit.type}) is wrong alone on {culprit.backend}-"
                    f"{culprit.precision} with the reference's exact inputs ({culprit.category}, "
                    f"{_numbers(culprit)})")
            if others:
                text += f"; also wrong alone: {', '.join(others)}"
            return text
        failing = [row for row in self.rows if (row.in_graph or {}).get("failed")]
        swept = [row for row in failing if row.verdict != NOT_CUT]
        if swept:
            first = next((row for row in swept if row.verdict == ACCUMULATED), swept[0])
            text = (f"no op is wrong alone: every out-of-tolerance op that ran alone ({len(swept)}) is right with the "
                    f"reference's exact inputs, so the error accumulates over layers (first out of tolerance "
                    f"in the graph: {first.label} ({first.type}))")
        else:
            ran = [row for row in self.rows if row.verdict != NOT_CUT]
            text = f"no op is wrong alone: {len(ran)} op(s) ran alone, each within tolerance"
        if self.not_cut:
            text += f"; {len(self.not_cut)} op(s) could not be run alone (the table says why)"
        return text

    def as_dict(self) -> dict[str, Any]:
        culprit = self.culprit
        return {"mode": self.mode, "method": self.method, "trace_blamed": self.trace_blamed, "cuts": self.cuts,
                "note": self.note,
                "conclusion": self.conclusion(),
                "broken_op": None if culprit is None else {"name": culprit.op, "type": culprit.type,
                                                          "occurrence": culprit.occurrence,
                                                          "category": culprit.category},
                "rows": [row.as_dict() for row in self.rows]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "SweepResult | None":
        if data is None:
            return None
        return cls(data.get("mode", "flagged"), [SweepRow.from_dict(r) for r in data.get("rows", [])],
                   data.get("method", METHOD), data.get("trace_blamed", ""), data.get("cuts", 0),
                   data.get("note", ""))


def _numbers(row: SweepRow) -> str:
    parts = []
    if row.max_abs is not None:
        parts.append(f"max|d| {row.max_abs:.4g}")
    if row.cosine is not None:
        parts.append(f"cosine {row.cosine:.6f}")
    if row.outside_fraction is not None:
        parts.append(f"outside {row.outside_fraction:.1%}")
    return ", ".join(parts)


@dataclass
class Cut:
    """One op alone as a one-op ``.mnn`` (``path``), or why it could not be cut (``reason``)."""

    path: Path | None
    # Per input of the cut model ("in0", ...): the index of the op's input tensor it stands for.
    inputs: dict[str, int] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    reason: str = ""
    cached: bool = False


class CutCache:
    """One-op models cut within a run: per model, its ops' cuts; per content, one file and one loaded model.

    The files live in a temporary folder removed when the cache is (or at exit).
    """

    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="mnn-parity-cuts-"))
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.folder), True)
        self._graphs: dict[Path, tuple[dict, dict]] = {}
        self._cuts: dict[tuple[Path, str], Cut] = {}
        self._by_content: dict[str, Path] = {}
        self._models: dict[Path, LoadedModel | ModelError] = {}
        self.made = 0
        # The graph inputs' sizes each model ran with (``declare_inputs``): a file with dynamic dimensions gives
        # Express no shape anywhere downstream until its inputs are resized.
        self._input_shapes: dict[Path, dict[str, tuple[int, ...]]] = {}

    def declare_inputs(self, model_path: Path, shapes: Mapping[str, Any]) -> None:
        self._input_shapes.setdefault(Path(model_path), {name: tuple(shape) for name, shape in shapes.items()})

    def close(self) -> None:
        self._models.clear()
        self._graphs.clear()
        self._finalizer()

    def cut(self, model_path: Path, op: str, shapes: Mapping[int, tuple[int, ...]] | None = None) -> Cut:
        """The op ``op`` of ``model_path`` alone; ``shapes`` are its inputs' shapes as the reference recorded them
        (they win over the file's: a file may declare none, or a broadcast MNN expanded at session time)."""
        shapes = dict(shapes or {})
        key = (Path(model_path), op, tuple(sorted(shapes.items())))
        if key not in self._cuts:
            try:
                self._cuts[key] = self._cut(Path(model_path), op, shapes)
            except Exception as exc:  # noqa: BLE001 - one op that cannot be cut is a row that says so, not a crash
                self._cuts[key] = Cut(None, reason=f"cutting it failed ({type(exc).__name__}: {exc})")
        return self._cuts[key]

    def model(self, cut: Cut) -> LoadedModel:
        """The loaded one-op model (shared by every op with the same content); ModelError if MNN refuses it."""
        return remembered(self._models, cut.path, lambda: LoadedModel(cut.path))

    def _graph(self, model_path: Path) -> tuple[dict, dict]:
        if model_path not in self._graphs:
            try:
                tensors = op_tensors(model_path)
            except (OSError, ValueError):
                tensors = {}
            with capture_native_output():
                variables = mnn().expr.load_as_dict(str(model_path)) if tensors else {}
                for name, shape in self._input_shapes.get(model_path, {}).items():
                    var = variables.get(name)
                    if var is not None and var.op_type == "Input" and list(var.shape or []) != list(shape):
                        var.resize(list(shape))
            self._graphs[model_path] = (tensors, variables)
        return self._graphs[model_path]

    def _cut(self, model_path: Path, op: str, shapes: Mapping[int, tuple[int, ...]]) -> Cut:
        tensors, variables = self._graph(model_path)
        if not tensors:
            return Cut(None, reason="MNN's Express API cannot load this file as variables")
        if op not in tensors:
            return Cut(None, reason=f"{SESSION_MADE} (a layout copy or part of a decomposed op): no op of that "
                                    "name in the file")
        input_names, output_names = tensors[op]
        outputs = [variables.get(name) for name in output_names]
        if not outputs or any(v is None for v in outputs):
            return Cut(None, reason=f"Express does not expose the op's outputs {output_names} (control flow or a "
                                    "fused subgraph)")
        F = mnn().expr
        try:
            originals = list(outputs[0].inputs)
        except Exception as exc:  # noqa: BLE001 - pymnn raises bare exceptions
            return Cut(None, reason=f"Express cannot read the op's inputs ({exc})")
        if len(originals) != len(input_names):
            return Cut(None, reason=f"Express sees {len(originals)} inputs where the file has {len(input_names)}")
        fed, replaced = {}, []
        for index, var in enumerate(originals):
            if var.op_type == "Const":  # weights stay in the cut, as they are in the file (fp16 included)
                replaced.append(var)
                continue
            # A PP-OCR classifier's file declares no shape for any op input (Express gives None): the recorded
            # tensor's shape is what the op really got.
            declared = var.shape
            shape = list(shapes[index]) if index in shapes else None if declared is None else list(declared)
            if shape is None:
                return Cut(None, reason=f"input {index} ({input_names[index]}) has no shape in the file and the "
                                        "reference recorded none")
            if any(d <= 0 for d in shape):
                return Cut(None, reason=f"input {index} ({input_names[index]}) has no static shape {shape}")
            fmt = var.data_format
            # Placeholders are NCHW (or NHWC) so that plain MNN feeds them from numpy; a packed input is
            # converted inside the cut, as the file's own layout-converting op did.
            host = F.NHWC if fmt == F.NHWC else F.NCHW
            placeholder = F.placeholder(shape, host, var.dtype)
            placeholder.name = f"in{len(fed)}"
            fed[placeholder.name] = index
            replaced.append(F.convert(placeholder, fmt) if fmt not in (F.NHWC, F.NCHW) else placeholder)
        try:
            outputs[0].set_inputs(replaced)
            for i, var in enumerate(outputs):
                var.name = f"out{i}"
            staging = self.folder / f"staging-{self.made}.mnn"
            with capture_native_output():
                F.save(outputs, str(staging))
        except Exception as exc:  # noqa: BLE001
            return Cut(None, reason=f"Express could not save the op alone ({exc})")
        finally:
            for var, name in zip(outputs, output_names):
                var.name = name
        self.made += 1
        digest = hashlib.sha256(staging.read_bytes()).hexdigest()[:16]
        cached = digest in self._by_content
        if cached:
            staging.unlink()
        else:
            final = self.folder / f"{digest}.mnn"
            staging.replace(final)
            self._by_content[digest] = final
        return Cut(self._by_content[digest], fed, [f"out{i}" for i in range(len(outputs))], cached=cached)


def _category(health: list[str], failed: bool) -> str:
    if not failed:
        return "ok"
    return next((_HEALTH_CATEGORY[h] for h in health if h in _HEALTH_CATEGORY), "mismatch")


def run_cut(model: LoadedModel, config: RunConfig, feeds: Mapping[str, np.ndarray], what: str):
    """Run a one-``what`` (op, node) model on ``config``: its run, or why it could not run alone (a not_cut
    reason).  A session that falls back to another backend did not run it on ``config``."""
    try:
        if model.falls_back(config):
            return f"the one-{what} model's session fell back from {config.backend} to another backend"
        run = model.run(config, feeds)
    except ModelError as exc:
        return f"MNN could not run the {what} alone: {exc.reason}"
    if not run.ok:
        return f"the {what} alone failed to run ({run.error})"
    return run


def run_alone(cache: CutCache, model_path: Path, reference: ReferenceTrace, name: str, op_type: str,
              occurrence: int, config: RunConfig, tol: Tolerance, layer: LayerRecord | None = None) -> SweepRow:
    """One op alone on ``config``, fed and judged with what ``reference`` recorded for it."""
    row = SweepRow(name, op_type, occurrence, config.backend, config.precision, NOT_CUT,
                   in_graph=None if layer is None else in_graph_of(layer))
    key = layer_key(name, occurrence)
    cut = cache.cut(model_path, name, reference.input_shapes(key))
    if cut.path is None:
        row.reason = cut.reason
        return row
    row.cut = "cached" if cut.cached else "mnn-express"
    inputs = {}
    for placeholder, index in cut.inputs.items():
        recorded = reference.load(key, "in", index)
        if recorded is None:
            why = reference.unobservable.get((key, "in", index), "the reference recorded no such tensor")
            row.reason = f"input {index}: {why}"
            return row
        inputs[placeholder] = np.asarray(recorded)
    try:
        model = cache.model(cut)
        for spec in model.info.inputs:  # the recorded tensor decides the size (a cut's placeholder may be -1)
            if tuple(inputs[spec.name].shape) != tuple(model.shapes[spec.name]):
                row.reason = (f"input {cut.inputs[spec.name]}: recorded shape {inputs[spec.name].shape} vs the "
                              f"cut's {model.shapes[spec.name]}")
                return row
    except ModelError as exc:
        row.reason = f"MNN could not run the op alone: {exc.reason}"
        return row
    run = run_cut(model, config, inputs, "op")
    if isinstance(run, str):
        row.reason = run
        return row
    pairs = []
    for i, out_name in enumerate(cut.outputs):
        ref, target = reference.load(key, "out", i), run.outputs.get(out_name)
        if ref is not None and target is not None:
            pairs.append((target, np.asarray(ref)))
    return conclude(row, pairs, tol, layer)


def conclude(row: SweepRow, pairs: list[tuple[np.ndarray, np.ndarray]], tol: Tolerance,
             layer: LayerRecord | None) -> SweepRow:
    """Judge an op alone from its (output alone, reference output) ``pairs``, and say what that makes of it
    given how it fared in the graph (``layer``; None when its output was not compared there)."""
    worst = None
    for target, ref in pairs:
        if target.size != ref.size:
            continue
        target = target.reshape(ref.shape)
        # As the trace judges op tensors (trace.compare): no absolute floor, an op's tensor may be tiny.
        m = compare(target, ref, atol=tol.atol, rtol=tol.rtol)
        failed = fails_tolerance(m, tol)
        health = health_flags(target, ref, m, tol) if failed else []
        if worst is None or (failed and not worst[1]) or (failed == worst[1] and _worse(m.cosine, worst[0].cosine)):
            worst = (m, failed, health)
    if worst is None:
        row.reason = "no output of the op alone could be paired with the reference's"
        return row
    m, failed, health = worst
    row.max_abs, row.cosine, row.outside_fraction, row.health = m.max_abs, m.cosine, m.outside_fraction, health
    row.category = _category(health, failed)
    if failed:
        row.verdict, row.reason = BROKEN, "wrong alone with the reference's exact inputs"
    elif layer is None or not layer.failed:
        row.verdict = OK
        row.reason = "right alone" + (" (its output was not compared in the graph)" if layer is None else
                                      " and in the graph")
    elif layer.inputs_ok:
        row.verdict = ACCUMULATED
        row.reason = ("right alone; in the graph its inputs were within tolerance but carried small errors that "
                      "this op took past it")
    else:
        row.verdict, row.reason = UPSTREAM, "right alone; in the graph its inputs were already out of tolerance"
    return row


def _worse(a: float, b: float) -> bool:
    return (a != a) or (b == b and a < b)


def in_graph_of(layer: LayerRecord) -> dict[str, Any]:
    m = layer.outputs[0].metrics if layer.outputs and layer.outputs[0].metrics is not None else None
    return {"failed": layer.failed, "inputs_ok": layer.inputs_ok, "health": layer.health,
            "max_abs": None if m is None else m.max_abs, "cosine": None if m is None else m.cosine}


def sweep(cache: CutCache, model_path: Path, reference: ReferenceTrace, trace: TraceResult | None,
          config: RunConfig, tol: Tolerance, mode: str,
          layer_tolerances: Mapping[str, Tolerance] | None = None) -> SweepResult:
    """Run ops alone: those the trace flagged (``flagged``), or every op the reference ran (``all``)."""
    layer_tolerances = layer_tolerances or {}
    layers = {layer_key(layer.name, layer.occurrence): layer for layer in (trace.layers if trace else [])}
    if mode == "all":
        wanted = [(name, op_type, occurrence) for name, op_type, occurrence in reference.order]
    else:
        wanted = [(layer.name, layer.type, layer.occurrence) for layer in layers.values() if layer.failed]
    first = trace.first_divergent if trace is not None else None
    result = SweepResult(mode, trace_blamed="" if first is None else first.name)
    before = cache.made
    for name, op_type, occurrence in wanted:
        result.rows.append(run_alone(cache, Path(model_path), reference, name, op_type, occurrence, config,
                                     layer_tolerances.get(name, tol), layers.get(layer_key(name, occurrence))))
    result.cuts = cache.made - before
    return result


def table_lines(rows: list[SweepRow], with_config: bool = False) -> list[str]:
    """The sweep as a table: op, type, (backend-precision), verdict, category alone, its numbers."""
    header = ("op", "type") + (("config",) if with_config else ()) + (
        "alone", "max_abs", "cosine", "outside", "in graph", "verdict")
    table = [header]
    for row in rows:
        graph = row.in_graph or {}
        in_graph = "-" if not graph else (",".join(graph.get("health") or []) or ("FAIL" if graph.get("failed")
                                                                                  else "ok"))
        cells = (row.label, row.type) + ((f"{row.backend}-{row.precision}",) if with_config else ()) + (
            row.category or "-", "-" if row.max_abs is None else f"{row.max_abs:.4g}",
            "-" if row.cosine is None else f"{row.cosine:.6f}",
            "-" if row.outside_fraction is None else f"{row.outside_fraction:.1%}", in_graph,
            row.verdict if row.verdict != NOT_CUT else f"not cut: {row.reason}")
        table.append(cells)
    widths = [max(len(r[i]) for r in table) for i in range(len(header) - 1)]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in table]
