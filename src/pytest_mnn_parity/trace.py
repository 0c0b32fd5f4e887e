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

import shutil
import zlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .metrics import OutputMetrics, compare
from .runner import LoadedModel, OpObserver, RunConfig, to_numpy
from .tolerances import Tolerance
from .weights import FP16_MAX, FP16_MIN_NORMAL
from .verdict import fails_tolerance, has_new_non_finite, is_constant_output, is_zero_output

METHOD = "MNN session per-op callbacks; ops matched by name and occurrence"


@dataclass
class TensorJudgement:
    """One input or output tensor of a layer, target against reference."""

    index: int
    metrics: OutputMetrics | None
    failed: bool
    health: list[str] = field(default_factory=list)
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"index": self.index, "failed": self.failed, "health": self.health}
        if self.note:
            data["note"] = self.note
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
        return {"method": self.method, "compared": self.compared, "unmatched_target": self.unmatched_target,
                "unmatched_reference": self.unmatched_reference,
                "first_health_flip": None if flip is None else {"name": flip.name, "type": flip.type,
                                                                "health": flip.health}}


def _key(name: str, occurrence: int) -> str:
    return f"{name}#{occurrence}"


def activation_risk(name: str, op_type: str, array: np.ndarray) -> list[ActivationRisk]:
    """Overflow (|x| > 65504) and underflow (most non-zero |x| < 6.1e-5) of one activation."""
    if array.dtype.kind != "f" or array.size == 0:
        return []
    mag = np.abs(array)
    top = float(mag.max())
    if not np.isfinite(top):  # rare: ignore NaN/Inf, the verdict judges those
        mag = mag[np.isfinite(mag)]
        if mag.size == 0:
            return []
        top = float(mag.max())
    risks = []
    if top > FP16_MAX:
        over = int(np.count_nonzero(mag > FP16_MAX))
        risks.append(ActivationRisk(name, op_type, "overflow", top, over / array.size))
    if top > 0 and float(mag.min()) < FP16_MIN_NORMAL:  # cheap test before counting
        nonzero = int(np.count_nonzero(mag))
        tiny = nonzero - int(np.count_nonzero(mag >= FP16_MIN_NORMAL))
        if tiny * 2 > nonzero:
            risks.append(ActivationRisk(name, op_type, "underflow", top, tiny / nonzero))
    return risks


class RiskScanner(OpObserver):
    """Collects fp16 risks of every op's output during an ordinary reference run.

    It keeps only statistics, never tensors, so it rides along the reference
    run that happens anyway instead of costing a run of its own.
    """

    def __init__(self):
        self.risks: list[ActivationRisk] = []

    def after(self, tensors, name: str, op_type: str) -> None:
        for tensor in tensors:
            # A view is enough: the statistics are taken before the callback returns.
            self.risks.extend(activation_risk(name, op_type, to_numpy(tensor, copy=False)))


