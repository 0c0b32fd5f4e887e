"""Run an ``.mnn`` model through MNN's Module API, as apps that use it do.

``MNN.nn.load_module_from_file`` with a runtime manager carrying backend,
precision and threads is the path MNN recommends for new code, and the only
one that runs models with control flow (ONNX ``If``/``Loop``, LSTMs converted
to ``While``): a session cannot compute their shapes.

``ModuleModel`` offers what the engine uses of ``runner.LoadedModel`` (``path``,
``info``, ``shapes``, ``run``, ``session_backend``, ``falls_back``, ``close``),
so one engine judges both APIs.  What MNN does not do for you here, and this
module does (all verified on MNN 3.6.1):

* inputs are built with the dtype pymnn expects: ``expr.const`` reinterprets
  the array's bytes, so int64 or float64 data given as such comes out garbled;
* every input is passed, in the module's own order (too few inputs crashed the
  process);
* a failed ``forward`` raises nothing: it prints ``code=3 in onForward`` and
  returns an empty list, which is reported by MNN's error name;
* packed (NC4HW4) outputs are converted to NCHW before reading.

Which backend really ran cannot be read back: pymnn's ``Module.get_info()``
returns names, inputs and version only, and its ``RuntimeManager`` has no
``getInfo``.  MNN does print ``Can't Find type=3 backend, use 0 instead`` when
the runtime manager is created for a backend it lacks; that line is the one
piece of evidence there is, and it is used (``falls_back``).  Otherwise the
backend is reported as unknown, never guessed.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .backends import forward_name
from .library import mnn
from .model import (
    ModelError,
    ModelInfo,
    TensorSpec,
    check_model_path,
    file_sha256,
    load_reason,
)
from .native_output import capture_native_output
from .runner import DESCRIBE_CONFIG, LoadedModel, RunConfig, RunOutput, error_name

API_SESSION = "session"
API_MODULE = "module"

_FALLBACK = re.compile(r"Can't Find type=(\d+) backend, use (\d+) instead")
_FORWARD_CODE = re.compile(r"code=(\d+) in onForward")
# rc of a failed forward whose log names no MNN error code.
NO_CODE = -1

NO_BACKEND_READBACK = ("pymnn cannot read back which backend a Module ran on (Module.get_info() has no backend, "
                       "RuntimeManager has no getInfo)")


@dataclass
class ModuleRunOutput(RunOutput):
    """A ``RunOutput`` whose failure is described in Module terms, not ``runSession``'s."""

    failure: str = ""


@dataclass
class _Runtime:
    manager: Any
    log: str
    # The forward type MNN said it used instead of the requested backend.
    fallback: int | None


_RUNTIMES: dict[RunConfig, _Runtime] = {}


def runtime_manager(config: RunConfig) -> _Runtime:
    """One runtime manager per configuration and process, shared by every module.

    Sharing mirrors ``runner.shared_runtime`` (GPU runtimes are costly and
    Vulkan runs out of devices when each model makes its own), and keeps the
    one moment MNN says whether it fell back: creation.
    """
    if config not in _RUNTIMES:
        nn = mnn().nn
        with capture_native_output() as out:
            manager = nn.create_runtime_manager((config.session_config(),))
        match = _FALLBACK.search(out.text)
        _RUNTIMES[config] = _Runtime(manager, out.text, int(match.group(2)) if match else None)
    return _RUNTIMES[config]


