"""The op sweep of a model judged against ONNX Runtime: each ONNX node cut alone from the source ONNX model.

MNN's per-op tensors cannot stand in for ONNX Runtime's (the converter fuses and
renames, ``onnx.localise``), so an ONNX-referenced item is swept on the ONNX
side: ONNX Runtime records every swept node's input and output tensors (a copy
of the model with them as extra graph outputs), each node is cut out as a
one-node ONNX graph (its inputs as graph inputs at the recorded shapes and
dtypes, its initializers and constant inputs as initializers), converted with
the item's MNNConvert flags (``--fp16`` included), run alone on the item's
backend and precision fed the recorded inputs, and judged against ONNX
Runtime's recorded output of that node, with the item's tolerance.

How a node fared in the graph comes from the localisation's probes (``onnx.localise``),
plus one more probe for the swept tensors it did not compare.  A one-node graph's
tensors and initializers are renamed (``in0``, ``c0``, ``out0``), so nodes of the
same type, attributes, weights and input shapes give the same bytes: one
conversion and one loaded model per content within a run (``OnnxCutCache``).
"""
from __future__ import annotations

import hashlib
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..core.tolerances import Tolerance
from ..mnn.model import ModelError, remembered
from ..mnn.runner import LoadedModel, RunConfig
from ..trace.record import LayerRecord, TensorJudgement
from ..trace.sweep import NOT_CUT, SweepResult, SweepRow, conclude, in_graph_of, run_cut
from .convert import ConversionError
from .localise import Graph, Node, Prober, graph_from_onnx, write_copy
from .runtime import OnnxRuntimeModel, as_mnn_dtype

METHOD = ("each node cut alone from the source ONNX model and converted by MNNConvert with the item's flags, fed "
          "ONNX Runtime's recorded inputs of that node")
CUT = "onnx-node"
# Their subgraphs read tensors of the graph around them, which a one-node graph does not have.
CONTROL_FLOW = ("If", "Loop", "Scan")


@dataclass
class NodeCut:
    """One ONNX node alone: its one-node ``.onnx``, its conversion ``mnn``, or why not (``reason``)."""

    mnn: Path | None
    onnx: Path | None = None
    inputs: dict[str, str] = field(default_factory=dict)  # "in0" -> the source graph's tensor it stands for
    outputs: dict[str, str] = field(default_factory=dict)  # "out0" -> the source graph's tensor
    reason: str = ""
    cached: bool = False


@dataclass
class OnnxSweep:
    """What an ONNX sweep found: the rows, the tensors judged in the graph, and each broken node's cut with its
    recorded inputs and outputs (what a repro bundle needs)."""

    result: SweepResult
    graph: Graph
    judged: dict[str, TensorJudgement]
    proofs: dict[str, tuple[NodeCut, dict[str, np.ndarray], dict[str, np.ndarray]]] = field(default_factory=dict)


class OnnxCutCache:
    """One-node ONNX graphs cut and converted within a run, one per content and flags.

    The one-node ``.onnx`` files live in a temporary folder removed with the cache; their conversions go to the
    run's conversion cache (``variants.ConversionCache``), which keys them by content and flags too.
    """

    def __init__(self, conversions):
        self.conversions = conversions
        self.folder = Path(tempfile.mkdtemp(prefix="mnn-parity-onnx-cuts-"))
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.folder), True)
        self._done: dict[tuple[str, tuple[str, ...]], tuple[Path | None, str]] = {}
        self._models: dict[Path, LoadedModel | ModelError] = {}
        self.made = 0  # conversions asked for (the rest were found identical within the run)

    def close(self) -> None:
        self._models.clear()
        self._finalizer()

    def cut(self, base, node_proto, recorded: Mapping[str, np.ndarray], live: set[str],
            flags: Sequence[str]) -> NodeCut:
        try:
            built = one_node_model(base, node_proto, recorded, live)
        except Exception as exc:  # noqa: BLE001 - one node that cannot be cut is a row that says so, not a crash
            return NodeCut(None, reason=f"cutting it failed ({type(exc).__name__}: {exc})")
        if isinstance(built, str):
            return NodeCut(None, reason=built)
        model, inputs, outputs = built
        data = model.SerializeToString()
        digest = hashlib.sha256(data).hexdigest()[:24]
        source = self.folder / f"{node_proto.op_type}.{digest}.onnx"
        key = (digest, tuple(flags))
        cached = key in self._done
        if not cached:
            source.write_bytes(data)
            self.made += 1
            try:
                self._done[key] = (self.conversions.convert_with(source, tuple(flags), "node"), "")
            except ConversionError as exc:
                self._done[key] = (None, f"MNN's converter cannot convert it alone: {exc.reason}")
        path, reason = self._done[key]
        return NodeCut(path, source, inputs, outputs, reason, cached)

    def model(self, cut: NodeCut) -> LoadedModel:
        """The converted one-node model (shared by identical cuts); MNN's refusal is remembered and raised."""
        return remembered(self._models, cut.mnn, lambda: LoadedModel(cut.mnn))


