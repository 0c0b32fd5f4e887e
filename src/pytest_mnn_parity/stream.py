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

import fnmatch
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from .inputs import generate_inputs
from .model import ModelError, remembered
from .runner import REFERENCE_CONFIG, RunConfig, RunOutput
from .tolerances import Tolerance
from .verdict import Verdict, judge_outputs

if TYPE_CHECKING:  # pragma: no cover
    from .parity import ParityEngine, ParityResult

DEFAULT_STEPS = 8
MAX_STEPS = 100_000
_PAIR = re.compile(r"^\s*([^\s;,=>]+)\s*->\s*([^\s;,=>]+)\s*$")


@dataclass(frozen=True)
class StreamSpec:
    """Which outputs feed which inputs, for how many steps, for which models."""

    state: tuple[tuple[str, str], ...]  # (state output, state input)
    steps: int = DEFAULT_STEPS
    model: str | None = None  # a glob; None: every model
    # Where it was declared, for messages: the option, or a sidecar's [stream].
    origin: str = field(default="--mnn-stream", compare=False)

    def __post_init__(self):
        if not self.state:
            raise ValueError("declares no state: give at least one OUTPUT->INPUT pair, e.g. h_out->h")
        outs, ins = [o for o, _ in self.state], [i for _, i in self.state]
        for kind, names in (("output", outs), ("input", ins)):
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:
                raise ValueError(f"state {kind} {repeated[0]!r} is named twice")
        if not 1 <= self.steps <= MAX_STEPS:
            raise ValueError(f"steps must be between 1 and {MAX_STEPS}, got {self.steps}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> "StreamSpec":
        """The same declaration from a table: ``{"state": {"h_out": "h"}, "steps": 8, "model": "vad*.mnn"}``.

        This is the shape a sidecar file's ``[stream]`` table maps to.
        """
        unknown = set(data) - {"state", "steps", "model"}
        if unknown:
            raise ValueError(f"unknown stream key(s) {sorted(unknown)}; known: state, steps, model")
        state = data.get("state") or {}
        if not isinstance(state, Mapping):
            raise ValueError("state must map each state output to the input it feeds, e.g. {h_out = \"h\"}")
        steps = data.get("steps", DEFAULT_STEPS)
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise ValueError(f"steps must be an integer, got {steps!r}")
        return cls(tuple((str(k), str(v)) for k, v in state.items()), steps, data.get("model"))

    def label(self) -> str:
        """How messages name the declaration: ``--mnn-stream 'h_out->h;steps=8'``."""
        return f"{self.origin} {self.text()!r}"

    def text(self) -> str:
        """The option text that declares this stream (``parse_stream(spec.text()) == spec``)."""
        parts = ([f"model={self.model}"] if self.model else []) + [f"{o}->{i}" for o, i in self.state]
        return ";".join(parts + [f"steps={self.steps}"])

    def applies_to(self, path: os.PathLike | str) -> bool:
        if self.model is None:
            return True
        p = Path(path)
        posix = p.as_posix()
        return any(fnmatch.fnmatchcase(s, self.model) for s in (p.name, posix)) or \
            fnmatch.fnmatchcase(posix, "*/" + self.model)


def parse_stream(text: str) -> StreamSpec:
    """``"h_out->h;c_out->c;steps=16"`` (optionally ``model=GLOB;...``) -> ``StreamSpec``."""
    state: list[tuple[str, str]] = []
    steps, model = DEFAULT_STEPS, None
    for field_text in str(text).split(";"):
        if not field_text.strip():
            continue
        key, eq, value = field_text.partition("=")
        if eq and ">" not in key:
            key, value = key.strip(), value.strip()
            if key == "steps":
                if not re.fullmatch(r"\d+", value):
                    raise ValueError(f"--mnn-stream {text!r}: steps must be a positive integer, got {value!r}")
                steps = int(value)
            elif key == "model":
                if not value:
                    raise ValueError(f"--mnn-stream {text!r}: model= needs a file name or glob")
                model = value
            else:
                raise ValueError(f"--mnn-stream {text!r}: unknown key {key!r}; known: steps, model")
            continue
        for pair in field_text.split(","):
            match = _PAIR.match(pair)
            if not match:
                raise ValueError(f"--mnn-stream {text!r}: {pair.strip()!r} is not OUTPUT->INPUT "
                                 "(e.g. \"h_out->h;steps=8\")")
            state.append((match.group(1), match.group(2)))
    try:
        return StreamSpec(tuple(state), steps, model)
    except ValueError as exc:
        raise ValueError(f"--mnn-stream {text!r}: {exc}") from None


def stream_input_label(spec: StreamSpec, seed: int) -> str:
    """A stream item's ``input_set`` label (also given to an isolated one that crashed)."""
    return f"stream of {spec.steps} steps from seeded:{seed} (step k: seed + k), state starting at zeros"


def spec_for(specs, path: os.PathLike | str) -> StreamSpec | None:
    """The declaration for ``path``: one scoped to it by ``model=`` wins over an unscoped one."""
    scoped = [s for s in specs if s.model is not None and s.applies_to(path)]
    unscoped = [s for s in specs if s.model is None]
    return (scoped or unscoped or [None])[0]


@dataclass
class StreamRun:
    """The outputs of every step that ran; ``failed`` is the run that stopped the stream."""

    steps: list[dict[str, np.ndarray]] = field(default_factory=list)
    failed: RunOutput | None = None
    log: str = ""
    seconds: float = 0.0


def check_declaration(model, spec: StreamSpec) -> None:
    """The declared names exist in the model; the message names the key and what the model has."""
    inputs = {s.name for s in model.info.inputs}
    for out, inp in spec.state:
        if out not in model.info.output_names:
            raise ModelError(model.path, f"{spec.label()}: the model has no output {out!r} "
                                         f"(outputs: {', '.join(model.info.output_names)})",
                             "name a state output of this model, or scope the declaration to other models "
                             "with model=GLOB")
        if inp not in inputs:
            raise ModelError(model.path, f"{spec.label()}: the model has no input {inp!r} "
                                         f"(inputs: {', '.join(sorted(inputs))})",
                             "name a state input of this model, or scope the declaration to other models "
                             "with model=GLOB")


def step_inputs(model, spec: StreamSpec, seed: int) -> list[dict[str, np.ndarray]]:
    """The non-state inputs of every step: step k uses seed + k."""
    state_inputs = {i for _, i in spec.state}
    others = [s for s in model.info.inputs if s.name not in state_inputs]
    return [generate_inputs(others, model.shapes, seed + k) for k in range(spec.steps)]


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


def stream_lines(result: "ParityResult") -> list[str]:
    """The stream part of a failure message: what was declared, where it broke, the steps around it."""
    data = result.stream
    if not data:
        return []
    pairs = ", ".join(f"{o}->{i}" for o, i in data["state"].items())
    lines = [f"stream:    {data['steps']} steps, state {pairs} (reference and target each feed back their own "
             "state; state starts at zeros; step k's other inputs use seed + k)"]
    first = data["first_failing_step"]
    if first is None:
        lines.append(f"first failing step: none of steps 0..{data['steps_run'] - 1}")
    else:
        what = f", output {data['first_failing_output']!r}" if data["first_failing_output"] else ""
        lines.append(f"first failing step: {first} (of steps 0..{data['steps'] - 1}){what}")
    # One row per step, its worst output; every output of every step is in the JSON report.
    rows = [("step", "category", "worst output", "max_abs", "of ref scale", "cosine")]
    last = first if first is not None else len(data["per_step"]) - 1
    for step in data["per_step"][max(0, last - 6):last + 2]:
        name, o = _worst(step["outputs"])
        rows.append((str(step["step"]), step["category"], name, _num(o["max_abs"], "{:.4g}"),
                     _num(o["scaled_max_abs"], "{:.3g}"), _num(o["cosine"], "{:.6f}")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines.extend("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
    return lines


def _worst(outputs: dict[str, dict]) -> tuple[str, dict]:
    """The failing output, else the one farthest from its reference relative to its own range."""
    failing = [(n, o) for n, o in outputs.items() if o["category"] != "ok"]
    if failing:
        return failing[0]
    return max(outputs.items(), key=lambda item: item[1]["scaled_max_abs"] or 0.0)


def _num(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


class StreamSide:
    """The engine's streaming part: the reference stream once per model and API, then each target."""

    def __init__(self, engine: "ParityEngine"):
        self.engine = engine
        self._references: dict[tuple, StreamRun | ModelError] = {}
        self._inputs: dict[tuple, list] = {}
        self._declared: dict[Path, StreamSpec] = {}  # per model, from its sidecar

    def declare(self, path, spec: StreamSpec) -> None:
        """One model's own declaration (its sidecar's [stream]); ``--mnn-stream`` still wins."""
        self._declared[Path(path).resolve()] = spec

    def spec_for(self, path) -> StreamSpec | None:
        # Called for every check: resolving the path (a syscall per part) only when a sidecar declared a stream.
        declared = self._declared.get(Path(path).resolve()) if self._declared else None
        return spec_for(self.engine.settings.streams, path) or declared

    def _step_inputs(self, model, spec: StreamSpec) -> list[dict[str, np.ndarray]]:
        key = (Path(model.path).resolve(), spec)
        if key not in self._inputs:
            self._inputs[key] = step_inputs(model, spec, self.engine.settings.seed)
        return self._inputs[key]

    def reference(self, model, spec: StreamSpec) -> StreamRun:
        key = (Path(model.path).resolve(), model.api if hasattr(model, "api") else "session", spec)

        def run_reference() -> StreamRun:
            ref_path = self.engine.settings.reference
            ref_model = self.engine.model(ref_path, getattr(model, "api", "session")) if ref_path else model
            check_declaration(ref_model, spec)
            run = run_stream(ref_model, REFERENCE_CONFIG, spec, self._step_inputs(model, spec))
            if run.failed is not None:
                raise ModelError(ref_model.path, f"the reference stream failed at step {len(run.steps)}: "
                                                 f"{_failure(run.failed)}", "see MNN's log", run.log)
            return run

        return remembered(self._references, key, run_reference)

    def check(self, result: "ParityResult", model, config: RunConfig, tol: Tolerance, spec: StreamSpec,
              reproduce: str) -> "ParityResult":
        from .explain import failure_message
        from .verdict import Category

        try:
            check_declaration(model, spec)
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

    def release(self, key: Path) -> None:
        for cache in (self._references, self._inputs):
            for k in [k for k in cache if k[0] == key]:
                cache.pop(k, None)


def _failure(run: RunOutput) -> str:
    from .runner import error_name

    text = getattr(run, "failure", "") or f"runSession returned {run.rc} ({error_name(run.rc)})"
    lines = [line.strip() for line in run.log.splitlines() if line.strip()]
    return text + (f"; MNN said: {' | '.join(lines[-3:])}" if lines else "")
