"""Which ONNX node is the first to diverge, when MNN is compared against ONNX Runtime.

MNN's own per-op tensors cannot be paired with ONNX tensors by name: the
converter fuses (Conv+Relu keeps the Conv's name but holds post-Relu values),
renames and inserts ops.  So a tensor is only compared when it is *proven* to
mean the same thing on both sides: ONNX Runtime computes it as an extra graph
output of a copy of the ONNX model, and MNN computes it as a graph output of a
re-conversion of that same copy (the converter keeps a graph output's tensor,
and does not fuse the op that produces it into the next one).

Each probe costs a conversion, so the candidates (node outputs that depend on
the inputs, in topological order, ancestors of the failing output) are
searched k-ary: each probe asks for a few evenly spaced tensors between the
last tensor known good and the first known bad.  The node found is only blamed
after its own inputs are checked: if one of them diverged too (branches make
the topological order only approximately monotone), the search continues
upstream of that input.  A node is blamed only when it diverged and every input
of it that could be compared was within tolerance.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..core.metrics import compare
from ..core.tolerances import Tolerance
from ..core.verdict import fails_tolerance
from ..mnn.model import ModelError
from ..mnn.runner import LoadedModel, RunConfig
from ..trace.record import LayerRecord, TensorJudgement, TraceResult, health_flags
from .convert import ConversionError

PER_PROBE = 8  # tensors asked for per probe conversion
MAX_PROBES = 24
METHOD = "ONNX Runtime intermediate outputs vs MNN re-converted with the same tensors kept as graph outputs"
_FLOAT_TYPES = {1, 10, 11, 16}  # onnx.TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16


@dataclass(frozen=True)
class Node:
    index: int
    name: str
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass
class Graph:
    """The dataflow of an ONNX graph, reduced to what the search needs."""

    nodes: list[Node]
    producer: dict[str, int]
    candidates: list[str]  # comparable tensors, in topological order

    def ancestors(self, tensor: str) -> list[str]:
        """Candidate tensors ``tensor`` depends on, in topological order (``tensor`` excluded)."""
        rank = {t: i for i, t in enumerate(self.candidates)}
        seen, stack = set(), [tensor]
        while stack:
            node = self.producer.get(stack.pop())
            if node is None:
                continue
            for t in self.nodes[node].inputs:
                if t and t not in seen and t in self.producer:
                    seen.add(t)
                    stack.append(t)
        return sorted((t for t in seen if t in rank), key=rank.__getitem__)

    def dynamic_inputs(self, node: Node) -> list[str]:
        comparable = set(self.candidates)
        return [t for t in node.inputs if t in self.producer and t in comparable]


def graph_from_onnx(model) -> Graph:
    """Nodes in file order (ONNX requires topological order); candidates are the float
    outputs of nodes that depend on a graph input (constant subgraphs are folded by both sides)."""
    import onnx  # noqa: PLC0415

    g = model.graph
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph
        types = {v.name: v.type.tensor_type.elem_type for v in list(inferred.value_info) + list(inferred.output)}
    except Exception:  # noqa: BLE001 - inference is only a filter; unknown types stay candidates
        types = {}
    initializers = {t.name for t in g.initializer}
    dynamic = {i.name for i in g.input if i.name not in initializers}
    nodes, producer, candidates = [], {}, []
    for index, proto in enumerate(g.node):
        node = Node(index, proto.name or proto.output[0], proto.op_type, tuple(proto.input), tuple(proto.output))
        nodes.append(node)
        live = any(t in dynamic for t in node.inputs)
        for out in node.outputs:
            if not out:
                continue
            producer[out] = index
            if live:
                dynamic.add(out)
                if types.get(out, 0) in _FLOAT_TYPES or types.get(out, 0) == 0:
                    candidates.append(out)
    return Graph(nodes, producer, candidates)


def node_names(onnx_path) -> list[str]:
    """The graph's node names as the layer table names them (a node without a name: its first output)."""
    import onnx  # noqa: PLC0415

    model = onnx.load(str(onnx_path), load_external_data=False)
    return list(dict.fromkeys(proto.name or proto.output[0] for proto in model.graph.node))