def live_tensors(model) -> set[str]:
    """Tensors that depend on a graph input (the rest are constants both sides fold)."""
    initializers = {t.name for t in model.graph.initializer}
    live = {i.name for i in model.graph.input if i.name not in initializers}
    for node in model.graph.node:
        if any(t in live for t in node.input):
            live.update(t for t in node.output if t)
    return live


def one_node_model(base, node_proto, recorded: Mapping[str, np.ndarray], live: set[str]):
    """``(model, inputs, outputs)``: ``node_proto`` alone, or a sentence saying why it cannot be."""
    import onnx  # noqa: PLC0415
    from onnx import helper, numpy_helper  # noqa: PLC0415

    if node_proto.op_type in CONTROL_FLOW or any(a.HasField("g") or len(a.graphs) for a in node_proto.attribute):
        return (f"a control-flow node ({node_proto.op_type}): its subgraphs read tensors of the graph around it, "
                "so it is not cut alone")
    initializers = {t.name: t for t in base.graph.initializer}
    graph_inputs, consts, names, inputs = [], [], [], {}
    for name in node_proto.input:
        if not name:
            names.append("")
            continue
        if name in initializers or name not in live:
            value = numpy_helper.to_array(initializers[name]) if name in initializers else recorded.get(name)
            if value is None:
                return f"ONNX Runtime recorded no value for its constant input {name}"
            const = numpy_helper.from_array(np.asarray(value), f"c{len(consts)}")
            consts.append(const)
            names.append(const.name)
            continue
        if name in inputs.values():  # the same tensor twice (x * x): one graph input
            names.append(next(k for k, v in inputs.items() if v == name))
            continue
        value = recorded.get(name)
        if value is None:
            return f"ONNX Runtime recorded no value for its input {name}"
        names.append(_placeholder("in", inputs, name, value, graph_inputs))
    outputs, out_names, graph_outputs = {}, [], []
    for name in node_proto.output:
        if not name:
            out_names.append("")
            continue
        value = recorded.get(name)
        if value is None:
            return f"ONNX Runtime recorded no value for its output {name}"
        out_names.append(_placeholder("out", outputs, name, value, graph_outputs))
    if not inputs:
        return "it has no input computed from the model's inputs: both sides fold it into a constant"
    node = onnx.NodeProto()
    node.CopyFrom(node_proto)
    node.name, node.doc_string = "node", ""
    del node.input[:], node.output[:]
    node.input.extend(names)
    node.output.extend(out_names)
    graph = helper.make_graph([node], "cut", graph_inputs, graph_outputs, consts)
    model = helper.make_model(graph, opset_imports=list(base.opset_import), ir_version=base.ir_version)
    return model, inputs, outputs


