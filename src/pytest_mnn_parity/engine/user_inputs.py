"""Parity checks on inputs chosen by a test, not generated: the engine behind the user fixtures.

A model repository's own tests (PSNR on a validation image, a detection
count) run the model on real data; this module lets them run it on any
configuration, run the reference on the same data, and judge the difference
with the same metrics, tiers, health checks and per-layer trace as the
generated items.  Usable without pytest::

    from pytest_mnn_parity import ParityEngine, RunConfig
    from pytest_mnn_parity.engine.user_inputs import ModelUnderTest

    model = ModelUnderTest(ParityEngine(), "lama.mnn")
    out = model.run(RunConfig("CPU", "low"), {"image": image, "mask": mask})
    result = model.compare(out)        # against the reference on the same inputs
    print(result.category, result.message)
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..core.verdict import Category, judge_outputs
from ..inputs.generate import fingerprint
from ..mnn import backends
from ..mnn import arithmetic as mnn_arithmetic
from ..mnn.failures import last_lines, runtime_error_text
from ..mnn.model import model_key
from ..mnn.runner import LoadedModel, RunConfig, check_same_interface
from ..trace.compare import trace_target
from ..trace.record import RiskScanner, record_reference
from .engine import ParityEngine
from .explain import failure_message
from .results import ParityResult

# Reference outputs kept per model, by input fingerprint: a test parametrized
# over N configurations compares N runs against one reference run.
_REFERENCE_CACHE_SIZE = 8


class MnnInputError(ValueError):
    """Inputs a test passed that the model cannot take: names the model, the input and the fix."""


class MnnRunError(RuntimeError):
    """MNN could not run the model on a configuration; ``category`` says how (runtime_error, backend_fallback...)."""

    def __init__(self, message: str, *, category: Category = Category.RUNTIME_ERROR, rc: int | None = None,
                 log: str = ""):
        super().__init__(message)
        self.category = category
        self.rc = rc
        self.log = log


class MnnOutputs(dict):
    """Outputs by name (numpy arrays), plus how they were produced.

    ``inputs`` are the arrays that went in (copies: the test may reuse its own
    buffers), so a comparison can run the reference and trace on the same data.
    """

    def __init__(self, outputs: Mapping[str, np.ndarray], *, inputs: Mapping[str, np.ndarray], config: RunConfig,
                 forward_type: int | None = None, seconds: float = 0.0, log: str = "", rc: int = 0,
                 fp16_risks: Sequence = ()):
        super().__init__(outputs)
        self.inputs = dict(inputs)
        self.config = config
        self.forward_type = forward_type
        self.seconds = seconds
        self.log = log
        self.rc = rc
        self.fp16_risks = list(fp16_risks)

    @property
    def backend_used(self) -> str | None:
        return None if self.forward_type is None else backends.forward_name(self.forward_type)


class ModelUnderTest:
    """One model (and its reference) as a test sees it: run on inputs, run the reference, compare."""

    def __init__(self, engine: ParityEngine, model_path: os.PathLike | str,
                 reference_path: os.PathLike | str | None = None, *, label: str | None = None,
                 reference_label: str | None = None):
        self.engine = engine
        self.path = Path(model_path)
        self.reference_path = Path(reference_path) if reference_path is not None else None
        self.label = label or str(model_path)
        self.reference_label = reference_label or (str(reference_path) if reference_path is not None else None)
        self._references: OrderedDict[str, MnnOutputs] = OrderedDict()
        self._interface_checked = False

    @property
    def model(self) -> LoadedModel:
        return self.engine.model(self.path)

    @property
    def reference_model(self) -> LoadedModel:
        if self.reference_path is None:
            return self.model
        ref = self.engine.model(self.reference_path)
        if not self._interface_checked:
            check_same_interface(self.model, ref)
            self._interface_checked = True
        return ref

    def reference_description(self) -> str:
        if self.reference_path is None:
            return f"same model on {self.engine.reference_config.describe()}"
        return f"{self.reference_label} on {self.engine.reference_config.describe()}"

    # -- inputs -----------------------------------------------------------------
    def prepare_inputs(self, inputs: Mapping[str, Any] | np.ndarray) -> dict[str, np.ndarray]:
        """Check names, shapes and dtypes against the model and return owned, contiguous copies."""
        model = self.model
        specs = model.info.inputs
        if not isinstance(inputs, Mapping):
            if len(specs) != 1:
                raise MnnInputError(f"{self.label}: got one array but the model has {len(specs)} inputs "
                                    f"({_describe(model)}); pass a dict {{input name: array}}")
            inputs = {specs[0].name: inputs}
        names = [spec.name for spec in specs]
        missing = [n for n in names if n not in inputs]
        unknown = [str(n) for n in inputs if n not in names]
        if missing or unknown:
            parts = ([f"missing input(s) {missing}"] if missing else []) + (
                [f"unknown input(s) {unknown}"] if unknown else [])
            raise MnnInputError(f"{self.label}: {' and '.join(parts)}; the model's inputs are {_describe(model)}")
        arrays = {}
        for spec in specs:
            array = np.asarray(inputs[spec.name])
            expected = tuple(model.shapes[spec.name])
            if array.dtype.kind not in "biuf":
                raise MnnInputError(f"{self.label}: input {spec.name!r} is {array.dtype}, not numbers; "
                                    f"the model takes {spec.dtype}")
            if array.dtype.kind == "f" and spec.dtype.kind in "iu":
                raise MnnInputError(f"{self.label}: input {spec.name!r} is {array.dtype} but the model takes "
                                    f"{spec.dtype} (indices?); convert it with .astype(np.{spec.dtype})")
            if tuple(array.shape) != expected:
                dims = "x".join(map(str, array.shape))
                raise MnnInputError(
                    f"{self.label}: input {spec.name!r} has shape {dims or 'scalar'} but the model's sessions take "
                    f"{'x'.join(map(str, expected))}; resize the data, or, for a dynamic input, set "
                    f"--mnn-input-shape {spec.name}={dims} (ini key mnn_input_shape)")
            arrays[spec.name] = np.array(array, dtype=spec.dtype, order="C", copy=True)
        return arrays

    # -- running ----------------------------------------------------------------
    def run(self, config: RunConfig, inputs: Mapping[str, Any] | np.ndarray) -> MnnOutputs:
        """Run once on ``config``; an MNN failure raises ``MnnRunError`` naming the error code."""
        status = backends.discover([config.backend])[config.backend]
        if not status.available:
            raise MnnRunError(status.reason, category=Category.BACKEND_UNAVAILABLE)
        arrays = self.prepare_inputs(inputs)
        model = self.model
        if model.falls_back(config):
            forward, log = model.session_backend(config)
            raise MnnRunError(f"{self.label} on {config.id}: {config.backend} was available at discovery but this "
                              f"session runs on {backends.forward_name(forward)} (forward type {forward}): MNN fell "
                              f"back silently. MNN said: {last_lines(log)}",
                              category=Category.BACKEND_FALLBACK, log=log)
        run = model.run(config, arrays)
        if not run.ok:
            raise MnnRunError(f"{self.label} on {config.id}: {runtime_error_text(run)}", rc=run.rc, log=run.log)
        return MnnOutputs(run.outputs, inputs=arrays, config=config, forward_type=run.forward_type,
                          seconds=run.seconds, log=run.log)

    def reference(self, inputs: Mapping[str, Any] | np.ndarray) -> MnnOutputs:
        """The reference's outputs for ``inputs`` (computed once per distinct input data)."""
        arrays = self.prepare_inputs(inputs)
        key = fingerprint(arrays)
        cached = self._references.get(key)
        if cached is None:
            cached = self._run_reference(arrays)
            self._references[key] = cached
            while len(self._references) > _REFERENCE_CACHE_SIZE:
                self._references.popitem(last=False)
        else:
            self._references.move_to_end(key)
        # Copies: a test that edits its reference in place must not poison the cache.
        return MnnOutputs({k: v.copy() for k, v in cached.items()}, inputs=cached.inputs, config=cached.config,
                          forward_type=cached.forward_type, seconds=cached.seconds, log=cached.log,
                          fp16_risks=cached.fp16_risks)

    def _run_reference(self, arrays: dict[str, np.ndarray]) -> MnnOutputs:
        ref = self.reference_model
        scanner = RiskScanner() if self.engine.settings.layers != "off" else None
        run = ref.run(self.engine.reference_config, arrays, observer=scanner)
        if not run.ok:
            raise MnnRunError(f"{ref.path}: the reference run ({self.engine.reference_config.describe()}) failed: "
                              f"{runtime_error_text(run)}", rc=run.rc, log=run.log)
        return MnnOutputs(run.outputs, inputs=arrays, config=self.engine.reference_config, forward_type=run.forward_type,
                          seconds=run.seconds, log=run.log, fp16_risks=scanner.risks if scanner else ())

    # -- judging ----------------------------------------------------------------
    def compare(self, outputs: Mapping[str, Any], reference: Mapping[str, Any] | None = None, *,
                config: RunConfig | None = None,
                tolerance_layers: Sequence[tuple[str, Mapping[str, Any] | None]] = (),
                reproduce: str = "") -> ParityResult:
        """Judge ``outputs`` against ``reference`` (default: the reference run on the outputs' own inputs).

        ``tolerance_layers`` are applied over the built-in tier in order, as
        in ``tolerances.resolve``.  A failing result carries the full failure
        message, with the first divergent layer when the inputs are known.
        """
        inputs = getattr(outputs, "inputs", None)
        config = getattr(outputs, "config", None) or config
        if config is None:
            raise TypeError("compare() needs the configuration the outputs came from: pass the dict run() returned, "
                            "or config=RunConfig(...)")
        if reference is None:
            if inputs is None:
                raise TypeError("compare(outputs) without a reference needs the dict run() returned (it knows its "
                                "inputs); otherwise pass the reference outputs: compare(outputs, reference)")
            reference = self.reference(inputs)
        # The tier from the measured arithmetic, as for generated items: one rule for both (an x86 CPU computes
        # ``low`` in fp32 and is held to fp32).
        tol = self.engine.tolerance(config, tolerance_layers, model_path=self.model.path)
        targets = {str(k): np.asarray(v) for k, v in outputs.items()}
        references = {str(k): np.asarray(v) for k, v in reference.items()}
        verdict = judge_outputs(targets, references, tol)
        forward = getattr(outputs, "forward_type", None)
        backend_used = backends.forward_name(forward) if forward is not None else None
        input_set = "given by the test" + (f" ({fingerprint(inputs)})" if inputs is not None else "")
        result = ParityResult(self.label, config, verdict.category, "", backend_used, forward, tol, verdict,
                              reference=self.reference_description(), input_set=input_set,
                              rc=getattr(outputs, "rc", None), seconds=getattr(outputs, "seconds", 0.0),
                              log=getattr(outputs, "log", ""), fp16_risks=list(getattr(reference, "fp16_risks", [])),
                              # What chose the tier, in the record as for a generated item (measured once a process).
                              arithmetic=mnn_arithmetic.probe_arithmetic(config.backend, config.precision))
        mode = self.engine.settings.layers
        if inputs is not None and (mode == "always" or (mode == "on-failure" and not result.passed)):
            self._trace(result, config, tol, inputs)
        if not result.passed:
            result.message = failure_message(result, self.model, reproduce=reproduce)
        return result

    def _trace(self, result: ParityResult, config: RunConfig, tol, inputs: Mapping[str, np.ndarray]) -> None:
        ref_trace, _ = record_reference(self.reference_model, self.engine.reference_config, inputs)
        try:
            result.trace = trace_target(ref_trace, self.model, config, inputs, tol)
        finally:
            ref_trace.close()
        first = result.trace.first_divergent
        if first is not None:
            result.first_divergent_layer = first.as_dict()


class ModelRegistry:
    """Every ``ModelUnderTest`` of a run, shared by the tests that name the same model and reference."""

    def __init__(self, engine: ParityEngine):
        self.engine = engine
        self._models: dict[tuple[Path, Path | None], ModelUnderTest] = {}

    def get(self, model_path: Path, reference_path: Path | None = None, label: str | None = None,
            reference_label: str | None = None) -> ModelUnderTest:
        key = (model_key(model_path), model_key(reference_path) if reference_path is not None else None)
        if key not in self._models:
            self._models[key] = ModelUnderTest(self.engine, model_path, reference_path, label=label,
                                               reference_label=reference_label)
        return self._models[key]

    def release(self, path: Path) -> None:
        """Free a model's sessions and every cached reference that used it."""
        resolved = model_key(path)
        for key in [k for k in self._models if resolved in k]:
            del self._models[key]
        self.engine.release(path)


def _describe(model: LoadedModel) -> str:
    return ", ".join(f"{s.name} {'x'.join(map(str, model.shapes[s.name]))} {s.dtype}" for s in model.info.inputs)
