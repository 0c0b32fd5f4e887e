"""Per-layer trace: which op went wrong first, and which activations fp16 cannot hold.

Both runs go through MNN's per-op callbacks (``runSessionWithCallBackInfo``).
Ops are matched by name and by how many times that name has run before (MNN
runs some ops, e.g. inside loops or split rasters, more than once); an op
present in one run only is listed as unmatched, never paired with a neighbour.

Memory stays bounded: the reference's tensors are written to a temporary
directory as they are produced and read back one at a time (memory-mapped)
while the target runs, so neither run's intermediates are ever all in memory.
"""
from __future__ import annotations

import math
import mmap
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.metrics import OutputMetrics
from ..core.quickcompare import QuickMetrics, RefStats, ref_stats
from ..core.tolerances import Tolerance
from ..core.verdict import has_new_non_finite, is_constant_output, is_zero_output
from ..mnn.runner import LoadedModel, OpObserver, RunConfig, to_numpy
from ..mnn.weights import FP16_MAX, FP16_MIN_NORMAL
from .observability import LOOP_TYPES, unwritten
from .tensor_ids import HostCopies, Producers, describe

METHOD = "MNN session per-op callbacks; ops matched by name and occurrence"


@dataclass
class TensorJudgement:
    """One input or output tensor of a layer, target against reference."""

    index: int
    metrics: OutputMetrics | None
    failed: bool
    health: list[str] = field(default_factory=list)
    note: str = ""
    # A passing tensor proven by the quick pass (``quickcompare``): exact max_abs, a cosine bound.
    quick: QuickMetrics | None = None

    @property
    def observable(self) -> bool:
        return not self.note.startswith("not observable")

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"index": self.index, "failed": self.failed, "health": self.health}
        if self.note:
            data["note"] = self.note
        if self.metrics is None and self.quick is not None:
            data.update(self.quick.as_dict())
        if self.metrics is not None:
            m = self.metrics
            data.update(shape=list(m.shape), max_abs=m.max_abs, max_rel=m.max_rel, cosine=m.cosine,
                        snr_db=m.snr_db, outside_fraction=m.outside_fraction, zero_fraction=m.zero_fraction,
                        ref_zero_fraction=m.ref_zero_fraction, nonfinite_count=m.nonfinite_count,
                        ref_scale=m.ref_scale)
        return data


@dataclass
class LayerRecord:
    index: int
    name: str
    type: str
    occurrence: int
    outputs: list[TensorJudgement] = field(default_factory=list)
    inputs: list[TensorJudgement] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return any(o.failed for o in self.outputs)

    @property
    def inputs_ok(self) -> bool:
        return not any(i.failed for i in self.inputs)

    @property
    def health(self) -> list[str]:
        return sorted({h for o in self.outputs for h in o.health})

    @property
    def not_observable(self) -> bool:
        """Every output is a tensor MNN hands over unwritten (``observability``): nothing to judge."""
        return bool(self.outputs) and not any(o.observable for o in self.outputs)

    def worst_cosine(self) -> float:
        values = [o.metrics.cosine for o in self.outputs if o.metrics is not None]
        values = [v for v in values if v == v]  # NaN (non-finite) sorts as worst below
        return min(values) if values else (float("-inf") if self.failed else 1.0)

    def as_dict(self, with_inputs: bool = True) -> dict[str, Any]:
        data: dict[str, Any] = {"index": self.index, "name": self.name, "type": self.type,
                                "failed": self.failed, "health": self.health,
                                "outputs": [o.as_dict() for o in self.outputs]}
        if self.outputs and self.outputs[0].metrics is not None:
            m = self.outputs[0].metrics
            data.update(max_abs=m.max_abs, cosine=m.cosine, outside_fraction=m.outside_fraction)
        elif self.outputs and self.outputs[0].quick is not None:
            q = self.outputs[0].quick
            data.update(max_abs=q.max_abs, cosine_min=q.cosine_min, outside_fraction=0.0)
        unobservable = [o.index for o in self.outputs if not o.observable]
        if unobservable:
            data["not_observable"] = unobservable
        if with_inputs:
            data["inputs"] = [i.as_dict() for i in self.inputs]
        return data


