"""What a ``check`` request carries beyond the model and the configuration (``isolation.py`` <-> ``worker.py``).

Everything ``ParityEngine.check`` takes travels, so an isolated item is
judged exactly as it would be in-process:

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

A result that comes back without an answer (``crashed``/``timeout``) gets
the labels an in-process result would have (``fault_labels``).
"""
from __future__ import annotations

import io
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..engine.engine import ParityEngine
from ..engine.results import ParitySettings
from ..inputs.stream_spec import StreamSpec, spec_for, stream_input_label
from ..mnn.model import ModelError, model_key
from ..onnx.variants import is_onnx

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
    key = model_key(model_path)
    shapes = engine._model_shapes.get(key)
    stream = engine.streams._declared.get(model_key(model_path))
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


def sidecar_problem(engine: ParityEngine, model_path: str, variant: str | None, sidecar) -> ModelError | None:
    """In the worker, what ``input_items.SidecarSupport`` checks in-process: the sidecar against the model."""
    try:
        path = engine.onnx.converted(model_path, variant or "fp32")[0] if is_onnx(model_path) else model_path
        model = engine.model(path)
    except ModelError:
        return None  # the check itself says why the model cannot load
    try:
        sidecar.check_model(model)
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
