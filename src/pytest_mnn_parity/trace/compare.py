"""Judging the target run op by op against a recorded reference (``trace_target``), and the layer table."""
from __future__ import annotations

from concurrent.futures import Future
from typing import Any, Union

import numpy as np

from ..core.metrics import compare
from ..core.quickcompare import RefStats, quick_pass, ref_stats
from ..core.tolerances import Tolerance
from ..core.verdict import fails_tolerance
from ..mnn.runner import LoadedModel, OpObserver, RunConfig, to_numpy
from .record import (
    LayerRecord,
    ReferenceTrace,
    TensorJudgement,
    TraceResult,
    fingerprint_array,
    health_flags,
    layer_key,
)
from .stream import ComparisonStream, default_stream
from .tensor_ids import Producers, describe


class _Later:
    """A judgement the comparison thread is still making (``stream``), read when the run has ended."""

    # Only the callback writes "not observable" notes (from ``observability``), never a comparison.
    observable = True

    def __init__(self, future: Future, index: int, copied: bool = False):
        self.future, self.index, self.copied = future, index, copied

    def result(self) -> TensorJudgement:
        judgement = self.future.result()
        return _copy(judgement, self.index) if self.copied else judgement


Judgement = Union[TensorJudgement, _Later]


class TargetComparer(OpObserver):
    """Judges the target's ops against a recorded reference, during the target's run."""

    def __init__(self, reference: ReferenceTrace, tol: Tolerance, layer_tolerances=None, *, fast: bool = True,
                 identity: bool = True, refine: set[str] | None = None, stream: ComparisonStream | None = None):
        self.reference = reference
        self.known = reference.keys()
        self.tol = self.model_tol = tol
        # Per-layer overrides by op name; an op's inputs are judged with the op's tolerance.
        self.layer_tolerances = layer_tolerances or {}
        self.layers: list[LayerRecord] = []
        self.unmatched: list[str] = []
        self._seen: dict[str, int] = {}
        self._inputs: list[Judgement] = []
        # (target content, reference file) -> judgement of an earlier op's output,
        # reused when a later op reads that same tensor as an input (when tensors have no address).
        self._judged: dict[tuple, TensorJudgement] = {}
        self.fast = fast
        # CPU tensors have host addresses: inputs are found among earlier outputs without copying them.
        self.identity = identity
        self._producers = Producers()
        # Copies each output in the callback; its comparison runs while MNN goes on (a stream of no jobs: inside).
        self.stream = stream or ComparisonStream(max_jobs=0)
        self._stats: dict[Any, RefStats | None] = dict(getattr(reference, "stats", {}))
        self.unobservable: dict[tuple[str, str, int], str] = dict(getattr(reference, "unobservable", {}))
        # Refining: only these op keys are judged again, in full; the rest of the run is skipped.
        self.refine = refine
        self.refined: dict[str, list[Judgement]] = {}

    def before(self, tensors, name: str, op_type: str) -> None:
        occurrence = self._seen.get(name, 0)
        self._seen[name] = occurrence + 1
        key = layer_key(name, occurrence)
        if self.refine is not None:
            return
        self.tol = self.layer_tolerances.get(name, self.model_tol)
        self._inputs = [self._judge_input(key, i, t) for i, t in enumerate(tensors)] if key in self.known else []

    def after(self, tensors, name: str, op_type: str) -> None:
        occurrence = self._seen.get(name, 1) - 1
        key = layer_key(name, occurrence)
        if self.refine is not None:
            if key in self.refine:
                self.tol = self.layer_tolerances.get(name, self.model_tol)
                self.refined[key] = [self._judge_output(key, i, t) for i, t in enumerate(tensors)]
            return
        if key not in self.known:
            self.unmatched.append(key)
            return
        self.tol = self.layer_tolerances.get(name, self.model_tol)
        layer = LayerRecord(len(self.layers), name, op_type, occurrence, inputs=self._inputs)
        layer.outputs = [self._judge_output(key, i, t) for i, t in enumerate(tensors)]
        self.layers.append(layer)

    def finish(self) -> None:
        """Wait for the comparisons still running and put their judgements in the layers."""
        self.stream.drain()
        for layer in self.layers:
            layer.inputs = [j.result() if isinstance(j, _Later) else j for j in layer.inputs]
            layer.outputs = [j.result() if isinstance(j, _Later) else j for j in layer.outputs]
        for key, outputs in self.refined.items():
            self.refined[key] = [j.result() if isinstance(j, _Later) else j for j in outputs]

    def _judge_input(self, key: str, index: int, tensor) -> Judgement:
        hidden = self.unobservable.get((key, "in", index))
        if hidden:
            return TensorJudgement(index, None, False, note=hidden)
        if not self.identity:
            return self._judge_by_content(key, "in", index, to_numpy(tensor))
        info = describe(tensor, True)
        source = self._producers.find(info)
        if source is not None:
            earlier, ref_path = source
            if not earlier.observable or ref_path == self.reference.files.get((key, "in", index)):
                return _copy(earlier, index)
        return self._judge_by_content(key, "in", index, to_numpy(tensor))

    def _judge_output(self, key: str, index: int, tensor) -> Judgement:
        hidden = self.unobservable.get((key, "out", index))
        info = describe(tensor, self.identity)
        judgement: Judgement
        if hidden:
            judgement = TensorJudgement(index, None, False, note=hidden)
        elif not self.identity:
            return self._judge_by_content(key, "out", index, to_numpy(tensor))
        else:
            ref_path, tol = self.reference.files.get((key, "out", index)), self.tol
            # The reference is mapped in the comparison too: nothing of it is read inside the callback.
            judgement = _Later(self.stream.judge(tensor, info, lambda target: self._compare(
                index, target, self.reference.load(key, "out", index), ref_path, tol, self.stream.quick_workers)),
                index)
        self._producers.wrote(info, (judgement, self.reference.files.get((key, "out", index))))
        return judgement

    def _judge_by_content(self, key: str, kind: str, index: int, target: np.ndarray) -> TensorJudgement:
        ref_path = self.reference.files.get((key, kind, index))
        memo = (fingerprint_array(target), ref_path)
        if memo in self._judged:
            return _copy(self._judged[memo], index)
        judgement = self._compare(index, target, self.reference.load(key, kind, index), ref_path, self.tol)
        self._judged[memo] = judgement
        return judgement

    def _compare(self, index: int, target: np.ndarray, ref: np.ndarray | None, ref_path, tol: Tolerance,
                 workers: int | None = None) -> TensorJudgement:
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
        if self.fast:
            if ref_path not in self._stats:
                self._stats[ref_path] = ref_stats(ref)
            quick = quick_pass(target, ref, self._stats[ref_path], tol, workers=workers)
            if quick is not None:
                return TensorJudgement(index, None, False, quick=quick)
        ref = np.asarray(ref)
        m = compare(target, ref, atol=tol.atol, rtol=tol.rtol)
        failed = fails_tolerance(m, tol)
        health = health_flags(target, ref, m, tol) if failed else []
        return TensorJudgement(index, m, failed, health)


