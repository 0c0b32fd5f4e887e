"""Goldens: a model's committed outputs, checked on every run and rewritten on request.

One folder per model (layout in docs/bundles.md)::

    GOLDEN_DIR/<model path>.golden/golden.json     what to review: per output shape, dtype, stats, sha256
    GOLDEN_DIR/<model path>.golden/<output>.npy    the values (input set A only)

A golden holds the model's outputs on the reference configuration (CPU,
``high``, 1 thread) for input set A, and is compared at the fp32 tier (or
the tolerances given on the command line / in the ini file).  Only what the
comparison needs is stored: inputs are regenerated from the seed, and the
input set's hash is kept to refuse a golden made from other inputs.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from ..core.files import atomic_write
from ..core.metrics import compare, reference_scale
from ..core.tolerances import Tolerance, resolve
from ..core.verdict import Category, judge_outputs
from ..engine.bundle import array_sha256, machine_info, write_json
from ..engine.bundle_reference import model_identity
from ..engine.explain import failure_message
from ..engine.results import ParityResult
from ..inputs.generate import fingerprint
from ..mnn import backends
from ..mnn.library import mnn_version
from ..mnn.model import ModelError
from ..onnx.variants import is_onnx

if TYPE_CHECKING:  # pragma: no cover
    from ..engine.engine import ParityEngine  # annotations: a run whose checks all run in workers never imports it (issue 22)

SCHEMA = "pytest-mnn-parity-golden/1"
GOLDEN_FILE = "golden.json"
LABEL = "golden"


def golden_folder(root: os.PathLike | str, model_label: str, variant: str | None = None) -> Path:
    """``models/lama.mnn`` -> ``ROOT/models/lama.mnn.golden`` (not ``*.mnn``: a models glob must not match it)."""
    parts = ["up" if p == ".." else p for p in PurePosixPath(model_label).parts if p not in ("/", ".")]
    parts[-1] += (f"@{variant}" if variant else "") + ".golden"
    return Path(root, *parts)


def summary(array: np.ndarray) -> dict[str, Any]:
    """The reviewable description of one output; rounded so a diff shows real changes only."""
    a = np.asarray(array)
    finite = a[np.isfinite(a)] if a.dtype.kind == "f" else a
    stats: dict[str, Any] = {"shape": list(a.shape), "dtype": str(a.dtype), "sha256": array_sha256(a)}
    if finite.size:
        f64 = finite.astype(np.float64)
        stats.update(min=_round(f64.min()), max=_round(f64.max()), mean=_round(f64.mean()), std=_round(f64.std()))
    stats.update(zero_fraction=_round(float(np.count_nonzero(a == 0)) / max(a.size, 1)),
                 nonfinite=int(a.size - finite.size))
    return stats


def _round(x: float) -> float:
    return float(f"{float(x):.7g}")


def _file_name(name: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip(".") or "output"
    candidate, n = f"{base}.npy", 1
    while candidate in taken:
        n += 1
        candidate = f"{base}.{n}.npy"
    taken.add(candidate)
    return candidate


@dataclass
class Golden:
    folder: Path
    data: dict[str, Any]

    @property
    def fingerprint(self) -> str:
        return self.data["input_set"]["fingerprint"]

    def arrays(self) -> dict[str, np.ndarray]:
        """Every output, checked against the sha256 in golden.json."""
        out = {}
        for name, meta in self.data["outputs"].items():
            path = self.folder / meta["file"]
            try:
                array = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise GoldenError(f"{path}: unreadable ({exc}); a Git LFS pointer that was not pulled?") from None
            if array_sha256(array) != meta["sha256"]:
                raise GoldenError(f"{path}: does not match the sha256 in {GOLDEN_FILE} (edited by hand, or "
                                  f"merged from two branches?)")
            out[name] = array
        return out


class GoldenError(ValueError):
    """A golden that exists but cannot be used."""


def read_golden(folder: Path) -> Golden | None:
    path = folder / GOLDEN_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise GoldenError(f"{path}: unreadable ({exc})") from None
    if data.get("schema") != SCHEMA:
        raise GoldenError(f"{path}: schema {data.get('schema')!r}, expected {SCHEMA!r}")
    return Golden(folder, data)


def write_golden(folder: Path, info: dict[str, Any], outputs: Mapping[str, np.ndarray]) -> Golden:
    """Arrays first, golden.json last (each renamed into place); stale .npy files are removed."""
    folder.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    meta = {}
    for name, array in outputs.items():
        file = _file_name(name, taken)
        atomic_write(folder / file, b"", lambda f, a=np.asarray(array): np.save(f, a, allow_pickle=False))
        meta[name] = {"file": file, **summary(array)}
    data = {"schema": SCHEMA, **info, "outputs": meta}
    write_json(folder / GOLDEN_FILE, data)
    for stale in folder.glob("*.npy"):
        if stale.name not in taken:
            stale.unlink()
    return Golden(folder, data)


def changes(old: Golden | None, info: dict[str, Any], outputs: Mapping[str, np.ndarray], tol: Tolerance) -> list[str]:
    """What a rewrite changes, one short phrase each; empty when the golden would be identical."""
    if old is None:
        return [f"new, outputs {', '.join(map(repr, outputs))}"]
    said = []
    for key, what in (("model_sha256", "model sha256"), ("mnn_version", "MNN")):
        if old.data.get(key) != info.get(key):
            said.append(f"{what} {str(old.data.get(key))[:12]} -> {str(info.get(key))[:12]}")
    if old.fingerprint != info["input_set"]["fingerprint"]:
        said.append(f"input set {old.fingerprint} (seed {old.data['input_set']['seed']}) -> "
                    f"{info['input_set']['fingerprint']} (seed {info['input_set']['seed']})")
    try:
        arrays = old.arrays()
    except GoldenError as exc:
        return said + [f"replaces an unusable golden ({exc})"]
    for name in sorted(set(arrays) - set(outputs)):
        said.append(f"output {name!r} removed")
    for name, new in outputs.items():
        if name not in arrays:
            said.append(f"output {name!r} added")
        elif arrays[name].shape != np.shape(new) or arrays[name].dtype != np.asarray(new).dtype:
            said.append(f"output {name!r}: {arrays[name].dtype}{list(arrays[name].shape)} -> "
                        f"{np.asarray(new).dtype}{list(np.shape(new))}")
        elif not np.array_equal(arrays[name], new, equal_nan=True):
            m = compare(new, arrays[name], atol=tol.atol, rtol=tol.rtol)
            where = "within" if m.outside_fraction <= tol.max_outside_fraction and m.cosine >= tol.min_cosine else "OUTSIDE"
            said.append(f"output {name!r}: max|d| {m.max_abs:.3g} ({m.max_abs / reference_scale(arrays[name]):.2g} of "
                        f"its range), {where} the {tol.tier} tier")
    # Provenance alone (another MNN, same bits) is not worth a rewrite.
    return said if any(not s.startswith("MNN ") for s in said) else []


def check_golden(engine: ParityEngine, model_path: os.PathLike | str, root: os.PathLike | str, label: str, *,
                 tolerance_layers: Sequence[tuple[str, Mapping[str, Any] | None]] = (), update: bool = False,
                 update_command: str = "", reproduce: str = "", variant: str | None = None) -> ParityResult:
    """Check (or with ``update`` rewrite) the golden of one model; the result is like a parity item's."""
    config = engine.reference_config
    folder = golden_folder(root, label, variant)
    tol = resolve("CPU", "high", *tolerance_layers, arithmetic="fp32")
    result = ParityResult(label, config, Category.OK, "", tolerance=tol, reference_label=LABEL,
                          reference=f"golden {folder / GOLDEN_FILE}", variant=variant)
    try:
        if is_onnx(model_path):  # an ONNX model's golden is its fp32 conversion's (or the variant's)
            result.variant = variant or "fp32"
            model_path, _ = engine.onnx.converted(model_path, result.variant)
        # The API a parity item of this model would run on (Module API for control flow, see apis.py).
        model = engine.model(model_path, engine.apis.resolve(model_path, None).api)
        outputs, run_log = _golden_outputs(engine, model)
    except ModelError as exc:
        result.category, result.message, result.log = Category.MODEL_ERROR, str(exc), exc.log
        return result
    forward, _ = model.session_backend(config)
    result.backend_used, result.forward_type = backends.forward_name(forward), forward
    inputs_a = engine.inputs(model)[0]
    seed = engine.settings.seed
    # A conversion's bytes differ per run (MNN stamps a random id): an ONNX model is known by its source.
    model_sha = model_identity(engine, model)[1]
    info = {"model": label, "model_sha256": model_sha, "variant": variant,
            "computed_on": config.describe(), "mnn_version": mnn_version(),
            "machine": {k: machine_info()[k] for k in ("system", "machine")},
            "input_set": {"seed": seed, "fingerprint": fingerprint(inputs_a),
                          "inputs": {s.name: {"shape": list(model.shapes[s.name]), "dtype": str(s.dtype)}
                                     for s in model.info.inputs}}}
    result.input_set = f"seeded:{seed} ({info['input_set']['fingerprint']})"
    fix = f"\n  create it: {update_command}" if update_command else ""
    try:
        old = read_golden(folder)
    except GoldenError as exc:
        if not update:
            result.category, result.message = Category.NO_GOLDEN, f"no_golden: {exc}{fix.replace('create', 'rewrite')}"
            return result
        old = None
    if update:
        said = changes(old, info, outputs, tol)
        if said:
            write_golden(folder, info, outputs)
            result.message = f"golden {'written' if old is None else 'rewritten'}: {folder}: {'; '.join(said)}"
        else:
            result.message = f"golden unchanged: {folder}"
        return result
    if old is None:
        result.category = Category.NO_GOLDEN
        result.message = f"no_golden for {label}: {folder / GOLDEN_FILE} does not exist{fix}"
        return result
    if old.fingerprint != info["input_set"]["fingerprint"]:
        theirs = old.data["input_set"]
        shapes = " ".join(f"--mnn-input-shape {n}={'x'.join(map(str, v['shape']))}"
                          for n, v in theirs.get("inputs", {}).items()
                          if tuple(v["shape"]) != tuple(model.shapes.get(n, ())))
        result.category = Category.NO_GOLDEN
        result.message = (f"no_golden for {label}: the golden was made from input set {old.fingerprint} (seed "
                          f"{theirs['seed']}); this run's input set is {info['input_set']['fingerprint']} (seed {seed})"
                          f"\n  fix: run with --mnn-seed {theirs['seed']} {shapes}".rstrip()
                          + (f", or regenerate: {update_command}" if update_command else ""))
        return result
    try:
        golden_arrays = old.arrays()
    except GoldenError as exc:
        result.category, result.message = Category.NO_GOLDEN, f"no_golden: {exc}{fix.replace('create', 'rewrite')}"
        return result
    result.verdict = judge_outputs(outputs, golden_arrays, tol)
    result.category = result.verdict.category
    result.reference = (f"golden {folder / GOLDEN_FILE} (MNN {old.data.get('mnn_version')} on "
                        f"{old.data.get('machine', {}).get('system')} {old.data.get('machine', {}).get('machine')})")
    if not result.passed:
        result.log = run_log
        text = failure_message(result, model, reproduce=reproduce)
        if old.data.get("model_sha256") != model_sha:
            text += (f"\nthe model changed since the golden was written: sha256 "
                     f"{str(old.data.get('model_sha256'))[:16]} -> {model_sha[:16]}")
        if update_command:
            text += f"\nif the change is intended, rewrite the golden: {update_command}"
        result.message = text
    return result


def _golden_outputs(engine: ParityEngine, model) -> tuple[dict[str, np.ndarray], str]:
    """The model itself on the reference configuration, input set A (reusing the reference run when it is that)."""
    if (engine.settings.reference is None or engine.bundle is not None) and engine.onnx.reference_path(model) is None:
        return engine.live_reference(model).outputs_a, ""
    run = model.run(engine.reference_config, engine.inputs(model)[0])
    if not run.ok:
        raise ModelError(model.path, f"cannot compute its golden outputs: runSession returned {run.rc} on "
                                     f"{engine.reference_config.describe()}", "", run.log)
    return run.outputs, run.log
