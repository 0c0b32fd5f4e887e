"""ParityResult to JSON and back, for the isolated worker protocol (``isolation.py``).

The worker sends each result as one JSON line; the parent rebuilds the same
dataclasses, so the plugin (messages, report records, JUnit properties) cannot
tell an isolated result from an in-process one.  NaN and Inf travel as JSON's
``NaN``/``Infinity`` extension, which Python reads back; this channel never
leaves the machine, the report still goes through ``report.json_safe``.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from ..core.metrics import OutputMetrics
from ..core.quickcompare import QuickMetrics
from ..core.tolerances import Tolerance
from ..core.verdict import Category, OutputVerdict, Verdict
from ..engine.results import ParityResult, ParitySettings
from ..mnn.backends import Arithmetic
from ..mnn.runner import RunConfig
from ..mnn.weights import WeightRisk
from ..trace.record import ActivationRisk, LayerRecord, TensorJudgement, TraceResult
from .wire_check import stream_from_wire, stream_to_wire


def dumps(message: dict[str, Any]) -> bytes:
    """One protocol line (JSON never contains a raw newline)."""
    return json.dumps(message, default=_default, separators=(",", ":")).encode("utf-8") + b"\n"


def loads(line: bytes) -> dict[str, Any]:
    return json.loads(line.decode("utf-8"))


def _default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"not JSON-able: {type(value).__name__}")


# -- settings -------------------------------------------------------------------------

def settings_to_wire(settings: ParitySettings) -> dict[str, Any]:
    """Every setting; the picture writer as its folder and mode (the worker builds its own, writing to the
    same folder), stream declarations as data.  Any other ``output_sink`` is a live object of the parent
    that no worker can call: refused here, so an isolated engine never drops it silently."""
    sink = settings.output_sink
    data = dataclasses.asdict(dataclasses.replace(settings, output_sink=None, streams=()))
    data["input_shapes"] = {name: list(dims) for name, dims in settings.input_shapes.items()}
    data["streams"] = [stream_to_wire(spec) for spec in settings.streams]
    if sink is not None:
        from ..report.artifacts import ArtifactWriter  # noqa: PLC0415 - pictures import Pillow

        if type(sink) is not ArtifactWriter:
            raise ValueError(f"output_sink {sink!r} cannot run in an isolated worker (a live object of this "
                             "process); only artifacts.ArtifactWriter crosses (the worker builds its own). Use "
                             "ParityEngine (in-process) for this sink, or --mnn-isolate never")
        data["output_sink"] = {"artifacts": str(sink.root), "when": sink.when}
    return data


def settings_from_wire(data: dict[str, Any]) -> ParitySettings:
    data = dict(data)
    data["input_shapes"] = {name: tuple(dims) for name, dims in data.get("input_shapes", {}).items()}
    data["streams"] = tuple(stream_from_wire(spec) for spec in data.get("streams") or ())
    sink = data.get("output_sink")
    if sink is not None:
        from ..report.artifacts import ArtifactWriter  # noqa: PLC0415

        data["output_sink"] = ArtifactWriter(sink["artifacts"], sink["when"])
    fields = {f.name: f for f in dataclasses.fields(ParitySettings)}
    for name, f in fields.items():  # JSON has no tuples: restore the tuple-valued settings
        if isinstance(f.default, tuple) and isinstance(data.get(name), list):
            data[name] = tuple(data[name])
    return ParitySettings(**{k: v for k, v in data.items() if k in fields})


def config_to_wire(config: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_wire(data: dict[str, Any]) -> RunConfig:
    return RunConfig(**data)


# -- results --------------------------------------------------------------------------

def result_to_wire(result: ParityResult) -> dict[str, Any]:
    if result.computed is not None:  # the arrays (and the loaded model) stay in the worker: bundle_saver saves them
        result = dataclasses.replace(result, computed=None)
    data = dataclasses.asdict(result)
    if result.trace is not None and type(result.trace).__name__ == "OnnxTraceResult":
        # A trace localised against ONNX (onnx_trace.py): its subclass carries the blamed node.
        data["trace"]["kind"] = "onnx"
        data["trace"]["blamed_index"] = None if result.trace.blamed is None else result.trace.blamed.index
    return data


def result_from_wire(data: dict[str, Any]) -> ParityResult:
    data = dict(data)
    data["config"] = config_from_wire(data["config"])
    data["category"] = Category(data["category"])
    data["tolerance"] = _tolerance(data.get("tolerance"))
    if data.get("verdict") is not None:
        data["verdict"] = _verdict(data["verdict"])
    if data.get("trace") is not None:
        data["trace"] = _trace(data["trace"])
    data["fp16_risks"] = [ActivationRisk(**risk) for risk in data.get("fp16_risks") or []]
    if "weight_risks" in data:
        data["weight_risks"] = [WeightRisk(**risk) for risk in data["weight_risks"] or []]
    if data.get("arithmetic") is not None:
        data["arithmetic"] = Arithmetic(**data["arithmetic"])
    known = {f.name for f in dataclasses.fields(ParityResult)}
    return ParityResult(**{k: v for k, v in data.items() if k in known})


def _metrics(data: dict[str, Any] | None) -> OutputMetrics | None:
    if data is None:
        return None
    data = dict(data)
    for key in ("shape", "ref_shape", "worst_index"):
        data[key] = tuple(data[key])
    return OutputMetrics(**data)


def _tolerance(data: dict[str, Any] | None) -> Tolerance | None:
    if data is None:
        return None
    tol = dict(data)
    tol["sources"] = tuple(tol.get("sources", ()))
    return Tolerance(**tol)


def _verdict(data: dict[str, Any]) -> Verdict:
    outputs = [OutputVerdict(o["name"], Category(o["category"]), _metrics(o.get("metrics")), o.get("detail", ""),
                             _metrics(o.get("stale_metrics")), _tolerance(o.get("tolerance")))
               for o in data.get("outputs", [])]
    return Verdict(Category(data["category"]), outputs, data.get("detail", ""))


def _judgement(data: dict[str, Any]) -> TensorJudgement:
    quick = data.get("quick")
    if quick is not None:  # a tensor the trace's quick pass proved: its bound, not full metrics
        quick = QuickMetrics(**dict(quick, shape=tuple(quick["shape"])))
    return TensorJudgement(data["index"], _metrics(data.get("metrics")), data["failed"], list(data.get("health", [])),
                           data.get("note", ""), quick)


def _trace(data: dict[str, Any]) -> TraceResult:
    onnx = data.get("kind") == "onnx"
    if onnx:
        from ..onnx.localise import OnnxLayerRecord, OnnxTraceResult  # noqa: PLC0415 - only for ONNX models

    layers = []
    for layer in data.get("layers", []):
        args = (layer["index"], layer["name"], layer["type"], layer["occurrence"],
                [_judgement(t) for t in layer.get("outputs", [])], [_judgement(t) for t in layer.get("inputs", [])])
        layers.append(OnnxLayerRecord(*args, tensor=layer.get("tensor", ""), node_index=layer.get("node_index", -1))
                      if onnx else LayerRecord(*args))
    common = (layers, list(data.get("unmatched_target", [])), list(data.get("unmatched_reference", [])),
              data.get("method", TraceResult.__dataclass_fields__["method"].default))
    if not onnx:
        return TraceResult(*common, not_observable=dict(data.get("not_observable") or {}))
    blamed = next((layer for layer in layers if layer.index == data.get("blamed_index")), None)
    return OnnxTraceResult(*common, blamed=blamed, candidates=data.get("candidates", 0), probes=data.get("probes", 0),
                           notes=list(data.get("notes", [])))
