"""What a run was told about each model alone (a sidecar's ``[shapes]`` and ``[stream]``), without an engine.

The pytest process of a run whose configurations all run in isolated workers never checks anything itself: it
reads the sidecars and sends each worker the declarations with every check (``isolation.protocol.declarations``).
Keeping them here rather than in a ``ParityEngine`` spares that process the engine's import and construction
(60-80 ms, issue 22).  The interface is the engine's own (``declared_shapes``, ``set_input_shapes``,
``streams.declare``, ``streams.declared``, ``streams.spec_for``), so either can be handed to an
``IsolatedEngine``; an engine made later (``attach``) gets every declaration, earlier and later ones.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from ..inputs.stream_spec import StreamSpec, spec_for
from ..mnn.model import model_key

if TYPE_CHECKING:  # pragma: no cover
    from .results import ParitySettings


class StreamDeclarations:
    """The streams declared per model, read as ``ParityEngine.streams`` reads them (``engine/stream.py``)."""

    def __init__(self, settings: ParitySettings):
        self.settings = settings
        self.by_model: dict[Path, StreamSpec] = {}
        self.engine: Any = None  # set by ``Declarations.attach``

    def declare(self, path: os.PathLike | str, spec: StreamSpec) -> None:
        self.by_model[model_key(path)] = spec
        if self.engine is not None:
            self.engine.streams.declare(path, spec)

    def declared(self, path: os.PathLike | str) -> StreamSpec | None:
        return self.by_model.get(model_key(path))

    def spec_for(self, path: os.PathLike | str) -> StreamSpec | None:
        declared = self.by_model.get(model_key(path)) if self.by_model else None
        return spec_for(self.settings.streams, path) or declared


class Declarations:
    """Per-model input shapes and streams, for the workers, and for an in-process engine once one is made."""

    def __init__(self, settings: ParitySettings):
        self.settings = settings
        self.shapes: dict[Path, tuple[dict[str, tuple[int, ...]], str]] = {}
        self.streams = StreamDeclarations(settings)
        self.engine: Any = None

    def set_input_shapes(self, path: os.PathLike | str, shapes: Mapping[str, tuple[int, ...]], source: str) -> None:
        self.shapes[model_key(path)] = (dict(shapes), source)
        if self.engine is not None:
            self.engine.set_input_shapes(path, shapes, source)

    def declared_shapes(self, path: os.PathLike | str) -> tuple[dict[str, tuple[int, ...]], str] | None:
        return self.shapes.get(model_key(path))

    def attach(self, engine: Any) -> None:
        """``engine`` (a ``ParityEngine`` made after some declarations) gets them all, and every later one."""
        for path, (shapes, source) in self.shapes.items():
            engine.set_input_shapes(path, shapes, source)
        for path, spec in self.streams.by_model.items():
            engine.streams.declare(path, spec)
        self.engine = self.streams.engine = engine
