"""The engine's ONNX side: converting variants, ONNX Runtime as reference, localising against ONNX.

``ParityEngine`` owns one ``OnnxSide``; everything ONNX-specific lives here so
the engine's own flow stays the same for ``.mnn`` and ``.onnx`` models.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import numpy as np

from ..core.tolerances import Tolerance
from ..inputs.generate import fingerprint
from ..mnn.model import ModelError, model_key, remembered
from ..mnn.runner import LoadedModel, RunConfig, RunOutput
from ..onnx.convert import ConversionError
from ..onnx.variants import ConversionCache, is_onnx
from ..trace.record import RiskScanner

if TYPE_CHECKING:  # pragma: no cover
    from .results import ParityResult, Reference


class OnnxSide:
    def __init__(self, engine):
        self.engine = engine
        self._cache: ConversionCache | None = None
        self._conversions: dict[tuple[Path, str], tuple[Path, str] | ModelError] = {}
        self._sources: dict[Path, tuple[Path, str]] = {}  # converted .mnn -> (ONNX source, variant)
        self._runtimes: dict[Path, object] = {}
        self._outputs: dict[tuple, tuple[dict, dict]] = {}
        self._risks: dict[tuple, list] = {}
        self._node_names: dict[Path, list[str] | None] = {}
        # ONNX files ONNX Runtime refused (by key), with its words: their models fall back to another reference.
        self._unloadable: dict[Path, str] = {}

    @property
    def cache(self) -> ConversionCache:
        if self._cache is None:
            settings = self.engine.settings
            self._cache = ConversionCache(settings.convert_cache, settings.converter_flags)
        return self._cache

    # -- conversion -------------------------------------------------------------
    def converted(self, source, variant: str) -> tuple[Path, str]:
        """The ``.mnn`` of ``source`` converted as ``variant`` and a line saying how; ``ModelError`` if it fails."""

        key = (model_key(source), variant)

        def convert() -> tuple[Path, str]:
            described = " ".join(self.cache.flags(variant)) or "no flags"
            try:
                target = self.cache.convert(source, variant)
            except ConversionError as exc:
                raise ModelError(source, f"MNN cannot convert it (variant {variant}: MNNConvert {described}): "
                                         f"{exc.reason}", exc.hint, exc.log) from None
            self._sources[model_key(target)] = (Path(source), variant)
            return target, f"{source}, variant {variant} (MNNConvert {described}), cached as {target}"

        return remembered(self._conversions, key, convert)

    def release(self, key: Path) -> list[Path]:
        """Forget an ONNX source; returns its converted models for the engine to release."""
        self._runtimes.pop(key, None)
        self._node_names.pop(key, None)
        self._unloadable.pop(key, None)
        for memo in (self._outputs, self._risks):
            for k in [k for k in memo if k[0] == key]:
                memo.pop(k)
        released = []
        for conv_key in [k for k in self._conversions if k[0] == key]:
            done = self._conversions.pop(conv_key)
            if not isinstance(done, ModelError):
                released.append(done[0])
        return released

    def source_of(self, key: Path) -> Path | None:
        """The ONNX file a converted model (by its cache key) was made from; None for any other model."""
        source = self._sources.get(key)
        return source[0] if source else None

    def variant_of(self, key: Path) -> str | None:
        """The conversion variant a converted model (by its cache key) was made as; None for any other model."""
        source = self._sources.get(key)
        return source[1] if source else None

    def declared_dims(self, key: Path) -> dict:
        """For a converted model (by its cache key), the input dimensions its ONNX file declares; {} otherwise."""
        source = self.source_of(key)
        if source is None:
            return {}
        from ..onnx.runtime import declared_dims  # noqa: PLC0415 - imports onnx

        try:
            return declared_dims(source)
        except Exception:  # noqa: BLE001 - only fills a message; the conversion already read the file
            return {}

    def node_names(self, source) -> list[str] | None:
        """The ONNX graph's node names, as the localisation's layer table shows them; None if unreadable."""
        key = model_key(source)
        if key not in self._node_names:
            from ..onnx.localise import node_names  # noqa: PLC0415 - imports onnx

            try:
                self._node_names[key] = node_names(source)
            except Exception:  # noqa: BLE001 - onnx raises many types for a bad file; conversion says why
                self._node_names[key] = None
        return self._node_names[key]

    # -- reference --------------------------------------------------------------
    def reference_path(self, model: LoadedModel) -> Path | None:
        """The ONNX file whose ORT outputs are the reference of ``model``, if any."""

        given = self.engine.settings.reference
        if given:
            return Path(given) if is_onnx(given) else None
        source = self._sources.get(model_key(model.path))
        if source is None or model_key(source[0]) in self._unloadable:
            return None  # ONNX Runtime cannot load it: the model is judged as a .mnn would be (see fallback_note)
        return source[0]

    def fallback_note(self, model: LoadedModel) -> str:
        """Why a converted model has no ONNX Runtime reference ("" when it has one or is no conversion)."""
        source = self._sources.get(model_key(model.path))
        return self._unloadable.get(model_key(source[0]), "") if source is not None else ""

    def try_reference(self, model: LoadedModel, inputs_a, inputs_b) -> "Reference | None":
        """``reference``, or None where ONNX Runtime refuses the model the run converted itself (an old opset):
        remembered, so the engine falls back to MNN's own reference configuration with a note, never to a bare
        model_error.  An ONNX file named by --mnn-reference is the user's choice and fails as before."""
        from ..onnx.runtime import RuntimeLoadError  # noqa: PLC0415

        try:
            return self.reference(model, inputs_a, inputs_b)
        except RuntimeLoadError as exc:
            if self.engine.settings.reference:
                raise
            self._unloadable[model_key(exc.path)] = exc.reason
            return None

    def stored_reference(self, model: LoadedModel, input_set, inputs_a, inputs_b) -> "Reference":
        """An ONNX test-data set's stored outputs as the reference of input set A (``inputs.test_data``).

        They exist for A only; B (A mirrored, for the stale-output check) is judged against ONNX Runtime where it
        loads the model, else against MNN's own reference configuration."""
        from ..inputs.test_data import REFERENCE_LABEL  # noqa: PLC0415
        from ..onnx.runtime import RuntimeLoadError, as_mnn_dtype  # noqa: PLC0415
        from .results import Reference, ReferenceRunError  # noqa: PLC0415

        expected = {name: as_mnn_dtype(np.asarray(array)) for name, array in input_set.expected.items()}
        outputs_b, note, path = None, "", self.reference_path(model)
        if path is not None:
            try:
                runtime = self.runtime(path)
                outputs_b, b_from = dict(runtime.run(inputs_b)), "ONNX Runtime"
            except RuntimeLoadError as exc:
                if not self.engine.settings.reference:
                    self._unloadable[model_key(exc.path)] = exc.reason
                note = exc.reason
            except ModelError as exc:  # ORT loads it but cannot run B: set A's stored outputs still judge
                note = exc.reason
        if outputs_b is None:
            config = self.engine.reference_config
            run = model.run(config, inputs_b)
            if not run.ok:
                raise ReferenceRunError(model.path, run, model.session_backend(config)[1])
            outputs_b, b_from = run.outputs, f"this model on {config.describe()}"
            note = note or self.fallback_note(model)
            if note:
                b_from += f" ({note})"
        description = (f"stored outputs {input_set.expected_from} (ONNX test data); set B (A mirrored) against "
                       f"{b_from}")
        return Reference(description, expected, dict(outputs_b), label=REFERENCE_LABEL)

    def runtime(self, path: Path):
        from ..onnx.runtime import OnnxRuntimeModel  # noqa: PLC0415

        key = model_key(path)

        def load() -> OnnxRuntimeModel:
            if not Path(path).is_file():
                raise ModelError(path, "no such file (named as the ONNX reference)",
                                 "check the path given to --mnn-reference")
            return OnnxRuntimeModel(path)

        return remembered(self._runtimes, key, load)

    def reference(self, model: LoadedModel, inputs_a, inputs_b) -> "Reference":
        from .results import Reference

        path = self.reference_path(model)
        runtime = self.runtime(path)
        runtime.check_interface(model)
        # Every variant of one ONNX model gets the same inputs: ORT runs once for all.
        key = (model_key(path), fingerprint(inputs_a), fingerprint(inputs_b))
        if key not in self._outputs:
            self._outputs[key] = (runtime.run(inputs_a), runtime.run(inputs_b))
        outputs_a, outputs_b = self._outputs[key]
        risks = self._risk_scan(model, inputs_a, key) if self.engine.settings.layers != "off" else []
        return Reference(runtime.description, dict(outputs_a), dict(outputs_b), risks)

    def _risk_scan(self, model: LoadedModel, inputs, key: tuple) -> list:
        """fp16 risks from fp32 activations: ORT exposes none, so one MNN run of the fp32
        conversion (the model itself for a given .mnn) on the reference configuration."""

        if key not in self._risks:
            source = self._sources.get(model_key(model.path))
            scanned = model
            try:
                if source is not None and source[1] != "fp32":
                    scanned = self.engine.model(self.converted(source[0], "fp32")[0])
                elif getattr(model, "api", "session") != "session":
                    scanned = self.engine.model(model.path)  # per-op callbacks exist on sessions only
            except ModelError:
                scanned = None
            scanner = RiskScanner()
            # A model a session cannot run (control flow) has no activation scan: no risks, never a crash.
            if scanned is not None and getattr(scanned, "api", "session") == "session":
                scanned.run(self.engine.reference_config, inputs, observer=scanner)
            self._risks[key] = scanner.risks
        return list(self._risks[key])

    def step_model(self, model: LoadedModel) -> "RuntimeSteps":
        """ONNX Runtime with ``model``'s interface, to run a stream's reference step by step."""
        runtime = self.runtime(self.reference_path(model))
        runtime.check_interface(model)
        return RuntimeSteps(runtime, model)

    # -- localisation -----------------------------------------------------------
    def probe_flags(self, model: LoadedModel) -> tuple[tuple[str, ...], str]:
        """The MNNConvert flags that re-convert ``model``'s ONNX reference as ``model`` was made (the variant's,
        for a conversion of this run), and a note when they are a guess ("" otherwise)."""
        source = self._sources.get(model_key(model.path))
        if source is not None and not self.engine.settings.reference:
            return self.cache.flags(source[1]), ""
        return self.cache.extra_flags, (
            f"{model.path} was not converted by this run: probes convert {self.reference_path(model)} without "
            f"variant flags; if the failure is not reproduced, test the ONNX file itself with --mnn-model "
            f"{self.reference_path(model)} --mnn-convert <variant>")

    def localise(self, result: "ParityResult", model: LoadedModel, config: RunConfig, tol: Tolerance,
                 inputs: Mapping[str, np.ndarray], layer_tolerances: Mapping[str, Tolerance] | None = None) -> None:
        """Fill ``result.trace`` and ``first_divergent_layer`` with the ONNX node to blame."""
        from ..onnx import localise as onnx_trace  # noqa: PLC0415

        if result.passed or result.verdict is None:
            return  # every probe costs a conversion: only failures are localised against ONNX
        failing = next((v.name for v in result.verdict.outputs if not v.passed), None)
        if failing is None:
            return
        onnx_path = self.reference_path(model)
        flags, note = self.probe_flags(model)
        try:
            # The shapes the model itself was loaded with (--mnn-input-shape over a sidecar's [shapes]): probes
            # of a dynamic model need them as much as the model did.
            shapes = dict(getattr(model, "shapes", None) or self.engine.settings.input_shapes)
            trace = onnx_trace.localise(onnx_path, flags, self.cache, config, inputs, tol, shapes, failing,
                                        layer_tolerances=layer_tolerances)
        except ImportError as exc:
            trace = onnx_trace.OnnxTraceResult([], [], [], onnx_trace.METHOD,
                                               notes=[f"localisation needs the onnx package ({exc})"])
        if note:
            trace.notes.insert(0, note)
        result.trace = trace
        if trace.first_divergent is not None:
            result.first_divergent_layer = trace.first_divergent.as_dict()


class RuntimeSteps:
    """ONNX Runtime behind the interface a stream runs (``run(config, inputs) -> RunOutput``): the stream of an
    ONNX model is compared against ONNX Runtime's own stream, as its single steps are."""

    api = "onnxruntime"

    def __init__(self, runtime, model: LoadedModel):
        self.runtime, self.path = runtime, runtime.path
        self.info, self.shapes = model.info, model.shapes

    def run(self, config: RunConfig, inputs: Mapping[str, np.ndarray]) -> RunOutput:
        started = time.perf_counter()
        outputs = dict(self.runtime.run(inputs))  # a step ORT cannot run raises ModelError, naming the file
        return RunOutput(outputs, 0, "", time.perf_counter() - started, -1)
