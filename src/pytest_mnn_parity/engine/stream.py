"""Streaming (stateful) models: run step by step, each side feeding back its own state.

A streaming voice detector or a decoder step has state inputs and outputs: the
app feeds each step's state output into the next step's state input.  An error
too small to fail one step can grow over a stream, so one step with random
state proves little.  With a declaration (``--mnn-stream "h_out->h;steps=8"``, or
the model's sidecar table ``[stream]``, read by ``StreamSpec.from_mapping``) the
reference and the target each run ``steps`` steps feeding back their *own*
state, every step is judged, and the first step and output that broke
tolerance are reported.

Step ``k``'s other inputs are the seeded inputs of seed ``SEED + k`` (step 0 is
input set A); state inputs start at zeros, as a stream does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.tolerances import Tolerance
from ..core.verdict import Verdict, judge_outputs
from ..inputs.stream_spec import (
    StreamSpec,
    check_declaration,
    spec_for,
    step_inputs,
    stream_input_label,
)
from ..mnn.model import ModelError, model_key, remembered
from ..mnn.runner import RunConfig, RunOutput

if TYPE_CHECKING:  # pragma: no cover
    from .results import ParityResult

@dataclass
class StreamRun:
    """The outputs of every step that ran; ``failed`` is the run that stopped the stream."""

    steps: list[dict[str, np.ndarray]] = field(default_factory=list)
    failed: RunOutput | None = None
    log: str = ""
    seconds: float = 0.0


def run_stream(model, config: RunConfig, spec: StreamSpec, inputs: list[dict[str, np.ndarray]]) -> StreamRun:
    """Run every step, feeding each step's state outputs into the next step's state inputs."""
    specs = {s.name: s for s in model.info.inputs}
    state = {i: np.zeros(model.shapes[i], dtype=specs[i].dtype or np.float32) for _, i in spec.state}
    run = StreamRun()
    for k in range(spec.steps):
        out = model.run(config, {**inputs[k], **state})
        run.log += out.log
        run.seconds += out.seconds
        if not out.ok:
            run.failed = out
            return run
        for o, i in spec.state:
            value = out.outputs[o]
            if value.shape != tuple(model.shapes[i]):
                raise ModelError(model.path, f"{spec.label()}: state output {o!r} has shape "
                                             f"{value.shape} but state input {i!r} takes {tuple(model.shapes[i])}",
                                 "pair each state output with the input of the same shape")
            state[i] = value
        run.steps.append(out.outputs)
    return run


@dataclass
class StreamVerdict:
    verdicts: list[Verdict]
    first_failing: int | None

    @property
    def chosen(self) -> Verdict:
        """The verdict the item reports: the first failing step's, else the last step's."""
        return self.verdicts[self.first_failing if self.first_failing is not None else -1]


def judge_stream(target: list[dict], reference: list[dict], tol: Tolerance) -> StreamVerdict:
    """Judge every step; each step's neighbour stands in as input set B (stale check)."""
    verdicts = []
    for k, (t, r) in enumerate(zip(target, reference)):
        b = k - 1 if k > 0 else (1 if len(target) > 1 else None)
        verdicts.append(judge_outputs(t, r, tol, targets_b=None if b is None else target[b],
                                      references_b=None if b is None else reference[b]))
    first = next((k for k, v in enumerate(verdicts) if not v.passed), None)
    return StreamVerdict(verdicts, first)


def stream_record(spec: StreamSpec, judged: StreamVerdict | None, failed_step: int | None = None) -> dict[str, Any]:
    steps = []
    for k, verdict in enumerate(judged.verdicts if judged else []):
        steps.append({"step": k, "category": verdict.category.value,
                      "outputs": {v.name: _step_output(v) for v in verdict.outputs}})
    first = judged.first_failing if judged else None
    first_output = None
    if first is not None:
        first_output = next(v.name for v in judged.verdicts[first].outputs if not v.passed)
    return {"declaration": spec.text(), "declared_by": spec.origin, "steps": spec.steps, "state": dict(spec.state),
            "steps_run": len(steps), "first_failing_step": first if failed_step is None else failed_step,
            "first_failing_output": first_output, "per_step": steps}