def _copy(earlier: Judgement, index: int) -> Judgement:
    if isinstance(earlier, _Later):
        return _Later(earlier.future, index, copied=True)
    return TensorJudgement(index, earlier.metrics, earlier.failed, list(earlier.health), earlier.note, earlier.quick)


def refine(result: TraceResult, reference, model, config, inputs, tol, layer_tolerances, identity) -> None:
    """Full metrics where they are shown or ranked: table rows, and every output of a failing layer."""
    chosen, _, _ = _table_rows(result)
    wanted = chosen + [layer for layer in result.layers if layer.failed]
    keys = {layer_key(layer.name, layer.occurrence): layer for layer in wanted
            if any(o.quick is not None for o in layer.outputs)}
    if not keys:
        return
    refiner = TargetComparer(reference, tol, layer_tolerances, fast=False, identity=identity, refine=set(keys))
    try:
        model.run(config, inputs, observer=refiner)
    finally:
        refiner.stream.drain()  # no comparison outlives the run, even a failed one
    refiner.finish()
    for key, outputs in refiner.refined.items():
        layer = keys[key]
        layer.outputs = [full if old.quick is not None else old for old, full in zip(layer.outputs, outputs)]


def trace_target(reference: ReferenceTrace, model: LoadedModel, config: RunConfig, inputs,
                 tol: Tolerance, layer_tolerances=None, *, fast: bool = True,
                 stream: ComparisonStream | None = None) -> TraceResult:
    """Judge every op of ``config``'s run against ``reference``.

    ``fast`` (the default) proves most passing tensors with ``quickcompare``;
    the layers a failure message shows, and every output of a failing layer,
    get full metrics from one more run of the target, so verdicts, the table
    and the ranking are those of ``fast=False``.  Each output is judged in
    MNN's callback, within the trace's memory bound (``stream``; a stream with
    jobs judges in a thread beside MNN's instead, measured slower: stream.py).
    """
    identity = config.backend == "CPU" or model.falls_back(config)
    largest = getattr(reference, "largest_tensor_bytes", None)
    if stream is None:
        # A saved bundle's trace (engine.bundle) reads one zip archive, which the callback reads too (graph inputs):
        # it is judged in the callback, by one thread.
        stream = default_stream(largest()) if largest is not None else ComparisonStream(0)
    comparer = TargetComparer(reference, tol, layer_tolerances, fast=fast, identity=identity, stream=stream)
    try:
        model.run(config, inputs, observer=comparer)
    finally:
        comparer.stream.drain()  # no comparison outlives the run, even a failed one
    comparer.finish()
    seen = {layer_key(layer.name, layer.occurrence) for layer in comparer.layers}
    missing = [layer_key(n, o) for n, _, o in reference.order if layer_key(n, o) not in seen]
    hidden = {f"{k} {kind} {i}": why for (k, kind, i), why in comparer.unobservable.items()}
    result = TraceResult(comparer.layers, comparer.unmatched, missing, not_observable=hidden)
    if fast:
        refine(result, reference, model, config, inputs, tol, layer_tolerances, identity)
    return result


