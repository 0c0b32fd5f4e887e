"""Search for inputs that break parity, with hypothesis; usable without pytest.

``search(engine, model, config, ...)`` draws up to ``max_examples`` inputs from
``strategies.mnn_inputs`` (within the input set's declared ranges), runs each on
the reference and on ``config``, and judges the outputs (input set A only: the
search hunts numbers, the stale check needs no search).  A failure is shrunk to
a minimal one (one flat level, one rectangle...), saved as ``.npz`` and can be
replayed as an input set.

Bounded: ``max_examples`` generated inputs, then at most ``shrink_budget`` more
runs while shrinking; inputs hypothesis draws twice are judged once.
Deterministic: the same ``seed`` draws the same inputs.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..core.tolerances import Tolerance
from ..core.verdict import Category, Verdict, judge_outputs
from ..inputs.generate import fingerprint
from ..inputs.sets import InputSet
from ..mnn.runner import RunConfig


@dataclass
class SearchOutcome:
    seed: Any
    max_examples: int
    runs: int = 0  # inputs judged (generation and shrinking)
    runs_to_first: int = 0  # inputs judged until the first failure
    inputs: dict[str, np.ndarray] | None = None  # the minimal failing input
    verdict: Verdict | None = None
    saved: Path | None = None
    name: str = ""  # the input set name to replay it under

    @property
    def found(self) -> bool:
        return self.inputs is not None

    def as_dict(self) -> dict[str, Any]:
        return {"max_examples": self.max_examples, "seed": self.seed, "runs": self.runs, "found": self.found,
                "runs_to_first_failure": self.runs_to_first if self.found else None,
                "category": self.verdict.category.value if self.verdict is not None else None,
                "saved": str(self.saved) if self.saved else None, "replay_input_set": self.name or None,
                "inputs": summarize(self.inputs) if self.inputs is not None else None}


def judge_inputs(engine, model_path, config: RunConfig, inputs: Mapping[str, np.ndarray], tol: Tolerance,
                 output_tolerances: Mapping[str, Tolerance] | None = None) -> Verdict | None:
    """``config`` against the reference on one input; None when the reference itself cannot run it."""
    model = engine.model(model_path)
    onnx_reference = engine.onnx.reference_path(model)
    if onnx_reference is not None:  # an ONNX model (or an .onnx --mnn-reference): ONNX Runtime is the reference
        reference_outputs = dict(engine.onnx.runtime(onnx_reference).run(inputs))
    else:
        reference = engine.reference_model(model).run(engine.reference_config, inputs)
        if not reference.ok:
            return None
        reference_outputs = reference.outputs
    target = model.run(config, inputs)
    if not target.ok or any(a.size == 0 for a in target.outputs.values()):
        return Verdict(Category.RUNTIME_ERROR)
    verdict = judge_outputs(target.outputs, reference_outputs, tol, output_tolerances=output_tolerances)
    if verdict.category is Category.DEGENERATE_REFERENCE:
        # One drawn input on which the reference says nothing (all zeros) breaks no parity: search on.
        verdict.category = Category.OK
    return verdict


def search(engine, model_path, config: RunConfig, tol: Tolerance, *, max_examples: int, seed: Any,
           input_set: InputSet | None = None, output_tolerances: Mapping[str, Tolerance] | None = None,
           shrink_budget: int | None = None) -> SearchOutcome:
    """Look for an input that breaks parity; the outcome holds the minimal one found, if any."""
    from hypothesis import HealthCheck, Phase, Verbosity, find, settings, target
    from hypothesis.errors import NoSuchExample

    from ..inputs.strategies import mnn_inputs

    strategy = mnn_inputs(engine.model(model_path), input_set)
    outcome = SearchOutcome(seed, max_examples)
    budget = max_examples + (shrink_budget if shrink_budget is not None else max(100, 10 * max_examples))
    judged: dict[str, Verdict | None] = {}

    def broken(inputs: dict[str, np.ndarray]) -> bool:
        key = fingerprint(inputs)
        if key not in judged:
            if outcome.runs >= budget:
                return False  # budget spent: the smallest failure found so far stands
            outcome.runs += 1
            verdict = judge_inputs(engine, model_path, config, inputs, tol, output_tolerances)
            judged[key] = verdict if verdict is not None and not verdict.passed else None
            if judged[key] is not None and not outcome.runs_to_first:
                outcome.runs_to_first = outcome.runs
            score = _score(verdict)
            if score is not None:
                target(score, label="distance from the reference")
        return judged[key] is not None

    options = settings(max_examples=max_examples, database=None, deadline=None, verbosity=Verbosity.quiet,
                       phases=(Phase.generate, Phase.target, Phase.shrink), suppress_health_check=list(HealthCheck))
    try:
        found = find(strategy, broken, settings=options, random=random.Random(seed))
    except NoSuchExample:
        return outcome
    outcome.inputs = {k: np.asarray(v) for k, v in found.items()}
    outcome.verdict = judged[fingerprint(found)]
    outcome.name = f"found-{fingerprint(found)}"
    return outcome


def save(outcome: SearchOutcome, folder: Path, stem: str) -> Path:
    """Write the minimal failing input as ``folder/<stem>-<crc>.npz`` (one array per model input)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}-{outcome.name.removeprefix('found-')}.npz"
    np.savez(path, **outcome.inputs)
    outcome.saved = path
    return path