def _placeholder(prefix: str, table: dict[str, str], name: str, value, value_infos: list) -> str:
    """A cut graph's name for the model's tensor ``name`` (``in0``, ``out1``): kept in ``table`` (placeholder ->
    the model's name), declared with the recorded value's dtype and shape in ``value_infos``."""
    from onnx import helper  # noqa: PLC0415 - as in one_node_model, its one caller

    placeholder = f"{prefix}{len(table)}"
    table[placeholder] = name
    value_infos.append(helper.make_tensor_value_info(
        placeholder, helper.np_dtype_to_tensor_dtype(np.asarray(value).dtype), list(np.shape(value))))
    return placeholder


def record(onnx_path: Path, base, tensors: Sequence[str], inputs: Mapping[str, np.ndarray],
           folder: Path) -> dict[str, np.ndarray]:
    """ONNX Runtime's values of ``tensors`` for ``inputs`` (in ONNX's own dtypes), graph inputs included."""
    graph_inputs = {i.name for i in base.graph.input}
    asked = [t for t in dict.fromkeys(tensors) if t and t not in graph_inputs]
    runtime = OnnxRuntimeModel(write_copy(base, onnx_path, asked, folder))
    feeds = runtime.feeds(inputs)
    try:
        values = runtime.session.run(asked, feeds)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own types
        raise ModelError(onnx_path, f"ONNX Runtime could not record the swept nodes' tensors ({exc})",
                         "run the model with ONNX Runtime to check it") from None
    found = dict(feeds)
    found.update((name, np.asarray(value)) for name, value in zip(asked, values))
    return found


def select(graph: Graph, mode: str, trace, failing: str | None) -> list[Node]:
    """The nodes to sweep.  ``all``: every node.  ``flagged``: every node the localisation judged out of
    tolerance, and every node from the one it blamed (or the first out of tolerance) to the failing output:
    the localisation probes only some tensors between them, and the broken node may be one it did not probe."""
    if mode == "all":
        return list(graph.nodes)
    chosen: set[int] = set()
    layers = list(getattr(trace, "layers", None) or [])
    chosen.update(layer.node_index for layer in layers if layer.failed and getattr(layer, "node_index", -1) >= 0)
    blamed = getattr(trace, "blamed", None)
    start = blamed.node_index if blamed is not None else min(chosen, default=None)
    if failing is not None and failing in graph.producer:
        end = graph.producer[failing]
        chosen.add(end)
        if start is not None:
            between = set(_descendants(graph, start)) & set(_ancestors(graph, end))
            chosen.update(between | {start})
    return [graph.nodes[i] for i in sorted(chosen)]


def _ancestors(graph: Graph, index: int) -> list[int]:
    seen, stack = {index}, [index]
    while stack:
        for t in graph.nodes[stack.pop()].inputs:
            producer = graph.producer.get(t)
            if producer is not None and producer not in seen:
                seen.add(producer)
                stack.append(producer)
    return sorted(seen)


def _descendants(graph: Graph, index: int) -> list[int]:
    consumers: dict[str, list[int]] = {}
    for node in graph.nodes:
        for t in node.inputs:
            consumers.setdefault(t, []).append(node.index)
    seen, stack = {index}, [index]
    while stack:
        for t in graph.nodes[stack.pop()].outputs:
            for consumer in consumers.get(t, ()):
                if consumer not in seen:
                    seen.add(consumer)
                    stack.append(consumer)
    return sorted(seen)


