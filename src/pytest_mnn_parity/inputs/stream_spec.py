"""What a streaming model's declaration says: which outputs feed which inputs, for how many steps.

Read from ``--mnn-stream`` or a sidecar's ``[stream]``; the engine's stream side
(``engine/stream.py``) runs what is declared here.
"""
from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..mnn.model import ModelError
from .generate import generate_inputs

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


def check_declaration(model, spec: StreamSpec, label: str | None = None) -> None:
    """The declared names exist in the model; one message names every one that does not, with what the model
    has and the closest name.  ``label`` names the model (the user's ``.onnx`` rather than its conversion)."""
    from ..mnn.backends import did_you_mean  # noqa: PLC0415 - difflib, only for this message

    inputs = [s.name for s in model.info.inputs]
    outputs = list(model.info.output_names)
    wrong = [f"no output {out!r}{did_you_mean(out, outputs)}" for out, _ in spec.state if out not in outputs]
    wrong += [f"no input {inp!r}{did_you_mean(inp, inputs)}" for _, inp in spec.state if inp not in inputs]
    if wrong:
        raise ModelError(label or model.path, f"{spec.label()}: the model has {', '.join(wrong)} (its outputs: "
                                              f"{', '.join(outputs)}; its inputs: {', '.join(inputs)})",
                         "name the model's state outputs and inputs, or scope the declaration to other models "
                         "with model=GLOB")


def step_inputs(model, spec: StreamSpec, seed: int) -> list[dict[str, np.ndarray]]:
    """The non-state inputs of every step: step k uses seed + k."""
    state_inputs = {i for _, i in spec.state}
    others = [s for s in model.info.inputs if s.name not in state_inputs]
    return [generate_inputs(others, model.shapes, seed + k) for k in range(spec.steps)]