@dataclass(frozen=True)
class ActivationRisk:
    """A reference activation that fp16 arithmetic cannot represent."""

    layer: str
    type: str
    kind: str  # "overflow" | "underflow"
    max_abs: float
    fraction: float

    def describe(self) -> str:
        if self.kind == "overflow":
            return f"{self.layer} ({self.type}): max |x| {self.max_abs:.4g} > fp16 max 65504 ({self.fraction:.1%} of elements)"
        return (f"{self.layer} ({self.type}): {self.fraction:.0%} of non-zero values below fp16's normal range "
                f"(< 6.1e-5), they lose precision or flush to zero")

    def as_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "type": self.type, "kind": self.kind, "max_abs": self.max_abs,
                "fraction": self.fraction}


@dataclass
class TraceResult:
    layers: list[LayerRecord]
    unmatched_target: list[str]
    unmatched_reference: list[str]
    method: str = METHOD
    # "op#occurrence out|in index" -> why its tensor cannot be judged (``observability``).
    not_observable: dict[str, str] = field(default_factory=dict)
    # "op#occurrence" of the op the op sweep proved wrong alone (trace.sweep): it replaces the guess where a
    # failure is shown (the layer table's rows, the pictures); "" when no sweep proved one.
    proven: str = ""

    @property
    def proven_layer(self) -> LayerRecord | None:
        return next((layer for layer in self.layers if layer_key(layer.name, layer.occurrence) == self.proven), None)

    @property
    def compared(self) -> int:
        return len(self.layers)

    @property
    def first_divergent(self) -> LayerRecord | None:
        """The first failing op whose inputs were all still within tolerance: the one to blame."""
        for layer in self.layers:
            if layer.failed and layer.inputs_ok:
                return layer
        return next((layer for layer in self.layers if layer.failed), None)

    @property
    def first_health_flip(self) -> LayerRecord | None:
        return next((layer for layer in self.layers if layer.health), None)

    def summary(self) -> dict[str, Any]:
        flip = self.first_health_flip
        return {"method": self.method, "compared": self.compared, "proven": self.proven, "unmatched_target": self.unmatched_target,
                "unmatched_reference": self.unmatched_reference, "not_observable": self.not_observable,
                "first_health_flip": None if flip is None else {"name": flip.name, "type": flip.type,
                                                                "health": flip.health}}


def layer_key(name: str, occurrence: int) -> str:
    """How an op is matched between two runs: its name and how often that name ran before."""
    return f"{name}#{occurrence}"


# Ops whose outputs saturate to 0 (and 1): tiny values there mean "off" and flushing them to 0 in fp16 changes
# nothing downstream (every detector and classifier head would otherwise carry a false underflow risk).
SATURATING_OPS = frozenset({"Sigmoid", "Softmax", "HardSigmoid", "HardSwish", "ReLU6", "Relu6", "ArgMax"})


def activation_risk(name: str, op_type: str, array: np.ndarray) -> list[ActivationRisk]:
    """Overflow (|x| > 65504) and underflow (most non-zero |x| < 6.1e-5) of one activation; no underflow for
    the output of a saturating op (``SATURATING_OPS``)."""
    if array.dtype.kind != "f" or array.size == 0:
        return []
    mag = np.abs(array)
    top = float(mag.max())
    if not math.isfinite(top):  # rare: ignore NaN/Inf, the verdict judges those
        mag = mag[np.isfinite(mag)]
        if mag.size == 0:
            return []
        top = float(mag.max())
    risks = []
    if top > FP16_MAX:
        over = int(np.count_nonzero(mag > FP16_MAX))
        risks.append(ActivationRisk(name, op_type, "overflow", top, over / array.size))
    if top > 0 and op_type not in SATURATING_OPS:
        # Every op's output of the reference run comes here, so passes count: one count of the small values
        # (zeros included; ``mag`` is finite here) settles most outputs, and boolean arrays count fast where
        # counting the non-zero floats themselves took 5x longer.
        small = int(np.count_nonzero(mag < FP16_MIN_NORMAL))
        if small:
            nonzero = int(np.count_nonzero(mag != 0))
            tiny = small - (mag.size - nonzero)
            if tiny * 2 > nonzero:
                risks.append(ActivationRisk(name, op_type, "underflow", top, tiny / nonzero))
    return risks


