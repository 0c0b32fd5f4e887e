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

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from . import backends
from .explain import failure_message
from .inputs import fingerprint, generate_inputs
from .limits import DEFAULT_MAX_INPUT_MB, nonfinite_inputs
from .model import ModelError
from .runner import REFERENCE_CONFIG, LoadedModel, RunConfig, RunOutput, error_name
from .tolerances import Tolerance, resolve
from .weights import WeightRisk, fp16_weight_risks
from .trace import ActivationRisk, ReferenceTrace, RiskScanner, TraceResult, record_reference, trace_target
from .variants import is_onnx
from .verdict import Category, Verdict, judge_outputs


@dataclass
class ParitySettings:
    seed: int = 0
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    # None: the same model on CPU/high/1 thread.  A path: another .mnn with the
    # same inputs and outputs, run on that same reference configuration.
    reference: str | None = None
    threads: int = 4
    # Per-layer tracing: "off", "on-failure" (trace a configuration whose
    # outputs are wrong) or "always".
    layers: str = "on-failure"
    # One input set larger than this (MiB) is refused before it is allocated.
    max_input_mb: float | None = DEFAULT_MAX_INPUT_MB
    # ONNX models: where converted variants are cached (None: a temporary
    # folder for this engine) and extra MNNConvert flags for every variant.
    convert_cache: str | None = None
    converter_flags: tuple[str, ...] = ()


LAYER_MODES = ("off", "on-failure", "always")
# Categories where the outputs exist and can be traced layer by layer.
_TRACEABLE = {Category.OK, Category.SHAPE_MISMATCH, Category.NON_FINITE, Category.ZERO_OUTPUT, Category.PARTIAL_ZERO,
              Category.CONSTANT_OUTPUT, Category.STALE_OUTPUT, Category.MISMATCH}


class ReferenceRunError(ModelError):
    """The reference configuration itself could not run the model."""

    def __init__(self, path: Path, run: RunOutput):
        self.run = run
        super().__init__(path, f"the reference run failed: runSession returned {run.rc} ({error_name(run.rc)})",
                         _runtime_hint(run), run.log)


@dataclass
class Reference:
    description: str
    outputs_a: dict[str, np.ndarray]
    outputs_b: dict[str, np.ndarray]
    fp16_risks: list[ActivationRisk] = field(default_factory=list)
    weight_risks: list[WeightRisk] = field(default_factory=list)


# A weight tensor is named only when this share of it would be lost: a few
# rounding-noise entries (1e-17 in a DFT matrix) are not a risk.
WEIGHT_RISK_MIN_FRACTION = 0.2


@dataclass
class ParityResult:
    model: str
    config: RunConfig
    category: Category
    message: str
    backend_used: str | None = None
    forward_type: int | None = None
    tolerance: Tolerance | None = None
    verdict: Verdict | None = None
    reference: str = ""
    input_set: str = ""
    rc: int | None = None
    seconds: float = 0.0
    log: str = ""
    first_divergent_layer: dict[str, Any] | None = None
    variant: str | None = None
    arithmetic: backends.Arithmetic | None = None
    trace: TraceResult | None = None
    fp16_risks: list[ActivationRisk] = field(default_factory=list)
    # {input name: {"nan", "inf", "size", "sets"}} when an input set holds NaN/Inf (allowed, but reported).
    inputs_nonfinite: dict[str, Any] | None = None
    # Set when the check ran in an isolated worker (isolation.py): {"pid", "index"}.
    worker: dict[str, Any] | None = None
    # Set for crashed/timeout: how the worker ended (signal, exit code, stderr tail).
    fault: dict[str, Any] | None = None
    weight_risks: list[WeightRisk] = field(default_factory=list)
    # How the tested .mnn was made from an ONNX model ("" for a given .mnn).
    conversion: str = ""

    @property
    def passed(self) -> bool:
        return self.category is Category.OK

    @property
    def skipped(self) -> bool:
        return self.category is Category.BACKEND_UNAVAILABLE

    def outputs_dict(self) -> dict[str, Any]:
        if self.verdict is None:
            return {}
        return {v.name: v.as_dict() for v in self.verdict.outputs}