def sweep_onnx(onnx_path: Path, flags: Sequence[str], cache: OnnxCutCache, config: RunConfig,
               inputs: Mapping[str, np.ndarray], tol: Tolerance, mode: str, trace, failing: str | None,
               input_shapes: Mapping[str, tuple[int, ...]], layer_tolerances: Mapping[str, Tolerance] | None = None,
               method_note: str = "") -> OnnxSweep:
    """Run ONNX nodes alone (``select``) on ``config``, fed and judged with ONNX Runtime's tensors of them."""
    import onnx  # noqa: PLC0415

    layer_tolerances = dict(layer_tolerances or {})
    base = onnx.load(str(onnx_path))
    graph = graph_from_onnx(base)
    live = live_tensors(base)
    failing = failing if failing is not None else (base.graph.output[0].name if base.graph.output else None)
    nodes = select(graph, mode, trace, failing)
    blamed = getattr(trace, "blamed", None)
    result = SweepResult(mode, method=METHOD + (f"; {method_note}" if method_note else ""),
                         trace_blamed="" if blamed is None else blamed.name)
    # What the localisation already compared in the graph; one more probe compares the rest of the swept tensors.
    judged: dict[str, TensorJudgement] = {layer.tensor: layer.outputs[0]
                                          for layer in getattr(trace, "layers", None) or [] if layer.outputs}
    comparable = set(graph.candidates)
    wanted = [t for node in nodes for t in (*node.outputs, *node.inputs) if t in comparable and t not in judged]
    if wanted and failing is not None:
        prober = Prober(onnx_path, flags, cache.conversions, config, inputs, tol, input_shapes, failing)
        prober.layer_tolerances = layer_tolerances
        prober.node_of = {tensor: graph.nodes[index].name for tensor, index in graph.producer.items()}
        judged.update({t: j for t, j in prober(list(dict.fromkeys(wanted))).items() if j is not None})
    recorded = record(Path(onnx_path), base, [t for node in nodes for t in (*node.inputs, *node.outputs)], inputs,
                      cache.folder / "recorded")
    protos = list(base.graph.node)
    before = cache.made
    found = OnnxSweep(result, graph, judged)
    for node in nodes:
        layer = _layer(node, judged, live, graph)
        row = SweepRow(node.name, node.op_type, 0, config.backend, config.precision, NOT_CUT,
                       in_graph=None if layer is None else in_graph_of(layer))
        cut = cache.cut(base, protos[node.index], recorded, live, flags)
        row = _run(cache, cut, row, recorded, config, layer_tolerances.get(node.name, tol), layer)
        if row.verdict == "broken":
            found.proofs[node.name] = (cut, {k: as_mnn_dtype(np.asarray(recorded[t])) for k, t in cut.inputs.items()},
                                       {k: as_mnn_dtype(np.asarray(recorded[t])) for k, t in cut.outputs.items()})
        result.rows.append(row)
    result.cuts = cache.made - before
    return found


def _layer(node: Node, judged: Mapping[str, TensorJudgement], live: set[str], graph: Graph) -> LayerRecord | None:
    """How ``node`` fared in the graph, from the judged tensors; None when none of its outputs was compared."""
    outputs = [replace(judged[t], index=i) for i, t in enumerate(node.outputs) if t in judged]
    if not outputs:
        return None
    # An input the probes could not compare counts as within tolerance: the graph inputs are exact, and the
    # rest is said by the row's in-graph numbers.
    ins = [replace(judged[t], index=i) for i, t in enumerate(node.inputs) if t in live and t in judged]
    return LayerRecord(node.index, node.name, node.op_type, 0, outputs, ins)


def _run(cache: OnnxCutCache, cut: NodeCut, row: SweepRow, recorded: Mapping[str, np.ndarray], config: RunConfig,
         tol: Tolerance, layer: LayerRecord | None) -> SweepRow:
    if cut.mnn is None:
        row.reason = cut.reason
        return row
    row.cut = "cached" if cut.cached else CUT
    feeds = {k: as_mnn_dtype(np.asarray(recorded[t])) for k, t in cut.inputs.items()}
    try:
        model = cache.model(cut)
        names = {spec.name for spec in model.info.inputs}
        if names != set(feeds):
            row.reason = (f"the converter changed the node's inputs ({sorted(names)} where the cut has "
                          f"{sorted(feeds)})")
            return row
    except ModelError as exc:
        row.reason = f"MNN could not run the node alone: {exc.reason}"
        return row
    run = run_cut(model, config, feeds, "node")
    if isinstance(run, str):
        row.reason = run
        return row
    pairs = [(run.outputs[k], as_mnn_dtype(np.asarray(recorded[t]))) for k, t in cut.outputs.items()
             if k in run.outputs]
    return conclude(row, pairs, tol, layer)