class RiskScanner(OpObserver):
    """Collects fp16 risks of every op's output during an ordinary reference run.

    It keeps only statistics, never tensors, so it rides along the reference
    run that happens anyway instead of costing a run of its own.  Risks from
    loop ops' outputs wait until ``observability`` has said which of those the
    op really writes (one more run, only for models with loop ops).
    """

    def __init__(self):
        self._risks: list[ActivationRisk] = []
        self._pending: list[tuple[tuple[str, str, int], ActivationRisk]] = []
        self._loops = _LoopHandles()
        self._run: tuple | None = None
        self._settled: list[ActivationRisk] | None = None

    def bind(self, model, config, inputs) -> None:
        self._run = (model, config, inputs)

    # No ``before``: the run then passes MNN a no-op instead of the guarded call with the op's name and type
    # (``runner.LoadedModel.run``), and the occurrences are counted after each op instead.
    def after(self, tensors, name: str, op_type: str) -> None:
        key = self._loops.ended(tensors, name, op_type)
        for i, tensor in enumerate(tensors):
            # A view is enough: the statistics are taken before the callback returns.
            found = activation_risk(name, op_type, to_numpy(tensor, copy=False))
            if op_type in LOOP_TYPES:
                self._pending.extend(((key, "out", i), r) for r in found)
            else:
                self._risks.extend(found)

    @property
    def risks(self) -> list[ActivationRisk]:
        if self._settled is None:
            hidden = {}
            if self._pending and self._run is not None:
                hidden = unwritten(*self._run, self._loops.handles)
            self._settled = self._risks + [r for k, r in self._pending if k not in hidden]
        return self._settled


class _LoopHandles:
    """Occurrence counting, plus the output tensors of loop ops kept for the observability probe."""

    def __init__(self):
        self.handles: dict[str, list[Any]] = {}
        self._seen: dict[str, int] = {}

    def before(self, name: str) -> str:
        occurrence = self._seen.get(name, 0)
        self._seen[name] = occurrence + 1
        return layer_key(name, occurrence)

    def ended(self, tensors, name: str, op_type: str) -> str:
        """``before`` and ``after`` at once, for an observer MNN does not call before each op: MNN calls
        ``after`` once per op run, in order, so the occurrences are the same."""
        self.before(name)
        return self.after(tensors, name, op_type)

    def after(self, tensors, name: str, op_type: str) -> str:
        key = layer_key(name, self._seen.get(name, 1) - 1)
        if op_type in LOOP_TYPES:
            # Session tensors live as long as the session: the probe reuses them in its own run.
            self.handles[key] = list(tensors)
        return key


