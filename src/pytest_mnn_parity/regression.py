"""The pytest side of output bundles and goldens.

``--mnn-save-outputs DIR``: after each item, its outputs (and once per model
and process, the reference's) are written into the bundle at once, so memory
stays bounded; pytest-xdist workers write fragments side by side and the
controller merges the index at the end.  ``--mnn-golden DIR``: one extra item
per model, ``MODEL::golden``.
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from . import __version__
from . import backends
from .bundle_reference import model_identity
from .bundle import REFERENCE, SCHEMA, BundleError, BundleWriter, entry_id, machine_info, now
from .golden import LABEL as GOLDEN_LABEL, check_golden
from .inputs import fingerprint
from .items import PARITY_RUN, Case, ModelLoadFailure, ParityItem, node_id_path
from .mnn_import import mnn_version
from .model import file_sha256
from .parity import ParityEngine, ParityResult, Reference
from .runner import REFERENCE_CONFIG, LoadedModel, RunConfig
from .trace import record_reference
from .verdict import Category

if TYPE_CHECKING:  # pragma: no cover
    from .options import Options


class GoldenItem(ParityItem):
    """``MODEL::golden``: the model on CPU/high/1 thread against its committed golden."""

    def setup(self) -> None:
        self.result = self.config.stash[PARITY_RUN].regression.check_golden(self)
        if self.result.category is Category.MODEL_ERROR:
            raise ModelLoadFailure(self.result.message)


class Regression:
    def __init__(self, options: "Options", engine: ParityEngine):
        self.options = options
        self.engine = engine
        self.writer = BundleWriter(options.save_outputs) if options.save_outputs else None
        self.index: dict[str, Any] | None = None
        self._references_saved: set[str] = set()

    # -- session ---------------------------------------------------------------------
    def configure(self, config: pytest.Config) -> None:
        if self.writer is not None and not hasattr(config, "workerinput"):
            try:
                self.writer.start()
            except (BundleError, OSError) as exc:
                raise pytest.UsageError(str(exc)) from None

    def finish(self) -> None:
        """Controller only: merge the fragments every process wrote into the bundle's index."""
        if self.writer is not None and self.options.models:
            self.index = self.writer.finish()

    def items(self, collector) -> list[pytest.Item]:
        if self.options.golden is None:
            return []
        return [GoldenItem.from_parent(collector, name=GOLDEN_LABEL, case=Case(REFERENCE_CONFIG))]

    # -- goldens ---------------------------------------------------------------------
    def check_golden(self, item: GoldenItem) -> ParityResult:
        opts = self.options
        label = node_id_path(item.model_path, item.config.rootpath)
        base = f"{opts.reproduce_command(label, 'CPU', 'high')} --mnn-golden {shlex.quote(str(opts.golden))}"
        return check_golden(self.engine, item.model_path, opts.golden, label, update=opts.update_golden,
                            tolerance_layers=[("ini", opts.tolerance_ini), ("command line", opts.tolerance_cli)],
                            update_command=f"{base} --mnn-update-golden", reproduce=base, variant=item.case.variant)

    # -- bundles ---------------------------------------------------------------------
    def after_check(self, item: ParityItem, result: ParityResult) -> None:
        """Write this item's outputs into the bundle now, then let go of them."""
        computed, result.computed = result.computed, None
        if self.writer is None or computed is None:
            return
        model, input_set = computed.model, computed.input_set
        variant = item.case.variant
        key = f"{os.path.realpath(model.path)}|{variant}|{item.case.input_set}"
        if key not in self._references_saved and self.engine.bundle is None:
            # A reference read from another bundle is not saved again: it was not computed here.
            self._references_saved.add(key)
            self._save_reference(model, result.model, variant, input_set)
        config = item.run_config
        manifest = self._manifest(model, result.model, variant, config, input_set, kind="config", case_id=item.case.id,
                                  description=f"{result.model} on {config.describe()}",
                                  backend_used=result.backend_used, forward_type=result.forward_type,
                                  arithmetic=result.arithmetic, category=result.category.value,
                                  compared_with=result.reference,
                                  reference=self.engine.reference(model, input_set, config))
        trace = None
        if self.options.layers == "always":
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
            forward, _ = ref_model.session_backend(REFERENCE_CONFIG)
            described = f"{engine.settings.reference or label} on {REFERENCE_CONFIG.describe()}"
            backend, arithmetic = backends.forward_name(forward), backends.probe_arithmetic("CPU", "high")
            ref_sha = ref_model.info.sha256
            if self.options.layers == "always":
                # The engine traced the reference while checking (layers "always"): reuse its recording.
                trace = engine._reference_trace(model, engine.inputs(model, input_set)[0], input_set)
        case_id = f"{input_set.name}-{REFERENCE}" if input_set is not None else REFERENCE
        manifest = self._manifest(model, label, variant, REFERENCE_CONFIG, input_set, kind=REFERENCE, case_id=case_id,
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

    # -- terminal --------------------------------------------------------------------
    def summary_lines(self, records: list[dict[str, Any]]) -> list[str]:
        lines = []
        goldens = [r for r in records if r.get("reference_label") == GOLDEN_LABEL and r["outcome"] == "passed"
                   and r.get("message")]
        for r in goldens:
            lines.append(r["message"])
        if goldens:
            counts: dict[str, int] = {}
            for r in goldens:
                word = r["message"].split(":", 1)[0].split()[-1]
                counts[word] = counts.get(word, 0) + 1
            lines.append(f"goldens in {self.options.golden}: " + ", ".join(f"{n} {w}" for w, n in counts.items()))
        if self.index is not None:
            lines.append(f"MNN output bundle: {self.options.save_outputs} ({len(self.index['entries'])} entries, "
                         f"MNN {', '.join(self.index['mnn_versions']) or '-'})")
        return lines
