"""The tensors behind a failure's pictures: the first divergent layer's and the first health flip's.

The trace keeps only metrics; when pictures are asked for (``--mnn-artifacts``),
the engine hands the picture writer a callable that runs the target once more
through ``capture_layers`` and reads the reference's tensors from its recording.
"""
from __future__ import annotations

import numpy as np

from ..mnn.runner import LoadedModel, OpObserver, RunConfig, to_numpy
from .record import LayerRecord, ReferenceTrace, TraceResult

# (role, layer, target arrays, reference arrays) per chosen layer.
LayerArrays = list[tuple[str, LayerRecord, list[np.ndarray], list[np.ndarray]]]


class _LayerCapture(OpObserver):
    """Copies the outputs of a few ops (by name and occurrence, as the trace pairs them)."""

    def __init__(self, wanted: set[tuple[str, int]]):
        self.wanted = wanted
        self.arrays: dict[tuple[str, int], list[np.ndarray]] = {}
        self._seen: dict[str, int] = {}

    def before(self, tensors, name: str, op_type: str) -> None:
        self._seen[name] = self._seen.get(name, 0) + 1

    def after(self, tensors, name: str, op_type: str) -> None:
        key = (name, self._seen.get(name, 1) - 1)
        if key in self.wanted:
            self.arrays[key] = [to_numpy(t) for t in tensors]


def capture_layers(trace: TraceResult | None, model: LoadedModel, config: RunConfig, inputs,
                   reference: ReferenceTrace) -> LayerArrays:
    """Target and reference tensors of the first divergent layer and the first health flip.

    The trace keeps only metrics, so the target runs once more with an
    observer that copies just these ops; the reference's are on disk already.
    """
    if trace is None:
        return []
    chosen = [("first divergent", trace.first_divergent), ("first health flip", trace.first_health_flip)]
    proven = trace.proven_layer
    if proven is not None:  # the op sweep's verdict replaces the trace's guess: its layer is drawn first
        chosen = [("broken alone (op sweep)", proven)] + [(role, layer) for role, layer in chosen
                                                           if layer is not proven]
    chosen = [(role, layer) for role, layer in chosen if layer is not None]
    if not chosen:
        return []
    capture = _LayerCapture({(layer.name, layer.occurrence) for _, layer in chosen})
    model.run(config, inputs, observer=capture)
    found: LayerArrays = []
    for role, layer in chosen:
        targets = capture.arrays.get((layer.name, layer.occurrence), [])
        refs = [reference.load(f"{layer.name}#{layer.occurrence}", "out", i) for i in range(len(targets))]
        # As the trace does: a backend's private shape is compared in logical order when sizes agree.
        pairs = [(t.reshape(r.shape) if t.shape != r.shape and t.size == r.size else t, np.array(r))
                 for t, r in zip(targets, refs) if r is not None]
        found.append((role, layer, [t for t, _ in pairs], [r for _, r in pairs]))
    return found