def replay_snippet(model_path: Path, sidecar, set_name: str, saved: Path, keys,
                   rootpath: Path | None = None) -> tuple[Path, str]:
    """The file to add an input set to, and the TOML that replays ``saved`` as input set ``set_name``.

    The path is relative to that file when ``saved`` is under ``rootpath`` (so
    the snippet survives moving the checkout), absolute otherwise.
    """
    if sidecar is not None:
        file, prefix = sidecar.file, sidecar.table
    else:
        file, prefix = Path(model_path).with_name(Path(model_path).name + ".toml"), ""
    header = ".".join(p for p in (prefix, "input_sets", set_name) if p)
    saved = Path(saved).resolve()
    rel = saved.as_posix()
    if rootpath is None or saved.is_relative_to(Path(rootpath).resolve()):
        try:
            rel = Path(os.path.relpath(saved, Path(file).resolve().parent)).as_posix()
        except ValueError:  # another drive on Windows
            pass
    lines = [f"[{header}]"] + [f'{k} = {{ array = "{rel}", key = "{k}" }}' for k in keys]
    return file, "\n".join(lines)


def summarize(inputs: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Per input: shape, range, mean, and for 0/1 arrays the masked fraction."""
    out = {}
    for name, arr in inputs.items():
        a = np.asarray(arr, dtype=np.float64)
        info: dict[str, Any] = {"shape": list(a.shape), "min": float(a.min()) if a.size else None,
                                "max": float(a.max()) if a.size else None,
                                "mean": float(a.mean()) if a.size else None}
        if a.size and np.isin(a, (0.0, 1.0)).all():
            info["ones_fraction"] = float(a.mean())
        out[name] = info
    return out


def describe_inputs(inputs: Mapping[str, np.ndarray]) -> str:
    parts = []
    for name, info in summarize(inputs).items():
        dims = "x".join(map(str, info["shape"]))
        if "ones_fraction" in info:
            parts.append(f"{name} {dims} binary, {info['ones_fraction']:.0%} ones")
        else:
            parts.append(f"{name} {dims} in [{info['min']:.4g}, {info['max']:.4g}], mean {info['mean']:.4g}")
    return "; ".join(parts)


def _score(verdict: Verdict | None) -> float | None:
    """How far from the reference, for hypothesis' targeted phase (finite or None)."""
    if verdict is None:
        return None
    scores = [v.metrics.outside_fraction + min(v.metrics.max_abs / v.metrics.ref_scale, 1e6)
              for v in verdict.outputs if v.metrics is not None]
    finite = [s for s in scores if np.isfinite(s)]
    return float(max(finite)) if finite else None


def seed_from(value: Any) -> Any:
    """``--hypothesis-seed`` as hypothesis reads it: an int when it is one, else the string."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return str(value) if value is not None else None