def _table_rows(trace: TraceResult, neighbours: int = 2, worst: int = 3):
    first = trace.first_divergent
    chosen: list[LayerRecord] = []
    if first is not None:
        lo, hi = max(0, first.index - neighbours), min(len(trace.layers), first.index + neighbours + 1)
        chosen.extend(trace.layers[lo:hi])
    # Failing layers only: a passing layer ranked among the worst used to take a row and show nothing.
    ranked = sorted((layer for layer in trace.layers if layer not in chosen and layer.failed),
                    key=lambda layer: layer.worst_cosine())
    proven = trace.proven_layer
    if proven is not None and proven not in chosen:  # the op the sweep proved broken is always shown
        ranked = [proven] + [layer for layer in ranked if layer is not proven]
    return chosen, ranked[:worst], first


def layer_table(trace: TraceResult, neighbours: int = 2, worst: int = 3) -> list[str]:
    """The divergent layer with its neighbours, then the worst failing layers elsewhere."""
    chosen, chosen_worst, first = _table_rows(trace, neighbours, worst)
    rows = [("#", "layer", "type", "max_abs", "cosine", "outside", "health", "")]
    for layer in chosen + chosen_worst:
        m = layer.outputs[0].metrics if layer.outputs and layer.outputs[0].metrics is not None else None
        mark = "<- first divergent" if layer is first else ("(worst)" if layer in chosen_worst else "")
        if layer is trace.proven_layer:
            mark = "<- broken alone (op sweep)" + ("; first divergent in the graph" if layer is first else "")
        health = ",".join(layer.health) or ("FAIL" if layer.failed else "ok")
        if layer.not_observable:
            health = "not observable"
        rows.append((str(layer.index), layer.name, layer.type, f"{m.max_abs:.4g}" if m else "-",
                     f"{m.cosine:.6f}" if m else "-", f"{m.outside_fraction:.1%}" if m else "-", health, mark))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
