"""The isolated worker's protocol: one JSON line per message, both ways (``engine.py`` <-> ``worker.py``).

The parent sends a ``CheckRequest`` (``request_to_wire``) with what only the
parent knows (backend status, measured arithmetic, per-model declarations);
the worker sends back the ``ParityResult``, rebuilt into the same dataclasses
(``result_from_wire``), so the plugin (messages, report records, JUnit
properties) cannot tell an isolated result from an in-process one.  NaN and
Inf travel as JSON's ``NaN``/``Infinity`` extension, which Python reads back;
this channel never leaves the machine, the report still goes through
``core.files.json_safe``.

Everything ``ParityEngine.check_request`` takes travels, so an isolated item is judged exactly as it
would be in-process:

* a named input set (``input_sets.InputSet``) goes as a pickle in a temporary
  file, written once per set: it may hold arrays (a search's found inputs), and
  arrays never travel on the JSON lines.  The worker reads each file once.
  Pickling, not the sidecar's path, because a set is more than its file (one
  built from arrays has none) and the worker must see the very set the parent
  read, its recorded error included;
* the model's sidecar, the same way, for the worker to check against the model
  (``sidecar_problem``): the parent must not load a model it isolates;
* per-output and per-layer tolerance layers, and the API, as JSON;
* what the parent's engine was told about the model alone (``declarations``):
  a sidecar's ``[shapes]`` and ``[stream]``;
* ``--mnn-save-outputs``: where and under which ids the worker saves the
  outputs itself (``bundle_saver``), as they exist only there;
* the picture writer's folder name for the item (``artifact_label``).

A worker on another machine (``launch.OverSsh``) sees none of this machine's
files: before a check, each file the message names (the model, the pickled
input set, reference and sidecar) that this worker does not hold yet goes ahead
of it as a ``put`` line, its bytes base64 in the JSON (``put_messages``); the
worker keeps them in a folder of its own and reads the message's paths as its
copies (``localise``).

A result that comes back without an answer (``crashed``/``timeout``) gets
the labels an in-process result would have (``fault_labels``).
"""
from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from ..core.metrics import OutputMetrics
from ..core.quickcompare import QuickMetrics
from ..core.tolerances import Tolerance
from ..core.verdict import Category, OutputVerdict, Verdict
from ..engine.request import CheckRequest
from ..engine.results import ParityResult, ParitySettings
from ..inputs.stream_spec import StreamSpec, spec_for, stream_input_label
from ..mnn.arithmetic import Arithmetic
from ..mnn.model import ModelError
from ..mnn.runner import RunConfig
from ..mnn.weights import WeightRisk
from ..onnx.variants import is_onnx
from ..trace.record import ActivationRisk, LayerRecord, TensorJudgement, TraceResult
from ..trace.sweep import SweepResult

if TYPE_CHECKING:  # pragma: no cover
    from ..engine.engine import ParityEngine  # annotations: a run whose checks all run in workers never imports it (issue 22)


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


# -- the request -------------------------------------------------------------------------

def request_to_wire(request: CheckRequest, files: PickleFiles) -> dict[str, Any]:
    """Every field of the request: JSON, except input sets, which go as pickled files (``PickleFiles``)."""
    return {"model": os.fspath(request.model), "config": config_to_wire(request.config),
            "tolerance_layers": layers_to_wire(request.tolerance_layers), "reproduce": request.reproduce,
            "variant": request.variant, "input_set": files.to_wire(request.input_set),
            "output_tolerances": per_name_to_wire(request.output_tolerances),
            "layer_tolerances": per_name_to_wire(request.layer_tolerances), "api": request.api}


def request_from_wire(data: Mapping[str, Any], files: dict[str, Any]) -> CheckRequest:
    """The worker's side of ``request_to_wire``; ``files`` caches the pickled objects already read."""
    return CheckRequest(data["model"], config_from_wire(data["config"]), layers_from_wire(data["tolerance_layers"]),
                        data["reproduce"], data["variant"], from_wire(data["input_set"], files),
                        per_name_from_wire(data["output_tolerances"]), per_name_from_wire(data["layer_tolerances"]),
                        data["api"])


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
    data["op_sweep"] = SweepResult.from_dict(data.get("op_sweep"))
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
    tol["overridden"] = tuple(tol.get("overridden", ()))
    return Tolerance(**tol)