class ReferenceTrace(OpObserver):
    """Records every op's inputs and outputs of the reference run to disk."""

    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="mnn-parity-trace-"))
        self.order: list[tuple[str, str, int]] = []
        self.risks: list[ActivationRisk] = []
        self.files: dict[tuple[str, str, int], Path] = {}
        # Per file: what the quick pass needs of it (scale, sum of squares, finiteness).
        self.stats: dict[Path, RefStats | None] = {}
        # (op key, "in"/"out", index) -> why that tensor cannot be judged (``observability``).
        self.unobservable: dict[tuple[str, str, int], str] = {}
        self._by_content: dict[tuple, Path] = {}
        # Per file: (shape, dtype, offset of the data): np.load parses the header again on every read (about
        # 0.3 ms, with an ``ast`` compile), which the trace pays once per op per configuration.
        self._layout: dict[Path, tuple[tuple[int, ...], np.dtype, int]] = {}
        self._loops = _LoopHandles()
        self._producers = Producers()
        self._hosts = HostCopies()
        self._risk_keys: list[tuple[str, int]] = []
        self._sources: dict[tuple[str, str, int], tuple[str, str, int]] = {}

    def before(self, tensors, name: str, op_type: str) -> None:
        key = self._loops.before(name)
        for i, tensor in enumerate(tensors):
            info = describe(tensor, True)
            source = self._producers.find(info)
            if source is not None and source in self.files:
                # An earlier op's output, unchanged: the same file, nothing copied.
                self.files[(key, "in", i)] = self.files[source]
                self._sources[(key, "in", i)] = source
                continue
            self._save((key, "in", i), to_numpy(tensor))

    def after(self, tensors, name: str, op_type: str) -> None:
        key = self._loops.after(tensors, name, op_type)
        occurrence = int(key.rsplit("#", 1)[1])
        self.order.append((name, op_type, occurrence))
        for i, tensor in enumerate(tensors):
            info = describe(tensor, True)
            array = self._hosts.view(tensor, info)
            path = self._save((key, "out", i), array)
            if path not in self.stats:
                self.stats[path] = ref_stats(array)
            self._producers.wrote(info, (key, "out", i))
            for risk in activation_risk(name, op_type, array):
                self.risks.append(risk)
                self._risk_keys.append((key, i))

    def release_buffers(self) -> None:
        self._hosts = HostCopies()

    def settle(self, model: LoadedModel, config: RunConfig, inputs) -> None:
        """Drop what loop ops hand over without writing it: files, and the fp16 risks read from it."""
        if not self._loops.handles:
            return
        hidden = dict(unwritten(model, config, inputs, self._loops.handles))
        hidden.update({k: hidden[s] for k, s in self._sources.items() if s in hidden})
        if not hidden:
            return
        self.unobservable = hidden
        for k in hidden:
            self.files.pop(k, None)
        kept = [(r, rk) for r, rk in zip(self.risks, self._risk_keys) if (rk[0], "out", rk[1]) not in hidden]
        self.risks = [r for r, _ in kept]
        self._risk_keys = [rk for _, rk in kept]

    def _save(self, key: tuple[str, str, int], array: np.ndarray) -> Path:
        # Tensors equal to an earlier one (layout-only rasters, graph inputs read twice): bytes stored once.
        content = fingerprint_array(array)
        path = self._by_content.get(content)
        if path is None:
            path = self.folder / f"{len(self._by_content)}.npy"
            np.save(path, array)
            self._by_content[content] = path
            if array.flags.c_contiguous and not array.dtype.hasobject:
                self._layout[path] = (tuple(array.shape), array.dtype, os.path.getsize(path) - array.nbytes)
        self.files[key] = path
        return path

    def load(self, key: str, kind: str, index: int) -> np.ndarray | None:
        path = self.files.get((key, kind, index))
        if path is None:
            return None
        layout = self._layout.get(path)
        if layout is None or layout[1].itemsize == 0 or 0 in layout[0]:
            return np.load(path, mmap_mode="r")
        shape, dtype, offset = layout
        # Read-only and mapped, as np.load(mmap_mode="r"): pages are shared with the page cache and dropped with
        # the array, so memory stays bounded by one tensor at a time.
        with open(path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return np.frombuffer(mapped, dtype=dtype, count=int(np.prod(shape, dtype=np.int64)), offset=offset
                             ).reshape(shape)

    def keys(self) -> set[str]:
        return {layer_key(n, o) for n, _, o in self.order}

    def largest_tensor_bytes(self) -> int:
        """The largest recorded tensor's bytes: the unit of the target trace's memory bound (``stream``)."""
        sizes = [int(np.prod(self._layout[p][0], dtype=np.int64)) * self._layout[p][1].itemsize
                 if p in self._layout else os.path.getsize(p) for p in set(self.files.values())]
        return max(sizes, default=0)

    def input_shapes(self, key: str) -> dict[int, tuple[int, ...]]:
        """The shapes of the inputs recorded for op ``key`` (input index -> shape), from the files' headers."""
        return {index: tuple(np.load(path, mmap_mode="r").shape)
                for (op, kind, index), path in self.files.items() if op == key and kind == "in"}

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def fingerprint_array(array: np.ndarray) -> tuple:
    """Identity of a tensor's content: shape, dtype and a CRC of its bytes (one fast pass)."""
    data = np.ascontiguousarray(array)
    return data.shape, data.dtype.str, zlib.crc32(memoryview(data).cast("B"))


def health_flags(target: np.ndarray, ref: np.ndarray, m: OutputMetrics, tol: Tolerance) -> list[str]:
    """How a failing tensor went wrong (at most one flag, the most specific), for the layer table."""
    flags = []
    if has_new_non_finite(target, ref):
        flags.append("non_finite")
    elif is_zero_output(target, ref):
        flags.append("zero")
    elif m.new_zero_fraction >= tol.partial_zero_fraction:
        flags.append("partial_zero")
    elif is_constant_output(target, ref):
        flags.append("constant")
    return flags


def record_reference(model: LoadedModel, config: RunConfig, inputs) -> tuple[ReferenceTrace, Any]:
    trace = ReferenceTrace()
    run = model.run(config, inputs, observer=trace)
    trace.release_buffers()
    trace.settle(model, config, inputs)
    return trace, run
