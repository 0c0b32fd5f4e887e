"""The parity engine: run a model on a configuration and judge it against a reference.

Usable without pytest::

    from pytest_mnn_parity import ParityEngine, RunConfig
    engine = ParityEngine()
    result = engine.check("lama.mnn", RunConfig("CPU", "low"))
    print(result.category, result.message)

The engine caches what is expensive: loaded models (with their sessions) and
reference outputs, once per model and input set.
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..core.tolerances import Tolerance, looser_tier, resolve
from ..core.verdict import Category, PreparedReferences, Verdict, judge_outputs, prepare_references, worst
from ..inputs.generate import fingerprint, generate_inputs
from ..inputs.sets import InputSet
from ..mnn import backends
from ..mnn import arithmetic as mnn_arithmetic
from ..mnn.failures import SHAPES_HINT, last_lines, mnn_said, runtime_error_text, runtime_hint
from ..mnn.limits import nonfinite_inputs
from ..mnn.model import ModelError, model_key, remembered
from ..mnn.runner import LoadedModel, RunConfig, check_same_interface, reference_config
from ..mnn.weights import WeightRisk, fp16_weight_risks, op_names, op_types
from ..onnx.variants import is_onnx
from ..trace.record import ReferenceTrace, RiskScanner, record_reference
from .bundle_reference import open_bundle_reference
from .request import Checker, CheckRequest
from .results import (
    Computed,
    EmptyReferenceOutputs,
    ParityResult,
    ParitySettings,
    Reference,
    ReferenceRunError,
)

# What only a failing, traced or pictured check needs is imported by its first use: a worker imports this module
# before it says it is ready, on a small run's critical path, and most checks pass (issue 22).
def failure_message(*args: Any, **kwargs: Any) -> str:
    from .explain import failure_message as explain  # noqa: PLC0415

    return explain(*args, **kwargs)


def trace_target(*args: Any, **kwargs: Any) -> Any:
    from ..trace.compare import trace_target as trace  # noqa: PLC0415

    return trace(*args, **kwargs)


def capture_layers(*args: Any, **kwargs: Any) -> Any:
    from ..trace.capture import capture_layers as capture  # noqa: PLC0415

    return capture(*args, **kwargs)


# Categories where the outputs exist and can be traced layer by layer.
_TRACEABLE = {Category.OK, Category.SHAPE_MISMATCH, Category.NON_FINITE, Category.ZERO_OUTPUT, Category.PARTIAL_ZERO,
              Category.CONSTANT_OUTPUT, Category.STALE_OUTPUT, Category.MISMATCH}


# An output's measured floor is this many times its spread between two CPU thread counts: another
# implementation of the same fp32 sums (a GPU kernel) reorders them as much again.
NOISE_FACTOR = 2.0


# A weight tensor is named only when this share of it would be lost: a few
# rounding-noise entries (1e-17 in a DFT matrix) are not a risk.
WEIGHT_RISK_MIN_FRACTION = 0.2


class ParityEngine(Checker):
    def __init__(self, settings: ParitySettings | None = None):
        self.settings = settings or ParitySettings()
        self._models: dict[Path, LoadedModel | ModelError] = {}
        self._references: dict[Path, Reference | ModelError] = {}
        self._inputs: dict[Path, tuple[dict, dict]] = {}
        self._reference_traces: dict[Path, ReferenceTrace] = {}
        self._fingerprints: dict[Path, str] = {}
        # Per model: its op types (``tolerance`` asks for every configuration; ``op_types`` itself stats and
        # resolves the path each time to key its cache by file version, 25 us a check).
        self._op_types: dict[Path, tuple[str, ...]] = {}
        # Per reference model: the fp16 weight scan, which depends on the file alone, once for all of its input
        # sets (each named set computes a reference of its own).
        self._weight_risks: dict[Path, list[WeightRisk]] = {}
        # Per-model input shapes (from a sidecar) and where each came from.
        self._model_shapes: dict[Path, tuple[dict[str, tuple[int, ...]], str]] = {}
        self._nonfinite: dict[Path, dict | None] = {}
        # The last input-set pair a check scanned for NaN/Inf, and what it found (see _nonfinite_of).
        self._last_nonfinite: tuple | None = None
        # The last reference judged against, prepared (``prepare_references``): a model's checks come one after
        # another, each judged against the same reference.
        self._last_prepared: tuple[Reference, PreparedReferences] | None = None
        self._provided: set[Path] = set()
        self._noise: dict[Any, dict[str, float]] = {}
        self._reference_config: RunConfig | None = None
        from .apis import ApiSide  # noqa: PLC0415
        from .onnx_side import OnnxSide  # noqa: PLC0415 - it uses this module's types
        from .stream import StreamSide  # noqa: PLC0415
        from .sweep_side import SweepSide  # noqa: PLC0415

        self.onnx = OnnxSide(self)
        self.apis = ApiSide(self)
        self.streams = StreamSide(self)
        self.sweeps = SweepSide(self)
        # A bundle directory as --mnn-reference: its saved outputs replace the reference run.
        self.bundle = open_bundle_reference(self.settings.reference)

    @property
    def reference_config(self) -> RunConfig:
        """CPU, high, at the items' thread count (``runner.reference_config`` says why)."""
        cached = self._reference_config
        if cached is None or cached.threads != self.settings.threads:
            cached = self._reference_config = reference_config(self.settings.threads)
        return cached

    # -- models -----------------------------------------------------------------
    def model(self, path: os.PathLike | str, api: str = "session") -> LoadedModel:
        """The loaded model, loading it once; a load failure is remembered and re-raised.

        ``api="module"`` gives the model loaded through MNN's Module API instead
        (``module_runner.ModuleModel``, same interface).
        """
        if api == "module":
            return self.apis.module(path)
        key = model_key(path)

        def load() -> LoadedModel:
            shapes, sources = self.shapes_for(key)
            return LoadedModel(Path(path), shapes, shape_sources=sources, max_input_mb=self.settings.max_input_mb,
                               declared_dims=self.onnx.declared_dims(key),
                               source_name=getattr(self.onnx.source_of(key), "name", ""))

        return remembered(self._models, key, load)

    def user_label(self, path: os.PathLike | str, name_only: bool = False) -> str | None:
        """How messages name a converted model: the user's ``.onnx`` and the variant, never the hash-named file
        in the conversion cache; None for a model that is not a conversion."""
        key = model_key(path)
        source = self.onnx.source_of(key)
        if source is None:
            return None
        return f"{source.name if name_only else source} (its {self.onnx.variant_of(key)} conversion)"

    def layer_names(self, path: os.PathLike | str) -> list[str] | None:
        """The names a per-layer tolerance of this model can match: the op names of an ``.mnn``, the node names
        of an ``.onnx`` (its failures are localised to ONNX nodes); None when the file cannot be read for them."""
        if is_onnx(path):
            return self.onnx.node_names(path)
        if self.settings.reference and is_onnx(self.settings.reference):  # localised against that ONNX model
            return self.onnx.node_names(self.settings.reference)
        try:
            return op_names(path)
        except (OSError, ValueError):
            return None

    def release(self, path: os.PathLike | str) -> None:
        """Free a model's interpreter and sessions (MNN frees sessions with the interpreter only)."""
        key = model_key(path)
        for converted in self.onnx.release(key):
            self.release(converted)
        model = self._models.pop(key, None)
        if isinstance(model, LoadedModel):
            model.close()
        for cache in (self._inputs, self._fingerprints, self._references, self._reference_traces, self._noise):
            for cached in [k for k in cache if k == key or (isinstance(k, tuple) and k[0] == key)]:
                value = cache.pop(cached)
                if isinstance(value, ReferenceTrace):
                    value.close()
        self.apis.release(key)
        self.streams.release(key)
        self._nonfinite.pop(key, None)
        self._op_types.pop(key, None)
        self._weight_risks.pop(key, None)
        self._last_nonfinite = None  # it may hold this model's inputs
        self._last_prepared = None  # and this its reference
        self._provided.discard(key)
        if self.bundle is not None:
            self.bundle.release(key)

    def held_models(self) -> set[Path]:
        """The models this engine holds anything of (an interpreter, a reference, a trace, inputs): what its
        memory grows with, and what ``release`` lets go of."""
        held: set[Path] = set()
        for cache in (self._models, self._inputs, self._fingerprints, self._references, self._reference_traces,
                      self._noise):
            held.update(k[0] if isinstance(k, tuple) else k for k in cache)
        return held

    def set_input_shapes(self, path: os.PathLike | str, shapes: Mapping[str, tuple[int, ...]], source: str) -> None:
        """Shapes for one model (a sidecar's [shapes]); ``--mnn-input-shape`` still wins per input."""
        key = model_key(path)
        if self._model_shapes.get(key) != (dict(shapes), source):
            self.release(path)
            self._model_shapes[key] = (dict(shapes), source)

    def declared_shapes(self, path: os.PathLike | str) -> tuple[dict[str, tuple[int, ...]], str] | None:
        """The shapes ``set_input_shapes`` declared for this model alone, with where they came from."""
        return self._model_shapes.get(model_key(path))

    def shapes_for(self, key: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
        """The input shapes a model is loaded with (its own declaration, under ``--mnn-input-shape``), and
        where each declared one came from."""
        converted_from = self.onnx.source_of(key)  # a conversion uses its ONNX model's shapes
        own, source = self._model_shapes.get(key) or self._model_shapes.get(
            model_key(converted_from) if converted_from is not None else key, ({}, ""))
        shapes = {**own, **self.settings.input_shapes}
        return shapes, {name: f"{source} {name}" for name in own if name not in self.settings.input_shapes}

    def reference_model(self, model: LoadedModel) -> LoadedModel:
        """The model the reference runs: ``model`` itself, or ``--mnn-reference`` with the same input shapes
        (on the same MNN API as ``model``)."""
        if not self.settings.reference or self.bundle is not None:
            return model
        own = self._model_shapes.get(model_key(model.path))
        if own is not None and model_key(self.settings.reference) not in self._model_shapes:
            self._model_shapes[model_key(self.settings.reference)] = own
        return self.model(self.settings.reference, _api(model))

    def inputs(self, model: LoadedModel, input_set: InputSet | None = None
               ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Input sets A (seed) and B (seed + 1): B exists to catch outputs that do not recompute.

        A named ``input_set`` gives its own A, and B = A mirrored (see ``input_sets``).
        """
        key = _set_key(model.path, input_set)
        if key not in self._inputs:
            seed = self.settings.seed
            if input_set is not None:
                self._inputs[key] = input_set.build(model, seed, self.user_label(model.path, name_only=True))
            else:
                self._inputs[key] = (generate_inputs(model.info.inputs, model.shapes, seed),
                                     generate_inputs(model.info.inputs, model.shapes, seed + 1))
        return self._inputs[key]

    def provide_inputs(self, model_path: os.PathLike | str, inputs_a: Mapping[str, np.ndarray],
                       inputs_b: Mapping[str, np.ndarray] | None = None) -> None:
        """Use these arrays instead of generated inputs for this model (B defaults to the generated set B).

        Every model input must be given, at the model's resolved shape; NaN/Inf
        are allowed and reported in each result's ``inputs_nonfinite``.
        """
        model = self.model(model_path)
        generated_a, generated_b = self.inputs(model)
        given = []
        for arrays in (inputs_a, inputs_b if inputs_b is not None else generated_b):
            missing = sorted(set(generated_a) - set(arrays))
            if missing:
                raise ValueError(f"{model.path}: no array for input(s) {missing}")
            converted = {}
            for name, ref in generated_a.items():
                array = np.asarray(arrays[name], dtype=ref.dtype)
                if array.shape != ref.shape:
                    raise ValueError(f"{model.path}: input {name!r} has shape {array.shape}, the model needs "
                                     f"{ref.shape}")
                converted[name] = array
            given.append(converted)
        key = model_key(model.path)
        self._inputs[key] = (given[0], given[1])
        self._provided.add(key)
        for cache in (self._fingerprints, self._nonfinite, self._references, self._noise):
            cache.pop(key, None)

    def inputs_nonfinite(self, model: LoadedModel) -> dict[str, Any] | None:
        key = model_key(model.path)
        if key not in self._nonfinite:
            self._nonfinite[key] = nonfinite_inputs(*self.inputs(model))
        return self._nonfinite[key]

    def _nonfinite_of(self, inputs_a: Mapping[str, np.ndarray], inputs_b: Mapping[str, np.ndarray]
                      ) -> dict[str, Any] | None:
        """``nonfinite_inputs`` once per input-set pair rather than once per configuration: the pair is
        the cached one from ``inputs`` (identity is the key, so replaced inputs are scanned again)."""
        last = self._last_nonfinite
        if last is None or last[0] is not inputs_a or last[1] is not inputs_b:
            last = self._last_nonfinite = (inputs_a, inputs_b, nonfinite_inputs(inputs_a, inputs_b))
        found = last[2]
        return None if found is None else {name: dict(entry) for name, entry in found.items()}

    def _fingerprint(self, model: LoadedModel, input_set: InputSet | None = None) -> str:
        key = _set_key(model.path, input_set)
        if key not in self._fingerprints:
            self._fingerprints[key] = fingerprint(self.inputs(model, input_set)[0])
        return self._fingerprints[key]

    # -- reference --------------------------------------------------------------
    def reference(self, model: LoadedModel, input_set: InputSet | None = None,
                  config: RunConfig | None = None) -> Reference:
        """The reference outputs; ``config`` matters only for a bundle read as ``DIR::same``."""
        if self.bundle is not None:
            return self.bundle.reference(self, model, config, input_set)
        return self.live_reference(model, input_set)

    def live_reference(self, model: LoadedModel, input_set: InputSet | None = None) -> Reference:
        """The reference computed here (never a bundle's): cached per model and input set."""
        key = _set_key(model.path, input_set)
        if _api(model) != "session":  # each API is compared against its own reference
            key = (key if isinstance(key, tuple) else (key,)) + (_api(model),)
        return remembered(self._references, key, lambda: self._compute_reference(model, input_set))

    def provide_reference(self, model_path: os.PathLike | str, reference: Reference,
                          input_set: InputSet | None = None) -> None:
        """Judge this model's session-API configurations against ``reference`` (computed elsewhere: by the test
        process's MNN for a run over several MNN releases) instead of computing one here."""
        self._references[_set_key(model_path, input_set)] = reference

    def noise_floors(self, model: LoadedModel, input_set: InputSet | None = None) -> dict[str, float]:
        """Per float output, ``NOISE_FACTOR`` x how far the model's own CPU high outputs move between 1 thread
        and the items' count (4 when the items run on 1): how much reordering fp32 sums alone moves it.

        Measured once per model and input set, on input set A; {} when the CPU cannot run the model.
        """
        key = _set_key(model.path, input_set)
        if _api(model) != "session":
            key = (key if isinstance(key, tuple) else (key,)) + (_api(model),)
        if key not in self._noise:
            inputs_a = self.inputs(model, input_set)[0]
            threads = self.settings.threads
            runs = [model.run(RunConfig("CPU", "high", n), inputs_a) for n in (threads, 1 if threads != 1 else 4)]
            floors: dict[str, float] = {}
            if all(run.ok for run in runs):
                for name, a in runs[0].outputs.items():
                    b = runs[1].outputs.get(name)
                    if b is None or a.shape != b.shape or a.dtype.kind != "f":
                        continue
                    with np.errstate(invalid="ignore", over="ignore"):
                        spread = np.abs(a.astype(np.float64) - b.astype(np.float64))
                    finite = spread[np.isfinite(spread)]
                    if finite.size and finite.max() > 0:
                        floors[name] = NOISE_FACTOR * float(finite.max())
            self._noise[key] = floors
        return self._noise[key]

    def _compute_reference(self, model: LoadedModel, input_set: InputSet | None = None) -> Reference:
        inputs_a, inputs_b = self.inputs(model, input_set)
        if input_set is not None and input_set.expected is not None:
            return self.onnx.stored_reference(model, input_set, inputs_a, inputs_b)  # ONNX test data
        if self.onnx.reference_path(model) is not None:
            reference = self.onnx.try_reference(model, inputs_a, inputs_b)
            if reference is not None:
                return reference
        if self.settings.reference and self.bundle is None:  # a bundle's live reference is the model itself
            ref_model = self.reference_model(model)
            check_same_interface(model, ref_model)
            description = f"{ref_model.path} on {self.reference_config.describe()}"
        else:
            ref_model = model
            description = f"same model on {self.reference_config.describe()}"
        if _api(model) != "session":
            description += f" ({_api(model)} API)"
        fallback = self.onnx.fallback_note(model)
        if fallback:  # ONNX Runtime refused the ONNX model: say what the reference is instead, and what it cannot see
            description += (f"; ONNX Runtime cannot be the reference ({fallback}): CPU/high agrees with itself by "
                            "construction, other configurations are judged against it")
        # The activation scan needs per-op callbacks, which only sessions have.
        scanner = RiskScanner() if self.settings.layers != "off" and _api(model) == "session" else None
        run_a = ref_model.run(self.reference_config, inputs_a, observer=scanner)
        run_b = ref_model.run(self.reference_config, inputs_b)
        for run in (run_a, run_b):
            if not run.ok:
                raise ReferenceRunError(ref_model.path, run, ref_model.session_backend(self.reference_config)[1])
            empty = [name for name, arr in run.outputs.items() if arr.size == 0]
            if empty:
                raise EmptyReferenceOutputs(ref_model.path, f"the reference run produced empty outputs {empty}",
                                            runtime_hint(run), run.log)
        weight_risks = self._weight_risks_of(ref_model.path) if self.settings.layers != "off" else []
        return Reference(description, run_a.outputs, run_b.outputs, scanner.risks if scanner else [], weight_risks,
                         label="cpu (onnxruntime cannot load the model)" if fallback else "")

    def _weight_risks_of(self, path: Path) -> list[WeightRisk]:
        def scan() -> list[WeightRisk]:
            try:
                return _without_repeats(fp16_weight_risks(path, min_fraction=WEIGHT_RISK_MIN_FRACTION))
            except ValueError:
                return []  # MNN loaded the file, so a reader gap is ours: skip the scan, never fail the model
        return list(remembered(self._weight_risks, model_key(path), scan, errors=()))

    # -- the check --------------------------------------------------------------
    def tolerance(self, config: RunConfig, layers: Sequence[tuple[str, Mapping[str, Any] | None]] = (),
                  variant: str | None = None, reference_arithmetic: str | None = None,
                  model_path: os.PathLike | str | None = None) -> Tolerance:
        """The tolerance ``config`` is judged by, with ``layers`` of overrides: the one place a tier is chosen
        (from the arithmetic measured for ``config``, the kernels of the ``.mnn`` at ``model_path`` that this
        configuration computes in a looser format, the conversion ``variant``, and the arithmetic of a saved
        reference computed at reduced precision)."""
        arithmetic = mnn_arithmetic.probe_arithmetic(config.backend, config.precision)
        kind = looser_tier(arithmetic.kind, config.backend, config.precision, reference_arithmetic)
        kernels = mnn_arithmetic.model_kernels(arithmetic, self._op_types_of(model_path)) if model_path is not None else {}
        return resolve(config.backend, config.precision, *layers, arithmetic=kind, variant=variant, kernels=kernels)

    def _op_types_of(self, model_path: os.PathLike | str) -> tuple[str, ...]:
        """``op_types`` once per model held (as long as its interpreter: ``release`` forgets both)."""
        return remembered(self._op_types, model_key(model_path), lambda: op_types(model_path), errors=())

    def check_request(self, request: CheckRequest) -> ParityResult:
        """Run ``request.config`` and judge it (``check(model, config, ...)`` builds the request).

        An ``.onnx`` model is converted first (``variant``: ``fp32`` by default,
        see ``variants.VARIANTS``) and compared against ONNX Runtime.
        """
        if request.variant is None and is_onnx(request.model):
            request = replace(request, variant="fp32")
        result = self._check(request)
        result.variant = request.variant
        return result

    def _check(self, request: CheckRequest) -> ParityResult:
        model_path, config, input_set = request.model, request.config, request.input_set
        variant, reproduce = request.variant, request.reproduce
        model_label = str(model_path)
        status = backends.discover([config.backend])[config.backend]
        if not status.available:
            return ParityResult(model_label, config, Category.BACKEND_UNAVAILABLE, status.reason,
                                forward_type=status.forward_type)
        conversion = ""
        api_fields: dict[str, Any] = {}
        try:
            if is_onnx(model_path):
                model_path, conversion = self.onnx.converted(model_path, variant)
            choice = self.apis.resolve(model_path, request.api)
            api_fields = {"api": choice.api, "api_reason": choice.reason, "api_axis": choice.axis}
            model = self.model(model_path, choice.api)
            reference = self.reference(model, input_set, config)
        except (ReferenceRunError, EmptyReferenceOutputs) as exc:
            return self._check_without_reference(model, config, exc, reproduce, input_set, api_fields)
        except ModelError as exc:
            text = str(exc)
            if str(model_path) != model_label:  # say the user's .onnx, not the hash-named conversion in the cache
                text = text.replace(str(model_path), f"{model_label} (its {variant} conversion)")
            # A broken input set keeps its name: its items are its own row, as docs/report.md says.
            return ParityResult(model_label, config, Category.MODEL_ERROR, text, log=exc.log,
                                input_set=input_set.name if input_set is not None else "", **api_fields)
        arithmetic = mnn_arithmetic.probe_arithmetic(config.backend, config.precision)
        ref_arith = reference.arithmetic
        tol = self.tolerance(config, request.tolerance_layers, variant, ref_arith, model.path)
        output_tolerances = {k: self.tolerance(config, v, variant, ref_arith, model.path)
                             for k, v in (request.output_tolerances or {}).items()}
        layer_tolerances = {k: self.tolerance(config, v, variant, ref_arith, model.path)
                            for k, v in (request.layer_tolerances or {}).items()}
        inputs_a, inputs_b = self.inputs(model, input_set)
        if input_set is not None:
            set_label = input_set.name
        else:
            set_label = "provided" if model_key(model.path) in self._provided else f"seeded:{self.settings.seed}"
        try:
            forward, session_log = model.session_backend(config)
        except ModelError as exc:  # the reference's session worked, this configuration's did not
            return ParityResult(model_label, config, Category.RUNTIME_ERROR, str(exc), tolerance=tol,
                                reference=reference.description, input_set=set_label, log=exc.log)
        result = ParityResult(model_label, config, Category.OK, "", _backend_name(forward), forward, tol,
                              reference=reference.description, input_set=set_label, log=session_log,
                              fp16_risks=list(reference.fp16_risks), weight_risks=list(reference.weight_risks),
                              arithmetic=arithmetic, variant=variant, conversion=conversion,
                              input_detail=input_set.describe(model) if input_set is not None else "",
                              inputs_nonfinite=self._nonfinite_of(inputs_a, inputs_b), **api_fields,
                              reference_label=reference.label or self.settings.reference or (
                                  "onnxruntime" if self.onnx.reference_path(model) is not None else "cpu"))
        if choice.api == "module":
            result.backend_note = model.backend_note(config)
        if model.falls_back(config):
            result.category = Category.BACKEND_FALLBACK
            runner = "this module" if choice.api == "module" else "this session"
            result.message = (f"{config.backend} was available at discovery but {runner} runs on "
                              f"{backends.forward_name(forward)} (forward type {forward}): MNN fell back silently. "
                              f"MNN said: {last_lines(session_log)}")
            return result
        # A stream feeds back its own state, so it runs the seeded inputs only.
        stream = self.streams.spec_for(model_path) if input_set is None else None
        if stream is not None:
            return self.streams.check(result, model, config, tol, stream, reproduce)
        run_a = model.run(config, inputs_a)
        run_b = model.run(config, inputs_b) if run_a.ok else run_a
        result.rc, result.seconds = run_a.rc if not run_a.ok else run_b.rc, run_a.seconds
        result.log += run_a.log + run_b.log
        failed_run = run_a if not run_a.ok else (run_b if not run_b.ok else None)
        if failed_run is not None:
            result.category = Category.RUNTIME_ERROR
            result.verdict = Verdict(Category.RUNTIME_ERROR)
            result.message = failure_message(result, model, error=runtime_error_text(failed_run, result.log),
                                             reproduce=reproduce)
            return result
        prepared = self._prepared(reference)
        result.verdict = judge_outputs(run_a.outputs, reference.outputs_a, tol,
                                       targets_b=run_b.outputs, references_b=reference.outputs_b,
                                       output_tolerances=output_tolerances, prepared=prepared)
        if not result.verdict.passed and result.verdict.category is not Category.DEGENERATE_REFERENCE:
            # Measured floors only loosen: an item that passes without them passes with them, so the two extra
            # CPU runs are paid by failing items alone (once per model).
            floors = self.noise_floors(model, input_set)
            if floors:
                result.verdict = judge_outputs(run_a.outputs, reference.outputs_a, tol,
                                               targets_b=run_b.outputs, references_b=reference.outputs_b,
                                               output_tolerances=output_tolerances, floors=floors,
                                               prepared=prepared)
        if result.verdict.category is Category.STALE_OUTPUT:
            self._stale_or_input_blind(result.verdict, model, inputs_a, inputs_b)
        result.category = result.verdict.category
        if choice.api == "module" and self.settings.api == "both":
            self.apis.cross_check(result, model_path, config, tol, inputs_a, run_a.outputs)
        if self.settings.keep_outputs:
            result.computed = Computed(model, input_set, run_a.outputs, run_b.outputs)
        if input_set is None:
            result.input_set = f"{set_label} ({self._fingerprint(model)})"
        else:
            result.input_detail += f" (crc {self._fingerprint(model, input_set)})"
        mode = self.settings.layers
        if result.category in _TRACEABLE and (mode == "always" or (mode == "on-failure" and not result.passed)):
            self._trace(result, model, config, tol, inputs_a, input_set, layer_tolerances)
        if result.category in _TRACEABLE:
            self.sweeps.after_check(result, model, config, tol, inputs_a, input_set, layer_tolerances, reproduce)
        if self.settings.output_sink is not None:
            self._to_sink(result, model, config, run_a.outputs, reference.outputs_a, inputs_a, input_set)
        if not result.passed:
            result.message = failure_message(result, model, reproduce=reproduce)
        return result

    def _prepared(self, reference: Reference) -> PreparedReferences:
        """``prepare_references`` of ``reference``'s outputs, once for the checks judged against it in a row."""
        last = self._last_prepared
        if last is None or last[0] is not reference:
            last = self._last_prepared = (reference, prepare_references(reference.outputs_a, reference.outputs_b))
        return last[1]

    def _stale_or_input_blind(self, verdict: Verdict, model: LoadedModel, inputs_a, inputs_b) -> None:
        """``stale_output`` says the backend did not recompute.  When the reference is another model (an ONNX
        file, ``--mnn-reference``), this build may instead ignore its input: if its own CPU run gives the same
        output for both input sets too, that is what it is, and it is a ``mismatch``."""
        if self.onnx.reference_path(model) is None and not (self.settings.reference and self.bundle is None):
            return  # the reference is this very model: its outputs moved, so the target's should have
        run_a, run_b = (model.run(self.reference_config, inputs) for inputs in (inputs_a, inputs_b))
        if not (run_a.ok and run_b.ok):
            return
        for v in verdict.outputs:
            if v.category is Category.STALE_OUTPUT and np.array_equal(run_a.outputs.get(v.name), run_b.outputs.get(
                    v.name), equal_nan=True):
                v.category = Category.MISMATCH
                v.detail = ("identical output for two different inputs, and so is this model's own run on "
                            f"{self.reference_config.describe()}: its output does not depend on its input while the "
                            "reference's does (a broken build or conversion, not a backend that failed to recompute)")
        verdict.category = worst(v.category for v in verdict.outputs)

    def _trace(self, result: ParityResult, model: LoadedModel, config: RunConfig, tol: Tolerance,
               inputs: Mapping[str, np.ndarray], input_set: InputSet | None = None,
               layer_tolerances: Mapping[str, Tolerance] | None = None) -> None:
        if _api(model) == "module":
            from .apis import NO_TRACE, TRACE_VIA_SESSION  # noqa: PLC0415

            session = self.apis.session_for_trace(model.path)
            if session is None:
                result.trace_note = NO_TRACE
                return
            self._trace(result, session, config, tol, inputs, input_set, layer_tolerances)
            if result.trace is not None:
                result.trace.method = f"{TRACE_VIA_SESSION}: {result.trace.method}"
            return
        if self.onnx.reference_path(model) is not None:
            self.onnx.localise(result, model, config, tol, inputs, layer_tolerances)
            return
        if self.bundle is not None:
            reference = self.reference(model, input_set, config).trace
            if reference is None:
                result.reference += "; no per-layer trace in the bundle to localise with (save with --mnn-layers always)"
                return
        else:
            reference = self.reference_trace(model, inputs, input_set)
        result.trace = trace_target(reference, model, config, inputs, tol, layer_tolerances)
        first = result.trace.first_divergent
        if first is not None:
            result.first_divergent_layer = first.as_dict()

    def _to_sink(self, result: ParityResult, model: LoadedModel, config: RunConfig,
                 targets: Mapping[str, np.ndarray], references: Mapping[str, np.ndarray],
                 inputs: Mapping[str, np.ndarray], input_set: InputSet | None = None) -> None:
        def layer_arrays():
            # Only on demand: it costs one more traced run of the target.
            if result.trace is None:
                return []
            return capture_layers(result.trace, model, config, inputs,
                                  self.reference_trace(model, inputs, input_set))

        self.settings.output_sink(result, targets, references, layer_arrays)

    def reference_trace(self, model: LoadedModel, inputs: Mapping[str, np.ndarray],
                         input_set: InputSet | None = None) -> ReferenceTrace:
        """The reference's per-op tensors for input set A, recorded once per model and input set."""
        key = _set_key(model.path, input_set)
        if key not in self._reference_traces:
            ref_model = self.reference_model(model)
            trace, _ = record_reference(ref_model, self.reference_config, inputs)
            self._reference_traces[key] = trace
        return self._reference_traces[key]


    def _check_without_reference(self, model: LoadedModel, config: RunConfig, exc: ModelError,
                                 reproduce: str, input_set: InputSet | None = None,
                                 api_fields: Mapping[str, Any] | None = None) -> ParityResult:
        """The reference cannot run the model: if the target cannot either, that is the finding."""
        api_fields = dict(api_fields or {})
        neither = _api(model) == "module" and api_fields.get("api_reason", "").startswith(
            "auto: the session API cannot run")
        if neither:
            # auto sent the model to the Module API, which cannot run it either (a wrong static shape, say): say so,
            # rather than "the Module API runs it", and point at the shapes first.
            session_failure = api_fields["api_reason"].split("(", 1)[1].rsplit("); the Module API runs it", 1)[0]
            api_fields["api_reason"] = (f"auto: neither API runs this model (the session API: {session_failure}; "
                                        f"the Module API: {exc.reason})")
        forward, session_log = model.session_backend(config)
        run = model.run(config, self.inputs(model, input_set)[0])
        set_label = input_set.name if input_set is not None else f"seeded:{self.settings.seed}"
        result = ParityResult(str(model.path), config, Category.MODEL_ERROR, str(exc), _backend_name(forward),
                              forward, resolve(config.backend, config.precision), rc=run.rc,
                              reference="unavailable: " + exc.reason, input_set=set_label,
                              log=session_log + exc.log + run.log, **api_fields)
        empty = [name for name, arr in run.outputs.items() if arr.size == 0]
        if not run.ok or empty:
            result.category = Category.RUNTIME_ERROR
            result.verdict = Verdict(Category.RUNTIME_ERROR)
            hint = SHAPES_HINT if neither else None
            error = (runtime_error_text(run, result.log, hint) if not run.ok else
                     f"outputs {empty} came back empty (not judged).\n  MNN said: {mnn_said(result.log)}\n"
                     f"  hint: {runtime_hint(run)}")
            result.message = failure_message(result, model, error=error, reproduce=reproduce)
        return result


def _api(model) -> str:
    return getattr(model, "api", "session")


def _backend_name(forward: int | None) -> str | None:
    # None: the Module API, which cannot read back its backend (see module_runner).
    return None if forward is None else backends.forward_name(forward)


def _without_repeats(risks: list[WeightRisk]) -> list[WeightRisk]:
    """A tensor that flushes entirely is also below fp16's normal range: say it once."""
    flushed = {(r.op_name, r.role) for r in risks if r.kind == "flush" and r.count == r.total}
    return [r for r in risks if not (r.kind == "subnormal" and (r.op_name, r.role) in flushed)]


def _set_key(path: os.PathLike | str, input_set: InputSet | None) -> Any:
    """Cache key of a model's input set: the model's key alone for the default seeded set."""
    return model_key(path) if input_set is None else (model_key(path), input_set.name)