class ParityEngine:
    def __init__(self, settings: ParitySettings | None = None):
        self.settings = settings or ParitySettings()
        self._models: dict[Path, LoadedModel | ModelError] = {}
        self._references: dict[Path, Reference | ModelError] = {}
        self._inputs: dict[Path, tuple[dict, dict]] = {}
        self._reference_traces: dict[Path, ReferenceTrace] = {}
        self._fingerprints: dict[Path, str] = {}
        self._nonfinite: dict[Path, dict | None] = {}
        self._provided: set[Path] = set()
        from .onnx_engine import OnnxSide  # noqa: PLC0415 - it uses this module's types

        self.onnx = OnnxSide(self)

    # -- models -----------------------------------------------------------------
    def model(self, path: os.PathLike | str) -> LoadedModel:
        """The loaded model, loading it once; a load failure is remembered and re-raised."""
        key = _key(path)
        cached = self._models.get(key)
        if cached is None:
            try:
                cached = LoadedModel(Path(path), self.settings.input_shapes, max_input_mb=self.settings.max_input_mb)
            except ModelError as exc:
                cached = exc
            self._models[key] = cached
        if isinstance(cached, ModelError):
            raise cached
        return cached

    def release(self, path: os.PathLike | str) -> None:
        """Free a model's interpreter and sessions (MNN frees sessions with the interpreter only)."""
        key = _key(path)
        for converted in self.onnx.release(key):
            self.release(converted)
        model = self._models.pop(key, None)
        if isinstance(model, LoadedModel):
            model.close()
        self._inputs.pop(key, None)
        self._fingerprints.pop(key, None)
        self._nonfinite.pop(key, None)
        self._provided.discard(key)
        self._references.pop(key, None)
        trace = self._reference_traces.pop(key, None)
        if trace is not None:
            trace.close()

    def inputs(self, model: LoadedModel) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Input sets A (seed) and B (seed + 1): B exists to catch outputs that do not recompute."""
        key = _key(model.path)
        if key not in self._inputs:
            seed = self.settings.seed
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
        key = _key(model.path)
        self._inputs[key] = (given[0], given[1])
        self._provided.add(key)
        for cache in (self._fingerprints, self._nonfinite, self._references):
            cache.pop(key, None)

    def inputs_nonfinite(self, model: LoadedModel) -> dict[str, Any] | None:
        key = _key(model.path)
        if key not in self._nonfinite:
            self._nonfinite[key] = nonfinite_inputs(*self.inputs(model))
        return self._nonfinite[key]

    def _fingerprint(self, model: LoadedModel) -> str:
        key = _key(model.path)
        if key not in self._fingerprints:
            self._fingerprints[key] = fingerprint(self.inputs(model)[0])
        return self._fingerprints[key]

    # -- reference --------------------------------------------------------------
    def reference(self, model: LoadedModel) -> Reference:
        key = _key(model.path)
        cached = self._references.get(key)
        if cached is None:
            try:
                cached = self._compute_reference(model)
            except ModelError as exc:
                cached = exc
            self._references[key] = cached
        if isinstance(cached, ModelError):
            raise cached
        return cached

    def _compute_reference(self, model: LoadedModel) -> Reference:
        inputs_a, inputs_b = self.inputs(model)
        if self.onnx.reference_path(model) is not None:
            return self.onnx.reference(model, inputs_a, inputs_b)
        if self.settings.reference:
            ref_model = self.model(self.settings.reference)
            _check_same_interface(model, ref_model)
            description = f"{ref_model.path} on {REFERENCE_CONFIG.describe()}"
        else:
            ref_model = model
            description = f"same model on {REFERENCE_CONFIG.describe()}"
        scanner = RiskScanner() if self.settings.layers != "off" else None
        run_a = ref_model.run(REFERENCE_CONFIG, inputs_a, observer=scanner)
        run_b = ref_model.run(REFERENCE_CONFIG, inputs_b)
        for run in (run_a, run_b):
            if not run.ok:
                raise ReferenceRunError(ref_model.path, run)
            empty = [name for name, arr in run.outputs.items() if arr.size == 0]
            if empty:
                raise ModelError(ref_model.path, f"the reference run produced empty outputs {empty}",
                                 _runtime_hint(run), run.log)
        weight_risks = []
        if scanner is not None:
            try:
                weight_risks = _without_repeats(fp16_weight_risks(ref_model.path,
                                                                  min_fraction=WEIGHT_RISK_MIN_FRACTION))
            except ValueError:
                pass  # MNN loaded the file, so a reader gap is ours: skip the scan, never fail the model
        return Reference(description, run_a.outputs, run_b.outputs, scanner.risks if scanner else [], weight_risks)

    # -- the check --------------------------------------------------------------
    def check(self, model_path: os.PathLike | str, config: RunConfig,
              tolerance_layers: Sequence[tuple[str, Mapping[str, Any] | None]] = (),
              reproduce: str = "", variant: str | None = None) -> ParityResult:
        """Run ``config`` and judge it.  An ``.onnx`` model is converted first (``variant``:
        ``fp32`` by default, see ``variants.VARIANTS``) and compared against ONNX Runtime."""
        if variant is None and is_onnx(model_path):
            variant = "fp32"
        result = self._check(model_path, config, tolerance_layers, reproduce, variant)
        result.variant = variant
        return result

    def _check(self, model_path: os.PathLike | str, config: RunConfig,
               tolerance_layers: Sequence[tuple[str, Mapping[str, Any] | None]], reproduce: str,
               variant: str | None) -> ParityResult:
        model_label = str(model_path)
        status = backends.discover([config.backend])[config.backend]
        if not status.available:
            return ParityResult(model_label, config, Category.BACKEND_UNAVAILABLE, status.reason,
                                forward_type=status.forward_type)
        conversion = ""
        try:
            if is_onnx(model_path):
                model_path, conversion = self.onnx.converted(model_path, variant)
            model = self.model(model_path)
            reference = self.reference(model)
        except ReferenceRunError as exc:
            return self._check_without_reference(model, config, exc, reproduce)
        except ModelError as exc:
            return ParityResult(model_label, config, Category.MODEL_ERROR, str(exc), log=exc.log)
        arithmetic = backends.probe_arithmetic(config.backend, config.precision)
        tol = resolve(config.backend, config.precision, *tolerance_layers, arithmetic=arithmetic.kind,
                      variant=variant)
        inputs_a, inputs_b = self.inputs(model)
        input_set = "provided" if _key(model.path) in self._provided else f"seeded:{self.settings.seed}"
        try:
            forward, session_log = model.session_backend(config)
        except ModelError as exc:  # the reference's session worked, this configuration's did not
            return ParityResult(model_label, config, Category.RUNTIME_ERROR, str(exc), tolerance=tol,
                                reference=reference.description, input_set=input_set, log=exc.log)
        result = ParityResult(model_label, config, Category.OK, "", backends.forward_name(forward), forward, tol,
                              reference=reference.description, input_set=input_set, log=session_log,
                              fp16_risks=list(reference.fp16_risks), weight_risks=list(reference.weight_risks),
                              arithmetic=arithmetic, variant=variant, conversion=conversion,
                              inputs_nonfinite=self.inputs_nonfinite(model))
        if model.falls_back(config):
            result.category = Category.BACKEND_FALLBACK
            result.message = (f"{config.backend} was available at discovery but this session runs on "
                              f"{backends.forward_name(forward)} (forward type {forward}): MNN fell back silently. "
                              f"MNN said: {_last_lines(session_log)}")
            return result
        run_a = model.run(config, inputs_a)
        run_b = model.run(config, inputs_b) if run_a.ok else run_a
        result.rc, result.seconds = run_a.rc if not run_a.ok else run_b.rc, run_a.seconds
        result.log += run_a.log + run_b.log
        failed_run = run_a if not run_a.ok else (run_b if not run_b.ok else None)
        if failed_run is not None:
            result.category = Category.RUNTIME_ERROR
            result.verdict = Verdict(Category.RUNTIME_ERROR)
            result.message = failure_message(result, model, error=_runtime_error_text(failed_run), reproduce=reproduce)
            return result
        result.verdict = judge_outputs(run_a.outputs, reference.outputs_a, tol,
                                       targets_b=run_b.outputs, references_b=reference.outputs_b)
        result.category = result.verdict.category
        result.input_set = f"{input_set} ({self._fingerprint(model)})"
        mode = self.settings.layers
        if result.category in _TRACEABLE and (mode == "always" or (mode == "on-failure" and not result.passed)):
            self._trace(result, model, config, tol, inputs_a)
        if not result.passed:
            result.message = failure_message(result, model, reproduce=reproduce)
        return result

    def _trace(self, result: ParityResult, model: LoadedModel, config: RunConfig, tol: Tolerance,
               inputs: Mapping[str, np.ndarray]) -> None:
        if self.onnx.reference_path(model) is not None:
            self.onnx.localise(result, model, config, tol, inputs)
            return
        reference = self._reference_trace(model, inputs)
        result.trace = trace_target(reference, model, config, inputs, tol)
        first = result.trace.first_divergent
        if first is not None:
            result.first_divergent_layer = first.as_dict()

    def _reference_trace(self, model: LoadedModel, inputs: Mapping[str, np.ndarray]) -> ReferenceTrace:
        """The reference's per-op tensors for input set A, recorded once per model."""
        key = _key(model.path)
        if key not in self._reference_traces:
            ref_model = self.model(self.settings.reference) if self.settings.reference else model
            trace, _ = record_reference(ref_model, REFERENCE_CONFIG, inputs)
            self._reference_traces[key] = trace
        return self._reference_traces[key]


    def _check_without_reference(self, model: LoadedModel, config: RunConfig, exc: ReferenceRunError,
                                 reproduce: str) -> ParityResult:
        """The reference cannot run the model: if the target cannot either, that is the finding."""
        forward, session_log = model.session_backend(config)
        run = model.run(config, self.inputs(model)[0])
        result = ParityResult(str(model.path), config, Category.MODEL_ERROR, str(exc), backends.forward_name(forward),
                              forward, resolve(config.backend, config.precision), rc=run.rc,
                              reference="unavailable: " + exc.reason, input_set=f"seeded:{self.settings.seed}",
                              log=session_log + exc.log + run.log)
        if not run.ok:
            result.category = Category.RUNTIME_ERROR
            result.verdict = Verdict(Category.RUNTIME_ERROR)
            result.message = failure_message(result, model, error=_runtime_error_text(run), reproduce=reproduce)
        return result