Probe = Callable[[Sequence[str]], Mapping[str, "TensorJudgement | None"]]


def diverged(judgement: TensorJudgement | None) -> bool | None:
    return None if judgement is None or judgement.metrics is None else bool(judgement.failed or judgement.health)


def evenly(items: Sequence[int], k: int) -> list[int]:
    """Up to ``k`` items spread evenly over ``items`` (all of them when there are few)."""
    if len(items) <= k:
        return list(items)
    n = len(items)
    return [items[i] for i in sorted({min(n - 1, (j + 1) * n // (k + 1)) for j in range(k)})]


@dataclass
class SearchOutcome:
    blamed: Node | None
    judged: dict[str, TensorJudgement | None]
    probes: int
    notes: list[str] = field(default_factory=list)


def search(graph: Graph, failing: str, probe: Probe, per_probe: int = PER_PROBE,
           max_probes: int = MAX_PROBES) -> SearchOutcome:
    """Find a node that diverged while every comparable input of it was within tolerance.

    ``probe(tensors)`` judges tensors (``None``: not comparable) and also judges
    ``failing``: if a probe model does not reproduce the failure, nothing it says
    explains it, and the search stops without blame.
    """
    return _Search(graph, failing, probe, per_probe, max_probes).run()


class _NotReproduced(Exception):
    pass


class _Search:
    def __init__(self, graph: Graph, failing: str, probe: Probe, per_probe: int, max_probes: int):
        self.graph, self.failing, self.probe = graph, failing, probe
        self.per_probe, self.max_probes = per_probe, max_probes
        self.judged: dict[str, TensorJudgement | None] = {}
        self.known: dict[str, bool | None] = {failing: True}
        self.probes = 0
        self.notes: list[str] = []

    def ask(self, tensors: list[str]) -> bool:
        if self.probes >= self.max_probes:
            return False
        self.probes += 1
        for tensor, judgement in self.probe(tensors).items():
            self.judged[tensor] = judgement
            if tensor != self.failing or tensor in tensors:
                self.known[tensor] = diverged(judgement)
        for tensor in tensors:
            self.known.setdefault(tensor, None)
        if diverged(self.judged.get(self.failing)) is False:
            raise _NotReproduced
        return True

    def run(self) -> SearchOutcome:
        try:
            node = self._blame()
            if node is not None and not any(self.judged.get(t) for t in node.outputs):
                self.ask([])  # blamed without a probe (nothing between it and the inputs): measure it
        except _NotReproduced:
            self.notes.append(
                f"no blame: with the probed tensors kept as outputs, {self.failing!r} no longer fails, so the "
                "probes cannot show what went wrong (a converter fusion across them matters, or the .mnn was "
                "made with other flags)")
            node = None
        return SearchOutcome(node, self.judged, self.probes, self.notes)

    def _blame(self) -> Node | None:
        graph, known, current = self.graph, self.known, self.failing
        while True:
            seq = graph.ancestors(current) + [current]
            lo, hi = -1, len(seq) - 1
            while True:
                hi = next((i for i in range(lo + 1, hi) if known.get(seq[i]) is True), hi)
                lo = next((i for i in range(hi - 1, lo, -1) if known.get(seq[i]) is False), lo)
                open_ = [i for i in range(lo + 1, hi) if seq[i] not in known]
                if not open_:
                    break
                if not self.ask([seq[i] for i in evenly(open_, self.per_probe)]):
                    self.notes.append(f"stopped after {self.max_probes} probe conversions; "
                                      "the blame is the best found so far")
                    break
            if seq[hi] not in graph.producer:
                self.notes.append(f"{seq[hi]!r} is not produced by a node")
                return None
            node = graph.nodes[graph.producer[seq[hi]]]
            inputs = graph.dynamic_inputs(node)
            unknown = [t for t in inputs if t not in known]
            if unknown:
                self.ask(unknown)
            bad = [t for t in inputs if known.get(t) is True]
            if not bad:
                unverified = [t for t in inputs if known.get(t) is None]
                if unverified:
                    self.notes.append(f"input(s) {', '.join(unverified)} of {node.name} could not be compared")
                return node
            current = min(bad, key=lambda t: graph.producer[t])


class Prober:
    """Judges ONNX tensors: ORT on an edited copy vs MNN on a conversion of that copy."""

    def __init__(self, onnx_path: Path, flags: Sequence[str], cache, config: RunConfig,
                 inputs: Mapping[str, np.ndarray], tol: Tolerance, input_shapes: Mapping[str, tuple[int, ...]],
                 failing: str):
        import onnx  # noqa: PLC0415

        self.onnx_path = Path(onnx_path)
        self.base = onnx.load(str(self.onnx_path), load_external_data=False)
        self.flags, self.cache, self.config = tuple(flags), cache, config
        self.inputs, self.tol, self.input_shapes, self.failing = inputs, tol, input_shapes, failing
        self.unmatched: list[str] = []
        self.errors: list[str] = []
        # A sidecar's [tolerance.layers.NODE], by the name of the node that produces each tensor.
        self.layer_tolerances: Mapping[str, Tolerance] = {}
        self.node_of: dict[str, str] = {}

    def __call__(self, tensors: Sequence[str]) -> dict[str, TensorJudgement | None]:
        from .runtime import OnnxRuntimeModel  # noqa: PLC0415

        path = self._write_copy(tensors)
        wanted = list(dict.fromkeys([*tensors, self.failing]))
        try:
            mnn_path = self.cache.convert_with(path, self.flags, "probe")
            reference = OnnxRuntimeModel(path).run(self.inputs, wanted)
            model = LoadedModel(mnn_path, self.input_shapes)
        except (ConversionError, ModelError) as exc:
            self.errors.append(str(exc).splitlines()[0])
            return {t: None for t in tensors}
        try:
            run = model.run(self.config, self.inputs)
        finally:
            model.close()
        if not run.ok:
            self.errors.append(f"probe run failed: runSession returned {run.rc}")
            return {t: None for t in tensors}
        return {t: self._judge(t, run.outputs.get(t), reference[t]) for t in wanted}

    def _judge(self, tensor: str, target: np.ndarray | None, ref: np.ndarray) -> TensorJudgement | None:
        if target is None or target.shape != ref.shape or target.size == 0:
            if tensor not in self.unmatched:
                self.unmatched.append(tensor)
            return None
        tol = self.layer_tolerances.get(self.node_of.get(tensor, ""), self.tol)
        m = compare(target, ref, atol=tol.atol, rtol=tol.rtol)
        failed = fails_tolerance(m, tol)
        return TensorJudgement(0, m, failed, health_flags(target, ref, m, tol) if failed else [])

    def _write_copy(self, tensors: Sequence[str]) -> Path:
        return write_copy(self.base, self.onnx_path, tensors, Path(self.cache.folder) / "probes")


def write_copy(base, onnx_path: Path, tensors: Sequence[str], folder: Path) -> Path:
    """A copy of ``base`` (the model of ``onnx_path``) with ``tensors`` added as graph outputs, in ``folder``, named
    by its content (written once); its external-data files are linked beside it."""
    import onnx  # noqa: PLC0415
    from onnx import helper  # noqa: PLC0415

    onnx_path = Path(onnx_path)
    copy = onnx.ModelProto()
    copy.CopyFrom(base)
    present = {o.name for o in copy.graph.output}
    for tensor in tensors:
        if tensor not in present:
            copy.graph.output.append(helper.make_empty_tensor_value_info(tensor))
    data = copy.SerializeToString()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{onnx_path.stem}.{hashlib.sha256(data).hexdigest()[:24]}.onnx"
    if not path.is_file():
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    from .variants import external_data_files  # noqa: PLC0415

    for external in external_data_files(onnx_path):  # the copy refers to them by relative path
        link = folder / external.relative_to(onnx_path.parent)
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(external.resolve())
    return path


@dataclass
class OnnxLayerRecord(LayerRecord):
    tensor: str = ""
    node_index: int = -1

    def as_dict(self, with_inputs: bool = True) -> dict[str, Any]:
        data = super().as_dict(with_inputs)
        data.update(tensor=self.tensor, onnx_node_index=self.node_index)
        return data


@dataclass
class OnnxTraceResult(TraceResult):
    blamed: OnnxLayerRecord | None = None
    candidates: int = 0
    probes: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def first_divergent(self) -> LayerRecord | None:
        return self.blamed

    def summary(self) -> dict[str, Any]:
        data = super().summary()
        data.update(candidates=self.candidates, probes=self.probes, notes=list(self.notes))
        return data


def localise(onnx_path: Path, flags: Sequence[str], cache, config: RunConfig, inputs: Mapping[str, np.ndarray],
             tol: Tolerance, input_shapes: Mapping[str, tuple[int, ...]], failing: str,
             per_probe: int = PER_PROBE, layer_tolerances: Mapping[str, Tolerance] | None = None
             ) -> OnnxTraceResult:
    """Localise the divergence of output ``failing`` to an ONNX node (see the module docstring); a node named
    in ``layer_tolerances`` has its outputs judged with that tolerance."""
    prober = Prober(onnx_path, flags, cache, config, inputs, tol, input_shapes, failing)
    graph = graph_from_onnx(prober.base)
    prober.layer_tolerances = dict(layer_tolerances or {})
    prober.node_of = {tensor: graph.nodes[index].name for tensor, index in graph.producer.items()}
    outcome = search(graph, failing, prober, per_probe)
    return build_result(graph, outcome, prober)


def build_result(graph: Graph, outcome: SearchOutcome, prober: Prober) -> OnnxTraceResult:
    layers: list[OnnxLayerRecord] = []
    for tensor in sorted((t for t, j in outcome.judged.items() if j is not None and t in graph.producer),
                         key=lambda t: (graph.producer[t], graph.nodes[graph.producer[t]].outputs.index(t))):
        node = graph.nodes[graph.producer[tensor]]
        judgement = outcome.judged[tensor]
        judgement.index = node.outputs.index(tensor)
        layers.append(OnnxLayerRecord(len(layers), node.name, node.op_type, 0, [judgement], [],
                                      tensor=tensor, node_index=node.index))
    blamed = None
    if outcome.blamed is not None:
        blamed = next((layer for layer in layers if layer.node_index == outcome.blamed.index), None)
        if blamed is not None:
            blamed.inputs = [_input_judgement(i, t, outcome.judged) for i, t in enumerate(outcome.blamed.inputs)
                             if t in outcome.judged]
    notes = list(outcome.notes) + prober.errors[:3]
    method = (f"{METHOD}; search over {len(graph.candidates)} candidate tensors in topological order, "
              f"{outcome.probes} probe conversion(s)")
    return OnnxTraceResult(layers, list(prober.unmatched), [], method, blamed=blamed,
                           candidates=len(graph.candidates), probes=outcome.probes, notes=notes)


def _input_judgement(index: int, tensor: str, judged: Mapping[str, TensorJudgement | None]) -> TensorJudgement:
    j = judged[tensor]
    if j is None:
        return TensorJudgement(index, None, False, note=f"{tensor}: not comparable")
    return TensorJudgement(index, j.metrics, j.failed, list(j.health), note=tensor)