@dataclass
class ModuleModel:
    """A model loaded through ``MNN.nn.load_module_from_file``, one module per configuration."""

    path: Path
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    # Where a shape came from, per input (a sidecar's [shapes]), as for LoadedModel.
    shape_sources: Mapping[str, str] = field(default_factory=dict)
    # What the source model declares per input and its file name, as for LoadedModel (a dynamic input's message).
    declared_dims: Mapping[str, Sequence[int | str | None]] = field(default_factory=dict)
    source_name: str = ""
    api = API_MODULE

    def __post_init__(self):
        self.path = check_model_path(self.path)
        self._modules: dict[RunConfig, Any] = {}
        self._load_logs: dict[RunConfig, str] = {}
        self.info = self._describe(self._module(DESCRIBE_CONFIG))
        # The same checks and messages as the session path (dynamic shapes, ranks).
        self.shapes = LoadedModel._resolve_shapes(self)

    # -- description ------------------------------------------------------------
    def _describe(self, module) -> ModelInfo:
        expr = mnn().expr
        info = module.get_info()
        specs = []
        for name, var in zip(info["inputNames"], info["inputs"]):
            layout = {expr.NHWC: "NHWC", expr.NC4HW4: "NC4HW4"}.get(var.data_format, "NCHW")
            specs.append(TensorSpec(name, tuple(int(d) for d in var.shape), _numpy_dtype(var.dtype), layout))
        return ModelInfo(self.path, file_sha256(self.path), tuple(specs), tuple(info["outputNames"]))

    def _module(self, config: RunConfig):
        if config not in self._modules:
            runtime = runtime_manager(config)
            with capture_native_output() as out:
                try:
                    module = mnn().nn.load_module_from_file(str(self.path), [], [], runtime_manager=runtime.manager)
                except Exception:  # pymnn raises a bare Exception
                    module = None
            if module is None:
                raise ModelError(self.path, f"MNN's Module API cannot load it ({load_reason(out.text)})",
                                 "the file is not a valid .mnn model: is it truncated or another format? "
                                 "Re-convert it with MNNConvert", out.text)
            self._modules[config] = module
            self._load_logs[config] = out.text
        return self._modules[config]

    # -- backend honesty ----------------------------------------------------------
    def session_backend(self, config: RunConfig) -> tuple[int | None, str]:
        """The forward type MNN said it fell back to (None when it said nothing), and its log."""
        self._module(config)
        runtime = runtime_manager(config)
        return runtime.fallback, runtime.log + self._load_logs[config]

    def falls_back(self, config: RunConfig) -> bool:
        return config.backend != "CPU" and runtime_manager(config).fallback is not None

    def backend_note(self, config: RunConfig) -> str:
        runtime = runtime_manager(config)
        if runtime.fallback is not None:
            return (f"MNN said so when creating the runtime manager: {_FALLBACK.search(runtime.log).group(0)} "
                    f"({forward_name(runtime.fallback)})")
        return (f"{NO_BACKEND_READBACK}; MNN printed no fallback creating the runtime manager for {config.backend}, "
                f"and backend discovery (a session probe) found {config.backend} available")

    # -- running ----------------------------------------------------------------
    def run(self, config: RunConfig, inputs: Mapping[str, np.ndarray], observer=None) -> ModuleRunOutput:
        """Build the inputs, ``forward`` once, read every output into an owned array."""
        if observer is not None:
            raise ValueError("the Module API has no per-op callbacks in pymnn: trace with the session API")
        module = self._module(config)
        expr = mnn().expr
        with capture_native_output() as out:
            args = [self._var(spec, inputs[spec.name]) for spec in self.info.inputs]
            start = time.perf_counter()
            results = module.forward(args)
            seconds = time.perf_counter() - start
            outputs: dict[str, np.ndarray] = {}
            if len(results) == len(self.info.output_names):
                for name, var in zip(self.info.output_names, results):
                    outputs[name] = _read(var, expr)
        rc, failure = 0, ""
        if len(results) != len(self.info.output_names):
            match = _FORWARD_CODE.search(out.text)
            rc = int(match.group(1)) if match else NO_CODE
            failure = (f"Module.forward returned {len(results)} of {len(self.info.output_names)} outputs"
                       + (f" (MNN error {rc}, {error_name(rc)})" if match else ""))
        return ModuleRunOutput(outputs, rc, out.text, seconds, runtime_manager(config).fallback, failure)

    def _var(self, spec: TensorSpec, array: np.ndarray):
        expr = mnn().expr
        if spec.dtype is not None and np.dtype(spec.dtype) == np.dtype(np.int8):
            raise ModelError(self.path, f"input {spec.name!r} is int8, which pymnn's expr.const cannot build",
                             "export the model with float32, int32 or uint8 inputs")
        dtype, code = _FEED[np.dtype(spec.dtype).kind if spec.dtype is not None else "f"]
        data = np.ascontiguousarray(array, dtype=dtype)
        fmt = expr.NHWC if spec.layout == "NHWC" else expr.NCHW
        var = expr.const(data, list(data.shape), fmt, getattr(expr, code))
        if spec.layout == "NC4HW4":
            var = expr.convert(var, expr.NC4HW4)
        return var

    def close(self) -> None:
        self._modules.clear()


# numpy kind -> (dtype the bytes are given in, pymnn dtype name).  expr.const
# takes int64 and float64 data as int32/float32 bytes: convert first.
_FEED = {"f": (np.float32, "float"), "i": (np.int32, "int"), "u": (np.uint8, "uint8"), "b": (np.int32, "int")}


def _numpy_dtype(dtype: Any) -> np.dtype | None:
    expr = mnn().expr
    table = {expr.float: np.float32, expr.int: np.int32, expr.uint8: np.uint8, expr.int64: np.int64,
             expr.double: np.float64, expr.int8: np.int8}
    for key, value in table.items():
        if dtype == key:
            return np.dtype(value)
    return None


def _read(var: Any, expr: Any) -> np.ndarray:
    """An owned array in logical order; an empty or shapeless output as an empty array."""
    shape = [int(d) for d in var.shape]
    if any(d <= 0 for d in shape):
        return np.zeros(tuple(max(d, 0) for d in shape), dtype=np.float32)
    if var.data_format == expr.NC4HW4:
        var = expr.convert(var, expr.NCHW)
    return np.array(var.read(), copy=True)