class ReferenceTrace(OpObserver):
    """Records every op's inputs and outputs of the reference run to disk."""

    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="mnn-parity-trace-"))
        self.order: list[tuple[str, str, int]] = []
        self.risks: list[ActivationRisk] = []
        self.files: dict[tuple[str, str, int], Path] = {}
        self._by_content: dict[tuple, Path] = {}
        self._seen: dict[str, int] = {}

    def before(self, tensors, name: str, op_type: str) -> None:
        occurrence = self._seen.get(name, 0)
        self._seen[name] = occurrence + 1
        for i, tensor in enumerate(tensors):
            self._save(_key(name, occurrence), "in", i, to_numpy(tensor))

    def after(self, tensors, name: str, op_type: str) -> None:
        occurrence = self._seen.get(name, 1) - 1
        self.order.append((name, op_type, occurrence))
        for i, tensor in enumerate(tensors):
            array = to_numpy(tensor)
            self._save(_key(name, occurrence), "out", i, array)
            self.risks.extend(activation_risk(name, op_type, array))

    def _save(self, key: str, kind: str, index: int, array: np.ndarray) -> None:
        # An op's input is usually an earlier op's output: store its bytes once.
        content = fingerprint_array(array)
        path = self._by_content.get(content)
        if path is None:
            path = self.folder / f"{len(self._by_content)}.npy"
            np.save(path, array)
            self._by_content[content] = path
        self.files[(key, kind, index)] = path

    def load(self, key: str, kind: str, index: int) -> np.ndarray | None:
        path = self.files.get((key, kind, index))
        return None if path is None else np.load(path, mmap_mode="r")

    def keys(self) -> set[str]:
        return {_key(n, o) for n, _, o in self.order}

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class _TargetComparer(OpObserver):
    def __init__(self, reference: ReferenceTrace, tol: Tolerance):
        self.reference = reference
        self.known = reference.keys()
        self.tol = tol
        self.layers: list[LayerRecord] = []
        self.unmatched: list[str] = []
        self._seen: dict[str, int] = {}
        self._inputs: list[TensorJudgement] = []
        # (target content, reference file) -> judgement of an earlier op's output,
        # reused when a later op reads that same tensor as an input.
        self._judged: dict[tuple, TensorJudgement] = {}

    def before(self, tensors, name: str, op_type: str) -> None:
        occurrence = self._seen.get(name, 0)
        self._seen[name] = occurrence + 1
        key = _key(name, occurrence)
        self._inputs = [self._judge(key, "in", i, t) for i, t in enumerate(tensors)] if key in self.known else []

    def after(self, tensors, name: str, op_type: str) -> None:
        occurrence = self._seen.get(name, 1) - 1
        key = _key(name, occurrence)
        if key not in self.known:
            self.unmatched.append(key)
            return
        layer = LayerRecord(len(self.layers), name, op_type, occurrence, inputs=self._inputs)
        layer.outputs = [self._judge(key, "out", i, t) for i, t in enumerate(tensors)]
        self.layers.append(layer)

    def _judge(self, key: str, kind: str, index: int, tensor) -> TensorJudgement:
        target = to_numpy(tensor)
        ref_path = self.reference.files.get((key, kind, index))
        memo = (fingerprint_array(target), ref_path)
        if memo in self._judged:
            earlier = self._judged[memo]
            return TensorJudgement(index, earlier.metrics, earlier.failed, list(earlier.health), earlier.note)
        judgement = self._compare(index, target, self.reference.load(key, kind, index))
        self._judged[memo] = judgement
        return judgement

    def _compare(self, index: int, target: np.ndarray, ref: np.ndarray | None) -> TensorJudgement:
        if ref is None:
            return TensorJudgement(index, None, False, note="no reference tensor")
        if ref.shape != target.shape:
            # Layout-private shapes (packed or padded tensors) differ per backend:
            # compare by element count in logical order only when sizes agree.
            if ref.size != target.size:
                return TensorJudgement(index, None, False, note=f"shape {target.shape} vs reference {ref.shape}")
            target = target.reshape(ref.shape)
        if target.size == 0:
            return TensorJudgement(index, None, False, note="empty")
        ref = np.asarray(ref)
        m = compare(target, ref, atol=self.tol.atol, rtol=self.tol.rtol)
        failed = fails_tolerance(m, self.tol)
        health = _health(target, ref, m, self.tol) if failed else []
        return TensorJudgement(index, m, failed, health)


def fingerprint_array(array: np.ndarray) -> tuple:
    """Identity of a tensor's content: shape, dtype and a CRC of its bytes (one fast pass)."""
    data = np.ascontiguousarray(array)
    return data.shape, data.dtype.str, zlib.crc32(memoryview(data).cast("B"))


def _health(target: np.ndarray, ref: np.ndarray, m: OutputMetrics, tol: Tolerance) -> list[str]:
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
    return trace, run


def trace_target(reference: ReferenceTrace, model: LoadedModel, config: RunConfig, inputs,
                 tol: Tolerance) -> TraceResult:
    comparer = _TargetComparer(reference, tol)
    model.run(config, inputs, observer=comparer)
    seen = {_key(layer.name, layer.occurrence) for layer in comparer.layers}
    missing = [_key(n, o) for n, _, o in reference.order if _key(n, o) not in seen]
    return TraceResult(comparer.layers, comparer.unmatched, missing)


def layer_table(trace: TraceResult, neighbours: int = 2, worst: int = 3) -> list[str]:
    """The divergent layer with its neighbours, then the worst layers elsewhere."""
    first = trace.first_divergent
    chosen: list[LayerRecord] = []
    if first is not None:
        lo, hi = max(0, first.index - neighbours), min(len(trace.layers), first.index + neighbours + 1)
        chosen.extend(trace.layers[lo:hi])
    ranked = sorted((layer for layer in trace.layers if layer not in chosen), key=lambda layer: layer.worst_cosine())
    chosen_worst = [layer for layer in ranked[:worst] if layer.failed]
    rows = [("#", "layer", "type", "max_abs", "cosine", "outside", "health", "")]
    for layer in chosen + chosen_worst:
        m = layer.outputs[0].metrics if layer.outputs and layer.outputs[0].metrics is not None else None
        mark = "<- first divergent" if layer is first else ("(worst)" if layer in chosen_worst else "")
        rows.append((str(layer.index), layer.name, layer.type, f"{m.max_abs:.4g}" if m else "-",
                     f"{m.cosine:.6f}" if m else "-", f"{m.outside_fraction:.1%}" if m else "-",
                     ",".join(layer.health) or ("FAIL" if layer.failed else "ok"), mark))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
