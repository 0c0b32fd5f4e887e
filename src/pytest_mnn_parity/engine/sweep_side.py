"""The engine's op sweep (``--mnn-op-sweep``) and repro bundles (``--mnn-repro``), after a check's trace.

The sweep runs each flagged op (or every op) of the tested ``.mnn`` alone on the item's configuration, fed
the reference's recorded inputs of that op (``trace.sweep``).  When it proves an op broken, that op replaces
the trace's guess as the item's first divergent layer (message, JSON report, pictures, HTML); the guess is
kept in the sweep's record with what the sweep found it to be.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from ..core.tolerances import Tolerance
from ..mnn.runner import LoadedModel, RunConfig
from ..trace.compare import trace_target
from ..trace.record import TraceResult, layer_key
from ..trace.sweep import CutCache, SweepResult, sweep

if TYPE_CHECKING:  # pragma: no cover
    from .results import ParityResult


class SweepSide:
    def __init__(self, engine):
        self.engine = engine
        self._cache: CutCache | None = None

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

    def session_model(self, model: LoadedModel) -> LoadedModel | None:
        if getattr(model, "api", "session") == "session":
            return model
        return self.engine.apis.session_for_trace(model.path)

    def _sweep(self, result, model, config, tol, inputs, input_set, layer_tolerances) -> SweepResult:
        engine = self.engine
        if engine.onnx.reference_path(model) is not None:
            return SweepResult(engine.settings.op_sweep, note=(
                "not swept: this model is judged against ONNX Runtime, whose per-node tensors are not recorded; "
                "test its .mnn conversion against an fp32 .mnn with --mnn-reference to sweep it"))
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