def _verdict(data: dict[str, Any]) -> Verdict:
    outputs = [OutputVerdict(o["name"], Category(o["category"]), _metrics(o.get("metrics")), o.get("detail", ""),
                             _metrics(o.get("stale_metrics")), _tolerance(o.get("tolerance")),
                             o.get("decided_by", ""), o.get("failing_set", ""), o.get("reference_note", ""))
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
        return TraceResult(*common, not_observable=dict(data.get("not_observable") or {}),
                           proven=data.get("proven", ""))
    blamed = next((layer for layer in layers if layer.index == data.get("blamed_index")), None)
    return OnnxTraceResult(*common, blamed=blamed, candidates=data.get("candidates", 0), probes=data.get("probes", 0),
                           notes=list(data.get("notes", [])))


Layers = Sequence[tuple[str, Mapping[str, Any] | None]]


def layers_to_wire(layers: Layers) -> list[list[Any]]:
    return [[source, dict(values) if values else None] for source, values in layers]


def layers_from_wire(data) -> list[tuple[str, Any]]:
    return [(source, values) for source, values in data or []]


def per_name_to_wire(layers: Mapping[str, Layers] | None) -> dict[str, list] | None:
    return None if layers is None else {name: layers_to_wire(value) for name, value in layers.items()}


def per_name_from_wire(data) -> dict[str, list] | None:
    return None if data is None else {name: layers_from_wire(value) for name, value in data.items()}


# -- streams and per-model declarations -------------------------------------------------

def stream_to_wire(spec: StreamSpec | None) -> dict[str, Any] | None:
    if spec is None:
        return None
    return {"state": [list(pair) for pair in spec.state], "steps": spec.steps, "model": spec.model,
            "origin": spec.origin}


def stream_from_wire(data: Mapping[str, Any] | None) -> StreamSpec | None:
    if data is None:
        return None
    return StreamSpec(tuple((o, i) for o, i in data["state"]), data["steps"], data.get("model"),
                      data.get("origin", "--mnn-stream"))


def declarations(engine: ParityEngine | None, model_path: os.PathLike | str) -> dict[str, Any]:
    """What ``engine`` was told about this model alone (``set_input_shapes``, ``streams.declare``)."""
    if engine is None:
        return {}
    shapes = engine.declared_shapes(model_path)
    stream = engine.streams.declared(model_path)
    return {"shapes": None if shapes is None else [{k: list(v) for k, v in shapes[0].items()}, shapes[1]],
            "stream": stream_to_wire(stream)}


def apply_declarations(engine: ParityEngine, model_path: str, data: Mapping[str, Any] | None) -> None:
    data = data or {}
    if data.get("shapes") is not None:
        shapes, source = data["shapes"]
        engine.set_input_shapes(model_path, {k: tuple(v) for k, v in shapes.items()}, source)
    stream = stream_from_wire(data.get("stream"))
    if stream is not None:
        engine.streams.declare(model_path, stream)


# -- input sets ------------------------------------------------------------------------

class _Pickler(pickle.Pickler):
    def reducer_override(self, obj):
        # A set keeps the SidecarError found when its sidecar was read; exceptions with their own
        # __init__ signature (ModelError's) do not unpickle by default: rebuild them field by field.
        if isinstance(obj, BaseException):
            return _rebuild_exception, (type(obj), obj.args, dict(obj.__dict__))
        return NotImplemented


def _rebuild_exception(cls, args, state):
    exc = cls.__new__(cls)
    exc.args = args
    exc.__dict__.update(state)
    return exc


class PickleFiles:
    """The parent's side: each object (an input set, a sidecar) pickled once into a private temporary folder."""

    def __init__(self):
        self._folder: Path | None = None
        self._written: dict[int, tuple[Any, str]] = {}  # id -> (the object, kept alive so the id stays its own; file)

    def file_of(self, obj) -> str:
        known = self._written.get(id(obj))
        if known is None:
            if self._folder is None:
                self._folder = Path(tempfile.mkdtemp(prefix="mnn-parity-wire-"))
            path = self._folder / f"{type(obj).__name__.lower()}-{len(self._written)}.pickle"
            buffer = io.BytesIO()
            _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
            path.write_bytes(buffer.getvalue())
            known = self._written[id(obj)] = (obj, str(path))
        return known[1]

    def to_wire(self, obj) -> dict[str, str] | None:
        if obj is None:
            return None
        return {"name": getattr(obj, "name", ""), "file": self.file_of(obj)}

    def close(self) -> None:
        self._written.clear()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None


def from_wire(data: Mapping[str, str] | None, cache: dict[str, Any]):
    """The worker's side: the object the parent wrote (read once per file)."""
    if data is None:
        return None
    if data["file"] not in cache:
        with open(data["file"], "rb") as f:
            cache[data["file"]] = pickle.load(f)  # noqa: S301 - our own parent's file, in its private folder
    return cache[data["file"]]


# -- files for a worker that cannot see ours --------------------------------------------

def _file_fields(message: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    """(container, key) of every path of this machine that a check message names."""
    fields: list[tuple[dict[str, Any], str]] = []
    request = message.get("request")
    if isinstance(request, dict):
        fields.append((request, "model"))
        if request.get("input_set"):
            fields.append((request["input_set"], "file"))
    for key in ("reference", "sidecar"):
        if message.get(key):
            fields.append((message[key], "file"))
    return fields


def put_messages(message: dict[str, Any], held: set[str]) -> list[dict[str, Any]]:
    """``put`` lines for the files ``message`` names that the worker does not hold yet (``held``, updated)."""
    puts = []
    for container, key in _file_fields(message):
        path = container[key]
        if path not in held:
            data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
            puts.append({"op": "put", "path": path, "data": data})
            held.add(path)
    return puts


def store_put(message: Mapping[str, Any], folder: Path, paths: dict[str, str]) -> None:
    """The worker's side of a ``put``: the file under ``folder``, by its original name (MNN and the reports
    name a model by it), remembered under the parent's path."""
    target = folder / str(len(paths)) / Path(message["path"]).name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(base64.b64decode(message["data"]))
    paths[message["path"]] = str(target)


def localise(message: dict[str, Any], paths: Mapping[str, str]) -> None:
    """The parent's paths in ``message`` replaced by this worker's copies, where it has them."""
    for container, key in _file_fields(message):
        container[key] = paths.get(container[key], container[key])


def sidecar_problem(engine: ParityEngine, model_path: str, variant: str | None, sidecar) -> ModelError | None:
    """In the worker, what ``input_items.SidecarSupport`` checks in-process: the sidecar against the model."""
    try:
        path = engine.onnx.converted(model_path, variant or "fp32")[0] if is_onnx(model_path) else model_path
        model = engine.model(path)
    except ModelError:
        return None  # the check itself says why the model cannot load
    try:
        sidecar.check_model(model, Path(model_path).name,
                            engine.layer_names(model_path) if sidecar.layer_tolerances else None)
    except ModelError as exc:
        return exc
    return None


# -- labels of a result without an answer ----------------------------------------------

def fault_labels(settings: ParitySettings, model_path: os.PathLike | str, input_set, api: str | None,
                 declared: Mapping[str, Any] | None) -> dict[str, Any]:
    """input_set and api fields of a crashed/timeout result, as the in-process result would have them."""
    if input_set is not None:
        set_label = input_set.name
    else:
        stream = spec_for(settings.streams, model_path) or stream_from_wire((declared or {}).get("stream"))
        set_label = (stream_input_label(stream, settings.seed) if stream is not None
                     else f"seeded:{settings.seed}")
    labels: dict[str, Any] = {"input_set": set_label}
    mode = api or settings.api
    if mode in ("session", "module"):  # as apis.ApiSide.resolve words it; auto is decided in the worker
        axis = settings.api == "both"
        labels.update(api=mode, api_axis=axis,
                      api_reason="--mnn-api both: this item's API" if axis else f"--mnn-api {mode}")
    return labels
