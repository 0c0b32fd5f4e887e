"""A bundle as the reference: ``--mnn-reference DIR`` or ``DIR::SELECTOR``.

``DIR`` (or ``DIR::reference``): the bundle's own reference outputs for the model
(what the saving run compared against: CPU, high, 1 thread by default).
``DIR::METAL-low``: the bundle's METAL-low outputs.  ``DIR::same``: every
configuration against the bundle's outputs of the same configuration (MNN 3.4's
CPU-low against MNN 3.6's CPU-low).

Nothing different is ever compared silently: the model's sha256 and both input
sets' hashes must match the entry's, or the model is an error saying which hash
differs and how to fix it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from ..core.tolerances import TIERS, tier_for
from ..inputs.generate import fingerprint
from ..mnn.backends import canonical_backend, canonical_precision
from ..mnn.model import model_key, remembered
from .bundle import (
    BUNDLE_FILE,
    REFERENCE,
    SAME,
    BundleError,
    BundleMismatch,
    BundleTrace,
    describe_entry,
    is_bundle,
    load_outputs,
    read_entries,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..inputs.sets import InputSet
    from ..mnn.runner import LoadedModel, RunConfig
    from .results import Reference


@dataclass(frozen=True)
class BundleSpec:
    text: str
    folder: Path
    selector: str  # "reference", "same" or a configuration id such as "METAL-low"

    @property
    def label(self) -> str:
        return f"bundle {self.text.partition('::')[0]}::{self.selector}"


def parse_reference(text: str | None) -> BundleSpec | None:
    """A bundle spec, or None when ``text`` names no bundle (``cpu``, an ``.mnn`` path)."""
    if not text:
        return None
    folder_text, sep, selector = str(text).partition("::")
    folder = Path(folder_text)
    if not sep and not folder.is_dir():
        return None
    if not folder.is_dir() or not is_bundle(folder):
        what = "does not exist" if not folder.exists() else (
            "is not a directory" if not folder.is_dir() else f"is a directory but not an output bundle (no {BUNDLE_FILE})")
        raise BundleError(f"--mnn-reference {text}: {folder_text} {what}; a bundle is made with "
                          f"--mnn-save-outputs {folder_text}")
    return BundleSpec(str(text), folder, canonical_selector(selector, str(text)))


def canonical_selector(selector: str, text: str = "") -> str:
    s = selector.strip()
    if s.lower() in ("", REFERENCE):
        return REFERENCE
    if s.lower() == SAME:
        return SAME
    backend, sep, precision = s.partition("-")
    try:
        if not sep:
            raise ValueError("expected BACKEND-precision")
        return f"{canonical_backend(backend)}-{canonical_precision(precision)}"
    except ValueError as exc:
        raise BundleError(f"--mnn-reference {text}: selector {selector!r}: {exc}; use 'reference', 'same' or a "
                          f"configuration such as METAL-low") from None


class BundleReference:
    """Finds, checks and loads the bundle entry each model x configuration is compared with."""

    def __init__(self, spec: BundleSpec):
        self.spec = spec
        self._entries: list[dict[str, Any]] | None = None
        self._cache: dict[tuple[Path, str], Any] = {}

    @property
    def entries(self) -> list[dict[str, Any]]:
        if self._entries is None:
            self._entries = read_entries(self.spec.folder)
        return self._entries

    def selector_for(self, config: "RunConfig | None") -> str:
        if self.spec.selector != SAME:
            return self.spec.selector
        return config.id if config is not None else REFERENCE

    def reference(self, engine, model: "LoadedModel", config: "RunConfig | None",
                  input_set: "InputSet | None" = None) -> "Reference":
        set_name = input_set.name if input_set is not None else None
        key = (Path(os.path.realpath(model.path)), self.selector_for(config), set_name)

        def load() -> "Reference":
            try:
                return self._load(engine, model, key[1], input_set)
            except BundleError as exc:  # a damaged file: name it, as for any model error
                raise BundleMismatch(model.path, str(exc), "re-save the bundle") from None

        return remembered(self._cache, key, load, errors=(BundleMismatch,))

    def release(self, path: os.PathLike | str) -> None:
        real = Path(os.path.realpath(path))
        for key in [k for k in self._cache if k[0] == real]:
            ref = self._cache.pop(key)
            if getattr(ref, "trace", None) is not None:
                ref.trace.close()

    # -- the checks ----------------------------------------------------------------
    def _load(self, engine, model: "LoadedModel", selector: str,
              input_set: "InputSet | None") -> "Reference":
        from ..mnn.weights import WeightRisk
        from ..trace.record import ActivationRisk
        from .results import Reference

        entry = self._find(engine, model, selector, input_set.name if input_set is not None else None)
        self._check_inputs(engine, model, entry, input_set)
        outputs_a, outputs_b = load_outputs(self.spec.folder, entry)
        layers = entry.get("layers")
        trace = BundleTrace(self.spec.folder, layers) if layers else None
        fp16 = [ActivationRisk(**r) for r in entry.get("fp16_risks") or []]
        weights = [WeightRisk(r["op"], r["type"], r["role"], r["count"], r["total"], r["kind"], r["worst"])
                   for r in entry.get("fp16_weight_risks") or []]
        description = f"bundle {self.spec.folder} {describe_entry(entry)}"
        return Reference(description, outputs_a, outputs_b, fp16, weights, label=self.spec.label,
                         arithmetic=entry_tier(entry), trace=trace)

    def _find(self, engine, model: "LoadedModel", selector: str,
              set_name: str | None) -> dict[str, Any]:
        folder = self.spec.folder
        field, sha, name, variant = model_identity(engine, model)
        candidates = [e for e in self.entries if e.get(field) == sha and e.get("input_set") == set_name
                      and (field == "model_sha256" or e.get("variant") == variant)]
        if not candidates:
            same_name = [e for e in self.entries if PurePosixPath(e["model"]).name == name and e.get(field)]
            if same_name:
                e = same_name[0]
                raise BundleMismatch(
                    model.path, f"model hash mismatch: bundle {folder} holds outputs of {e['model']} with sha256 "
                                f"{e[field][:16]}, this file has sha256 {sha[:16]}: they are different models",
                    "compare the model file the bundle was saved from, or save a new bundle from this one "
                    "(--mnn-save-outputs)")
            held = sorted({f"{e['model']} (sha256 {e['model_sha256'][:12]})" for e in self.entries}) or ["nothing"]
            which = f" for input set {set_name!r}" if set_name else ""
            raise BundleMismatch(model.path, f"bundle {folder} holds no outputs of this model{which} (sha256 "
                                             f"{sha[:12]}); it holds {', '.join(held[:6])}",
                                 f"save them with: pytest --mnn-only --mnn-model {model.path} --mnn-save-outputs "
                                 f"{folder}")
        chosen = [e for e in candidates
                  if (e["kind"] == REFERENCE if selector == REFERENCE else
                      e["kind"] != REFERENCE and e["config"]["id"] == selector)]
        if not chosen:
            have = sorted({REFERENCE if e["kind"] == REFERENCE else e["config"]["id"] for e in candidates})
            raise BundleMismatch(model.path, f"bundle {folder} has no {selector} outputs of this model; it has "
                                             f"{', '.join(have)}",
                                 f"pick one with --mnn-reference {folder}::{have[0]}, or save {selector} into the "
                                 f"bundle on a machine that has it")
        same_label = [e for e in chosen if PurePosixPath(e["model"]).name == name]
        return max(same_label or chosen, key=lambda e: e.get("created", ""))

    def _check_inputs(self, engine, model: "LoadedModel", entry: dict[str, Any],
                      input_set: "InputSet | None") -> None:
        inputs_a, inputs_b = engine.inputs(model, input_set)
        mine = (fingerprint(inputs_a), fingerprint(inputs_b))
        sets = entry["input_sets"]
        theirs = (sets["A"]["fingerprint"], sets["B"]["fingerprint"])
        if mine == theirs:
            return
        seed = engine.settings.seed
        their_seed = sets["A"]["seed"]
        shapes = {name: tuple(spec["shape"]) for name, spec in (entry.get("inputs") or {}).items()}
        my_shapes = {s.name: tuple(model.shapes[s.name]) for s in model.info.inputs}
        fix = []
        if their_seed != seed:
            fix.append(f"--mnn-seed {their_seed}")
        fix += [f"--mnn-input-shape {name}={'x'.join(map(str, dims))}" for name, dims in shapes.items()
                if my_shapes.get(name) != dims]
        how = (f"run with {' '.join(fix)} (the bundle's settings)" if fix else
               "the seed and shapes agree, so the input generator differs (another pytest-mnn-parity or numpy "
               "version?): save the bundle again with this version")
        raise BundleMismatch(model.path, f"input-set hash mismatch: the bundle's outputs were computed from input sets "
                                         f"A {theirs[0]} / B {theirs[1]} (seed {their_seed}); this run's are "
                                         f"A {mine[0]} / B {mine[1]} (seed {seed})", how)


def model_identity(engine, model: "LoadedModel") -> tuple[str, str, str, str | None]:
    """(manifest field, sha256, file name, variant) that identify a model across machines.

    A conversion of an ONNX model is identified by its source's bytes and the variant: MNN's converter
    stamps each .mnn with a random id, so the converted bytes differ on every machine and cache.
    """
    from ..mnn.model import file_sha256

    key = model_key(model.path)
    source = engine.onnx.source_of(key)
    if source is not None:
        return "source_sha256", file_sha256(Path(source)), Path(source).name, engine.onnx.variant_of(key)
    return "model_sha256", model.info.sha256, model.path.name, None


def entry_tier(entry: dict[str, Any]) -> str:
    """The tolerance tier the entry's own arithmetic needs (fp16 for a GPU run at low precision)."""
    kind = (entry.get("arithmetic") or {}).get("kind")
    if kind in TIERS:
        return kind
    config = entry["config"]
    return tier_for(config["backend"], config["precision"])


def open_bundle_reference(text: str | None) -> BundleReference | None:
    spec = parse_reference(text)
    return BundleReference(spec) if spec is not None else None
