"""Saving one checked configuration's outputs into a bundle (``--mnn-save-outputs``), without pytest.

The plugin (``regression.Regression``) saves in-process results with it; an
isolated worker (``worker.py``) saves its own results with it, since the
outputs, the loaded model and its reference live in the worker.  Once per
model, input set and process, the reference's outputs are saved too (a fresh
worker saves it again under the same id: the file is replaced, not doubled).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.version import __version__
from ..engine.bundle import REFERENCE, SCHEMA, BundleWriter, entry_id, machine_info, now
from ..engine.bundle_reference import model_identity
from ..engine.results import Computed, ParityResult, Reference
from ..inputs.generate import fingerprint
from ..mnn import backends
from ..mnn import arithmetic as mnn_arithmetic
from ..mnn.library import mnn_version
from ..mnn.model import file_sha256
from ..mnn.runner import LoadedModel, RunConfig
from ..trace.record import record_reference

if TYPE_CHECKING:  # pragma: no cover
    from ..engine.engine import ParityEngine  # annotations: a run whose checks all run in workers never imports it (issue 22)


class BundleSaver:
    def __init__(self, engine: ParityEngine, writer: BundleWriter, layers: str):
        self.engine = engine
        self.writer = writer
        self.layers = layers
        self._references_saved: set[str] = set()

    def save(self, result: ParityResult, computed: Computed, *, variant: str | None, config: RunConfig,
             case_id: str, set_name: str | None) -> None:
        """Save ``computed`` (``result.model`` is the model's label, as the report shows it)."""
        model, input_set = computed.model, computed.input_set
        key = f"{os.path.realpath(model.path)}|{variant}|{set_name}"
        if key not in self._references_saved and self.engine.bundle is None:
            # A reference read from another bundle is not saved again: it was not computed here.
            self._references_saved.add(key)
            self._save_reference(model, result.model, variant, input_set)
        manifest = self._manifest(model, result.model, variant, config, input_set, kind="config", case_id=case_id,
                                  description=f"{result.model} on {config.describe()}",
                                  backend_used=result.backend_used, forward_type=result.forward_type,
                                  arithmetic=result.arithmetic, category=result.category.value,
                                  compared_with=result.reference,
                                  reference=self.engine.reference(model, input_set, config))
        trace = None
        if self.layers == "always":
            trace, _ = record_reference(model, config, self.engine.inputs(model, input_set)[0])
        try:
            self.writer.save_entry(manifest, computed.outputs_a, computed.outputs_b, trace=trace)
        finally:
            if trace is not None:
                trace.close()

    def _save_reference(self, model: LoadedModel, label: str, variant: str | None, input_set) -> None:
        engine = self.engine
        reference = engine.reference(model, input_set)
        onnx = engine.onnx.reference_path(model)
        trace = None
        if onnx is not None:  # ONNX Runtime on the source model
            described, backend, forward, arithmetic = f"{onnx} on ONNX Runtime", "onnxruntime", None, None
            ref_sha = file_sha256(Path(onnx))
        else:
            ref_model = engine.reference_model(model)
            forward, _ = ref_model.session_backend(engine.reference_config)
            described = f"{engine.settings.reference or label} on {engine.reference_config.describe()}"
            backend, arithmetic = backends.forward_name(forward), mnn_arithmetic.probe_arithmetic("CPU", "high")
            ref_sha = ref_model.info.sha256
            if self.layers == "always":
                # The engine traced the reference while checking (layers "always"): reuse its recording.
                trace = engine.reference_trace(model, engine.inputs(model, input_set)[0], input_set)
        case_id = f"{input_set.name}-{REFERENCE}" if input_set is not None else REFERENCE
        manifest = self._manifest(model, label, variant, engine.reference_config, input_set, kind=REFERENCE, case_id=case_id,
                                  description=described, backend_used=backend, forward_type=forward,
                                  arithmetic=arithmetic, category=None, compared_with=None, reference=reference)
        manifest["reference_model_sha256"] = ref_sha
        self.writer.save_entry(manifest, reference.outputs_a, reference.outputs_b, trace=trace)

    def _manifest(self, model: LoadedModel, label: str, variant: str | None, config: RunConfig, input_set, *,
                  kind: str, case_id: str, description: str, backend_used, forward_type, arithmetic, category,
                  compared_with, reference: Reference) -> dict[str, Any]:
        inputs_a, inputs_b = self.engine.inputs(model, input_set)
        seed = self.engine.settings.seed
        named = input_set is not None  # a named set's B is its A mirrored, not seed + 1
        field, sha, _, _ = model_identity(self.engine, model)
        return {
            "schema": SCHEMA, "id": entry_id(label, variant, case_id), "kind": kind, "created": now(),
            "model": label, "model_sha256": model.info.sha256, "variant": variant,
            "source_sha256": sha if field == "source_sha256" else None,
            "input_set": input_set.name if named else None,
            "config": {"id": config.id, "backend": config.backend, "precision": config.precision,
                       "threads": config.threads},
            "description": description, "backend_used": backend_used, "forward_type": forward_type,
            "arithmetic": None if arithmetic is None else {"kind": arithmetic.kind, "probe_errors": arithmetic.errors},
            "category": category, "compared_with": compared_with,
            "seed": seed,
            "input_sets": {"A": {"seed": seed, "fingerprint": fingerprint(inputs_a)},
                           "B": {"seed": None if named else seed + 1, "fingerprint": fingerprint(inputs_b)}},
            "inputs": {s.name: {"shape": list(model.shapes[s.name]), "dtype": str(s.dtype), "layout": s.layout}
                       for s in model.info.inputs},
            "fp16_risks": [r.as_dict() for r in reference.fp16_risks],
            "fp16_weight_risks": [r.as_dict() for r in reference.weight_risks],
            "mnn_version": mnn_version(), "machine": machine_info(), "tool": f"pytest-mnn-parity {__version__}",
        }
