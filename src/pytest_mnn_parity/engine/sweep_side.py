"""The engine's op sweep (``--mnn-op-sweep``) and repro bundles (``--mnn-repro``), after a check's trace.

The sweep runs each flagged op (or every op) of the tested ``.mnn`` alone on the item's configuration, fed
the reference's recorded inputs of that op (``trace.sweep``); for an item judged against ONNX Runtime, each
flagged ONNX node cut from the ONNX model and converted alone, fed ONNX Runtime's inputs of it (``onnx.sweep``).  When it proves an op broken, that op replaces
the trace's guess as the item's first divergent layer (message, JSON report, pictures, HTML); the guess is
kept in the sweep's record with what the sweep found it to be.
"""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, Mapping

from ..core.tolerances import Tolerance
from ..mnn.runner import LoadedModel, RunConfig
from ..trace.record import TraceResult, layer_key
from ..trace.sweep import CutCache, SweepResult, sweep

if TYPE_CHECKING:  # pragma: no cover
    from .results import ParityResult


class SweepSide:
    def __init__(self, engine):
        self.engine = engine
        self._cache: CutCache | None = None
        self._onnx_cache = None
        # Per item (by id, until its repro bundle is written): the broken ONNX nodes' cuts, inputs and outputs.
        self.onnx_proofs: dict[int, dict] = {}

    @property
    def cache(self) -> CutCache:
        if self._cache is None:
            self._cache = CutCache()
        return self._cache

    def after_check(self, result: "ParityResult", model: LoadedModel, config: RunConfig, tol: Tolerance,
                    inputs: Mapping[str, Any], input_set, layer_tolerances: Mapping[str, Tolerance] | None,
                    reproduce: str) -> None:
        settings = self.engine.settings
        if settings.op_sweep != "off" and (not result.passed or settings.op_sweep == "all"):
            try:
                result.op_sweep = self._sweep(result, model, config, tol, inputs, input_set, layer_tolerances)
            except Exception as exc:  # noqa: BLE001 - the sweep explains a verdict; it must never cost the item it
                result.op_sweep = SweepResult(settings.op_sweep, note=(
                    f"not swept: the sweep failed ({type(exc).__name__}: {exc}); the item's verdict stands"))
        if settings.repro and not result.passed:
            from .repro import write_repro  # noqa: PLC0415 - only with --mnn-repro

            write_repro(self, result, model, config, tol, inputs, input_set, reproduce)
        self.onnx_proofs.pop(id(result), None)  # kept for the bundle only: ids are reused once results go

    @property
    def onnx_cache(self):
        if self._onnx_cache is None:
            from ..onnx.sweep import OnnxCutCache  # noqa: PLC0415 - imports onnx

            self._onnx_cache = OnnxCutCache(self.engine.onnx.cache)
        return self._onnx_cache

    def _sweep_onnx(self, result, model, config, tol, inputs, layer_tolerances) -> SweepResult:
        """Each ONNX node alone, cut from the reference ONNX model (``onnx.sweep``); a node proven broken replaces
        the localisation's blame, and the tensors the sweep compared in the graph join its layer table."""
        from ..onnx.localise import OnnxLayerRecord, OnnxTraceResult  # noqa: PLC0415
        from ..onnx.sweep import sweep_onnx  # noqa: PLC0415

        engine = self.engine
        failing = next((v.name for v in result.verdict.outputs if not v.passed), None) if result.verdict else None
        if result.trace is None and failing is not None:
            engine.onnx.localise(result, model, config, tol, inputs, layer_tolerances)
        trace = result.trace if isinstance(result.trace, OnnxTraceResult) else None
        flags, note = engine.onnx.probe_flags(model)
        shapes = dict(getattr(model, "shapes", None) or engine.settings.input_shapes)
        found = sweep_onnx(engine.onnx.reference_path(model), flags, self.onnx_cache, config, inputs, tol,
                           engine.settings.op_sweep, trace, failing, shapes, layer_tolerances,
                           method_note="without variant flags: this .mnn was not converted by this run" if note
                           else "")
        swept, graph = found.result, found.graph
        if note and swept.culprit is None:
            # Converted without the flags the .mnn was made with, a node right alone proves nothing about it.
            swept.note = (f"not proven: {swept.conclusion()}; but this .mnn was not converted by this run, so each "
                          f"node was converted without variant flags: sweep the ONNX file itself with --mnn-model "
                          f"{engine.onnx.reference_path(model)} --mnn-convert <variant>")
        if found.proofs:
            self.onnx_proofs[id(result)] = found.proofs
        culprit = swept.culprit
        if trace is not None:
            known = {layer.tensor for layer in trace.layers}
            for tensor, judgement in found.judged.items():
                if tensor not in known and tensor in graph.producer:
                    node = graph.nodes[graph.producer[tensor]]
                    trace.layers.append(OnnxLayerRecord(0, node.name, node.op_type, 0,
                                                        [replace(judgement, index=node.outputs.index(tensor))],
                                                        [], tensor=tensor, node_index=node.index))
            trace.layers.sort(key=lambda layer: (layer.node_index, graph.nodes[layer.node_index].outputs.index(
                layer.tensor) if layer.tensor in graph.nodes[layer.node_index].outputs else 0))
            for index, layer in enumerate(trace.layers):
                layer.index = index
            if culprit is not None:
                proven = next((layer for layer in trace.layers if layer.name == culprit.op), None)
                if proven is not None:
                    trace.proven = layer_key(proven.name, proven.occurrence)
                    result.first_divergent_layer = dict(proven.as_dict(), proven_by="op sweep",
                                                        trace_guess=swept.trace_blamed)
        return swept

    def session_model(self, model: LoadedModel) -> LoadedModel | None:
        if getattr(model, "api", "session") == "session":
            return model
        return self.engine.apis.session_for_trace(model.path)

    def _sweep(self, result, model, config, tol, inputs, input_set, layer_tolerances) -> SweepResult:
        engine = self.engine
        if engine.onnx.reference_path(model) is not None:
            return self._sweep_onnx(result, model, config, tol, inputs, layer_tolerances)
        if engine.bundle is not None:
            return SweepResult(engine.settings.op_sweep, note=(
                "not swept: the reference is a saved bundle, which keeps no per-op input tensors"))
        session = self.session_model(model)
        if session is None:
            return SweepResult(engine.settings.op_sweep, note="not swept: no session API run of this model to cut "
                                                              "ops from (the Module API has no per-op callbacks)")
        reference = engine.reference_trace(session, inputs, input_set)
        trace = result.trace if isinstance(result.trace, TraceResult) else None
        if trace is None:
            # --mnn-op-sweep all on a passing item (or --mnn-layers off): the in-graph column needs the trace.
            from ..trace.compare import trace_target  # noqa: PLC0415 - a worker imports this module at start-up

            trace = trace_target(reference, session, config, inputs, tol, layer_tolerances)
        self.cache.declare_inputs(session.path, session.shapes)
        swept = sweep(self.cache, session.path, reference, trace, config, tol, engine.settings.op_sweep,
                      layer_tolerances)
        culprit = swept.culprit
        if culprit is not None and result.trace is not None:
            proven = next((layer for layer in result.trace.layers
                           if layer_key(layer.name, layer.occurrence) == layer_key(culprit.op, culprit.occurrence)),
                          None)
            if proven is not None:
                result.trace.proven = layer_key(proven.name, proven.occurrence)
                result.first_divergent_layer = dict(proven.as_dict(), proven_by="op sweep",
                                                    trace_guess=swept.trace_blamed)
        return swept