def _without_repeats(risks: list[WeightRisk]) -> list[WeightRisk]:
    """A tensor that flushes entirely is also below fp16's normal range: say it once."""
    flushed = {(r.op_name, r.role) for r in risks if r.kind == "flush" and r.count == r.total}
    return [r for r in risks if not (r.kind == "subnormal" and (r.op_name, r.role) in flushed)]


@functools.lru_cache(maxsize=1024)
def _resolved(path: str) -> Path:
    return Path(path).resolve()


def _key(path: os.PathLike | str) -> Path:
    """Cache key of a model: its resolved path (resolving is a syscall per part, so it is memoised)."""
    return _resolved(os.fspath(path))


def _check_same_interface(model: LoadedModel, ref: LoadedModel) -> None:
    mine = {s.name: (model.shapes[s.name], s.dtype) for s in model.info.inputs}
    theirs = {s.name: (ref.shapes[s.name], s.dtype) for s in ref.info.inputs}
    if mine != theirs:
        raise ModelError(model.path, f"its inputs {_fmt_io(mine)} differ from the reference model {ref.path}'s "
                                     f"{_fmt_io(theirs)}",
                         "--mnn-reference must name a build of the same network (same input names, shapes, dtypes)")
    if set(model.info.output_names) != set(ref.info.output_names):
        raise ModelError(model.path, f"its outputs {list(model.info.output_names)} differ from the reference model "
                                     f"{ref.path}'s {list(ref.info.output_names)}",
                         "--mnn-reference must name a build of the same network (same output names)")


def _fmt_io(io: Mapping[str, tuple]) -> str:
    return "{" + ", ".join(f"{k}: {'x'.join(map(str, s))} {d}" for k, (s, d) in sorted(io.items())) + "}"


def _last_lines(log: str, n: int = 3) -> str:
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    return " | ".join(lines[-n:]) if lines else "(nothing)"


def _runtime_hint(run: RunOutput) -> str:
    if run.rc == 3 or "Compute Shape Error" in run.log or "not resized" in run.log:
        return ("MNN could not compute the output shapes. A model with control flow (ONNX If/Loop, or an LSTM "
                "converted to While) cannot run in a session: use the Module API (MNN.nn.load_module_from_file) "
                "or re-convert with --useOriginRNNImpl; a dynamic input needs --mnn-input-shape")
    return "see MNN's log above"


def _runtime_error_text(run: RunOutput) -> str:
    return (f"runSession returned {run.rc} ({error_name(run.rc)}); outputs were not read (MNN leaves stale data "
            f"after a failed run).\n  MNN said: {_last_lines(run.log, 4)}\n  hint: {_runtime_hint(run)}")