def _step_output(v) -> dict[str, Any]:
    m = v.metrics
    if m is None:
        return {"category": v.category.value, "max_abs": None, "scaled_max_abs": None, "cosine": None,
                "outside_fraction": None}
    return {"category": v.category.value, "max_abs": m.max_abs, "scaled_max_abs": m.max_abs / m.ref_scale,
            "cosine": m.cosine, "outside_fraction": m.outside_fraction}


class StreamSide:
    """The engine's streaming part: the reference stream once per model and API, then each target."""

    def __init__(self, engine):
        self.engine = engine
        self._references: dict[tuple, StreamRun | ModelError] = {}
        self._inputs: dict[tuple, list] = {}
        self._declared: dict[Any, StreamSpec] = {}  # per model, from its sidecar

    def declared(self, path) -> StreamSpec | None:
        """The stream declared for this model alone (its sidecar's ``[stream]``)."""
        return self._declared.get(model_key(path))

    def declare(self, path, spec: StreamSpec) -> None:
        """One model's own declaration (its sidecar's [stream]); ``--mnn-stream`` still wins."""
        self._declared[model_key(path)] = spec

    def spec_for(self, path) -> StreamSpec | None:
        # Called for every check: resolving the path (a syscall per part) only when a sidecar declared a stream.
        declared = self._declared.get(model_key(path)) if self._declared else None
        return spec_for(self.engine.settings.streams, path) or declared

    def _step_inputs(self, model, spec: StreamSpec) -> list[dict[str, np.ndarray]]:
        key = (model_key(model.path), spec)
        if key not in self._inputs:
            self._inputs[key] = step_inputs(model, spec, self.engine.settings.seed)
        return self._inputs[key]

    def reference(self, model, spec: StreamSpec) -> StreamRun:
        key = (model_key(model.path), model.api if hasattr(model, "api") else "session", spec)

        def run_reference() -> StreamRun:
            ref_path = self.engine.settings.reference
            if self.engine.onnx.reference_path(model) is not None:
                ref_model = self.engine.onnx.step_model(model)  # ONNX Runtime, as for the model's single runs
            else:
                ref_model = self.engine.model(ref_path, getattr(model, "api", "session")) if ref_path else model
            check_declaration(ref_model, spec)
            run = run_stream(ref_model, self.engine.reference_config, spec, self._step_inputs(model, spec))
            if run.failed is not None:
                raise ModelError(ref_model.path, f"the reference stream failed at step {len(run.steps)}: "
                                                 f"{_failure(run.failed)}", "see MNN's log", run.log)
            return run

        return remembered(self._references, key, run_reference)

    def check(self, result: "ParityResult", model, config: RunConfig, tol: Tolerance, spec: StreamSpec,
              reproduce: str) -> "ParityResult":
        from ..core.verdict import Category
        from .explain import failure_message

        try:
            check_declaration(model, spec, self.engine.user_label(model.path))
            reference = self.reference(model, spec)
            target = run_stream(model, config, spec, self._step_inputs(model, spec))
        except ModelError as exc:
            result.category, result.message = Category.MODEL_ERROR, str(exc)
            result.log += exc.log
            return result
        result.log += target.log
        result.seconds = target.seconds / max(1, len(target.steps) + (target.failed is not None))
        result.input_set = stream_input_label(spec, self.engine.settings.seed)
        judged = judge_stream(target.steps, reference.steps, tol)
        if target.failed is not None:
            failed_step = len(target.steps)
            result.rc = target.failed.rc
            result.category = Category.RUNTIME_ERROR
            result.verdict = Verdict(Category.RUNTIME_ERROR)
            result.stream = stream_record(spec, judged, failed_step)
            result.message = failure_message(result, model, reproduce=reproduce,
                                             error=f"step {failed_step}: {_failure(target.failed)}")
            return result
        result.rc = 0
        result.verdict = judged.chosen
        result.category = result.verdict.category
        result.stream = stream_record(spec, judged)
        if not result.passed:
            result.message = failure_message(result, model, reproduce=reproduce)
        return result

    def release(self, key) -> None:
        for cache in (self._references, self._inputs):
            for k in [k for k in cache if k[0] == key]:
                cache.pop(k, None)


def _failure(run: RunOutput) -> str:
    from ..mnn.runner import error_name

    text = getattr(run, "failure", "") or f"runSession returned {run.rc} ({error_name(run.rc)})"
    lines = [line.strip() for line in run.log.splitlines() if line.strip()]
    return text + (f"; MNN said: {' | '.join(lines[-3:])}" if lines else "")
