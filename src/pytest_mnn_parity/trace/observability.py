"""Tensors MNN's per-op callback hands over that the op never writes.

MNN's geometry turns some ops into loop commands (type ``While`` with a
``LoopParam``), and a loop command lists its scratch tensors among its outputs.
``GeometryLSTM.cpp`` (an ONNX LSTM converted with ``--useOriginRNNImpl``): the
first time step's loop declares outputs ``{Y, Cell, O, I, C, F}`` but never
writes ``O`` or ``F``; the next loop then lists ``O`` as an input without
reading it.  The callback copies such tensors anyway: they hold whatever the
memory held (uninitialised on the first run, another tensor's stale values
later), so their per-layer numbers and fp16 risks are noise.

Found by poisoning, not by guessing: in a second run of the same session, each
loop op's outputs that no earlier op of the run wrote are filled with a NaN
bit pattern just before the op runs; an output still holding the pattern after
the op, or an input holding it when a later op starts, was not written.  Only
first-written outputs are poisoned (a loop also writes into tensors an earlier
op filled, e.g. ``Y`` of the later time steps, and those must stay intact).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ..mnn.model import halide_type
from ..mnn.runner import LoadedModel, OpObserver, RunConfig, to_numpy
from .tensor_ids import describe

# Ops whose declared outputs may include unwritten scratch tensors.
LOOP_TYPES = frozenset({"While"})
POISON = np.uint32(0x7FBADBAD)  # a quiet NaN no arithmetic produces
REASON = ("not observable: MNN's loop op lists this scratch tensor in its callback but does not write it "
          "(uninitialised or stale memory)")

Key = tuple[str, str, int]  # ("name#occurrence", "in" | "out", index)


def _key(name: str, occurrence: int) -> str:
    return f"{name}#{occurrence}"


def _poisoned(array: np.ndarray) -> bool:
    if array.dtype.itemsize != 4 or array.size == 0:
        return False
    return bool((np.ascontiguousarray(array).view(np.uint32) == POISON).all())


class _Probe(OpObserver):
    def __init__(self, handles: Mapping[str, list[Any]]):
        self.handles = handles
        self.unwritten: set[Key] = set()
        self._seen: dict[str, int] = {}
        self._written: set[tuple] = set()
        self._poisoned: set[tuple] = set()

    def before(self, tensors, name: str, op_type: str) -> None:
        occurrence = self._seen.get(name, 0)
        self._seen[name] = occurrence + 1
        key = _key(name, occurrence)
        inputs = set()
        for i, tensor in enumerate(tensors):
            info = describe(tensor, True)
            inputs.add((info.address, info.shape))
            if (info.address, info.shape) in self._poisoned and _poisoned(to_numpy(tensor, copy=False)):
                self.unwritten.add((key, "in", i))
        from ..mnn.library import mnn

        for tensor in self.handles.get(key, ()):
            info = describe(tensor, True)
            ident = (info.address, info.shape)
            if info.address is None or ident in self._written or ident in inputs or info.nbytes == 0:
                continue
            if info.dtype is None or info.dtype.itemsize != 4:
                continue
            pattern = np.full(info.shape, POISON, dtype=np.uint32).view(info.dtype)
            tensor.copyFromHostTensor(mnn().Tensor(info.shape, halide_type(info.dtype), pattern,
                                                   tensor.getDimensionType()))
            self._poisoned.add(ident)

    def after(self, tensors, name: str, op_type: str) -> None:
        key = _key(name, self._seen.get(name, 1) - 1)
        for i, tensor in enumerate(tensors):
            info = describe(tensor, True)
            ident = (info.address, info.shape)
            if ident in self._poisoned and _poisoned(to_numpy(tensor, copy=False)):
                self.unwritten.add((key, "out", i))
            else:
                self._written.add(ident)
                self._poisoned.discard(ident)


def unwritten(model: LoadedModel, config: RunConfig, inputs: Mapping[str, np.ndarray],
              handles: Mapping[str, list[Any]]) -> dict[Key, str]:
    """Tensors of the loop ops in ``handles`` (op key -> its output tensors from an earlier run of the same
    session) that the op does not write, with the reason; cached per model and configuration."""
    cache = model.__dict__.setdefault("_unwritten_tensors", {})
    if config not in cache:
        if not handles:
            return {}
        probe = _Probe(handles)
        model.run(config, inputs, observer=probe)
        cache[config] = {k: REASON for k in probe.unwritten}
    return cache[config]
