"""Run an ``.mnn`` model through MNN's session API, carefully.

What MNN does not do for you, and this module does:

* inputs are copied in again before *every* ``runSession`` (MNN reuses input
  memory, so a second run would compute on garbage);
* ``runSession``'s return code is checked (after a failure the outputs hold
  stale data from the previous run);
* outputs are copied through ``copyToHostTensor`` into host tensors (GPU
  tensors are not in host memory, and packed layouts need converting);
* every session's real backend is read back (MNN falls back silently).

Sessions are only freed when their interpreter is destroyed, so a
``LoadedModel`` keeps one session per configuration and is dropped whole.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .backends import (
    forward_name,
    runs_as,
    session_forward_type,
)
from .library import mnn
from .limits import check_input_budget
from .model import (
    LAYOUTS,
    ModelError,
    ModelInfo,
    TensorSpec,
    file_sha256,
    halide_type,
    open_interpreter,
    tensor_dtype,
)
from .native_output import capture_native_output

# A configuration is named without numpy (``config``): the plugin reads it at every pytest start-up (issue 22).
from .config import DESCRIBE_CONFIG, RunConfig
from .config import PRECISION_CODES as PRECISION_CODES
from .config import reference_config as reference_config

# MNN's ErrorCode.hpp
ERROR_NAMES = {
    0: "NO_ERROR", 1: "OUT_OF_MEMORY", 2: "NOT_SUPPORT", 3: "COMPUTE_SIZE_ERROR", 4: "NO_EXECUTION",
    5: "INVALID_VALUE", 10: "INPUT_DATA_ERROR", 11: "CALL_BACK_STOP", 20: "TENSOR_NOT_SUPPORT",
    21: "TENSOR_NEED_DIVIDE", 30: "FILE_CREATE_FAILED", 31: "FILE_REMOVE_FAILED", 32: "FILE_OPEN_FAILED",
    33: "FILE_CLOSE_FAILED", 34: "FILE_RESIZE_FAILED", 35: "FILE_SEEK_FAILED", 36: "FILE_NOT_EXIST",
    37: "FILE_UNMAP_FAILED",
}


def error_name(code: int) -> str:
    return ERROR_NAMES.get(int(code), f"error {code}")


@dataclass
class RunOutput:
    outputs: dict[str, np.ndarray]
    rc: int
    log: str
    seconds: float
    forward_type: int

    @property
    def ok(self) -> bool:
        return self.rc == 0

    @property
    def error(self) -> str:
        return error_name(self.rc)


@dataclass
class _Session:
    handle: Any
    forward_type: int
    log: str
    seconds: float


def shape_template(spec: TensorSpec, declared: Sequence[int | str | None] | None = None) -> str:
    """A shape to paste for a dynamic input: its known sizes, ``{name}`` for each dimension to fill (the name the
    source model gives it, else its place in the layout: ``{H}``, ``{W}``; ``{dim2}`` without one)."""
    layout = {"NCHW": "NCHW", "NHWC": "NHWC"}.get(spec.layout, "") if len(spec.shape) == 4 else ""
    dims = []
    for i, size in enumerate(spec.shape):
        given = declared[i] if declared is not None and i < len(declared) else None
        if size > 0:
            dims.append(str(size))
        elif isinstance(given, int) and given > 0:
            dims.append(str(given))
        else:
            name = given if isinstance(given, str) and given.strip() else (layout[i] if layout else f"dim{i}")
            dims.append("{" + re.sub(r"[^A-Za-z0-9_.]", "_", name) + "}")
    return "x".join(dims)


@dataclass
class LoadedModel:
    """An interpreter kept alive with its sessions, plus what we know of the model."""

    path: Path
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    # Where a shape came from, per input, when not --mnn-input-shape (e.g. a sidecar's [shapes]).
    shape_sources: Mapping[str, str] = field(default_factory=dict)
    # Refuse inputs above this many MiB per input set before allocating them
    # (``limits.check_input_budget``); None: no limit.
    max_input_mb: float | None = None
    # What the model's source declares per input (an ONNX model's dims: sizes, names of symbolic dims, None),
    # so that a dynamic input's message can be filled with them.
    declared_dims: Mapping[str, Sequence[int | str | None]] = field(default_factory=dict)
    # The file the user named, when this one was made from it (an ONNX model's conversion): its sidecar is
    # the one messages point to.
    source_name: str = ""

    def __post_init__(self):
        self.path = Path(self.path)
        self.interpreter = open_interpreter(self.path)
        self._sessions: dict[RunConfig, _Session] = {}
        self.info = self._describe()
        self.shapes = self._resolve_shapes()
        if self.max_input_mb is not None:
            check_input_budget(self.path, self.info.inputs, self.shapes, self.max_input_mb)
        # The session that described the model was created before the shapes
        # were known; it is the reference session, so it must be resized too,
        # inside the capture like every MNN call: its chatter (a shape error) is
        # kept in that session's log, for messages, instead of reaching the terminal.
        reference = self._sessions[DESCRIBE_CONFIG]
        if self._needs_resize():
            with capture_native_output() as out:
                self._resize(reference.handle)
            reference.log += out.text

    # -- description ------------------------------------------------------------
    def _describe(self) -> ModelInfo:
        session = self._session(DESCRIBE_CONFIG, resize=False).handle
        specs = []
        try:
            for name, tensor in self.interpreter.getSessionInputAll(session).items():
                specs.append(TensorSpec(name, tuple(int(d) for d in tensor.getShape()), tensor_dtype(tensor),
                                        LAYOUTS.get(int(tensor.getDimensionType()), "NCHW")))
            outputs = tuple(self.interpreter.getSessionOutputAll(session).keys())
        except (UnicodeDecodeError, SystemError) as exc:  # found by fuzzing: pymnn decodes names as UTF-8
            cause = exc if isinstance(exc, UnicodeDecodeError) else (exc.__cause__ or exc.__context__)
            if not isinstance(cause, UnicodeDecodeError):
                raise
            raise ModelError(self.path, f"an input or output name is not valid UTF-8 ({cause.reason} at byte "
                                        f"{cause.start}): the file is corrupt", "re-convert the model") from None
        return ModelInfo(self.path, file_sha256(self.path), tuple(specs), outputs)

    def _resolve_shapes(self) -> dict[str, tuple[int, ...]]:
        names = [spec.name for spec in self.info.inputs]
        unknown = [name for name in self.input_shapes if name not in names]
        if unknown:
            from .backends import did_you_mean  # noqa: PLC0415 - difflib, only for this message

            name = unknown[0]
            origin = self.shape_sources.get(name, f"--mnn-input-shape {name}")
            raise ModelError(self.path, f"{origin}: the model has no input {name!r}{did_you_mean(name, names)}; "
                                        f"its inputs are {', '.join(s.describe() for s in self.info.inputs)}",
                             "name one of the model's inputs (a shape for some models only goes in their sidecar's "
                             "[shapes], see docs/inputs.md)")
        shapes, dynamic = {}, []
        for spec in self.info.inputs:
            given = self.input_shapes.get(spec.name)
            if spec.dtype is None:
                raise ModelError(self.path, f"input {spec.name!r} has a data type pymnn cannot fill (int8/int16/bf16)",
                                 "export the model with float32, int32 or uint8 inputs")
            if given is None:
                if spec.is_dynamic:
                    dynamic.append(spec)
                shapes[spec.name] = spec.shape
                continue
            if len(given) != len(spec.shape):
                origin = self.shape_sources.get(spec.name, f"--mnn-input-shape {spec.name}")
                raise ModelError(self.path, f"{origin}={'x'.join(map(str, given))} has rank "
                                            f"{len(given)} but the model's input is {spec.describe()}",
                                 f"give {len(spec.shape)} dimensions")
            shapes[spec.name] = given
        if dynamic:
            # Every dynamic input at once, with a line ready to paste: one try, not one run per input.
            examples = {spec.name: shape_template(spec, self.declared_dims.get(spec.name)) for spec in dynamic}
            flags = " ".join(f"--mnn-input-shape {name}={shape}" for name, shape in examples.items())
            snippet = "\n".join(["[shapes]", *(f'{name} = "{shape}"' for name, shape in examples.items())])
            if len(dynamic) == 1:
                what = f"input {dynamic[0].name!r} has dynamic shape {dynamic[0].describe()}"
            else:
                what = f"{len(dynamic)} inputs have dynamic shapes: " + ", ".join(s.describe() for s in dynamic)
            raise ModelError(self.path, what,
                             f"give concrete shapes, each {{NAME}} replaced by a size:\n    {flags}\n"
                             f"  or in the model's sidecar {self.source_name or self.path.name}.toml:\n    "
                             + snippet.replace("\n", "\n    "))
        return shapes

    # -- sessions ---------------------------------------------------------------
    def _session(self, config: RunConfig, resize: bool = True) -> _Session:
        cached = self._sessions.get(config)
        if cached is not None:
            return cached
        start = time.perf_counter()
        with capture_native_output() as out:
            runtime = shared_runtime(config)
            try:
                if runtime is None:
                    handle = self.interpreter.createSession(config.session_config())
                else:
                    handle = self.interpreter.createSession(config.session_config(), runtime)
            except Exception as exc:  # pymnn raises a bare Exception; corrupt models get here (fuzzing)
                error: Exception | None = exc
            else:
                error = None
                if resize:
                    self._resize(handle)
        if error is not None:
            raise ModelError(self.path, f"MNN could not create a session for {config.describe()} ({error})",
                             "the file is corrupt, or uses an operator or shape this MNN cannot run on that "
                             "configuration; re-convert it", out.text)
        forward = session_forward_type(self.interpreter, handle)
        created = _Session(handle, forward, out.text, time.perf_counter() - start)
        self._sessions[config] = created
        return created

    def _needs_resize(self) -> bool:
        return any(tuple(self.shapes[spec.name]) != spec.shape for spec in self.info.inputs)

    def _resize(self, handle) -> None:
        changed = False
        for spec in self.info.inputs:
            shape = self.shapes[spec.name]
            if tuple(shape) != spec.shape:
                self.interpreter.resizeTensor(self.interpreter.getSessionInput(handle, spec.name), tuple(shape))
                changed = True
        if changed:
            self.interpreter.resizeSession(handle)

    def session_backend(self, config: RunConfig) -> tuple[int, str]:
        """The forward type a session for ``config`` really uses, and what MNN said creating it."""
        s = self._session(config)
        return s.forward_type, s.log

    def falls_back(self, config: RunConfig) -> bool:
        return not runs_as(config.backend, self._session(config).forward_type)

    # -- running ----------------------------------------------------------------
    def run(self, config: RunConfig, inputs: Mapping[str, np.ndarray], observer: "OpObserver | None" = None
            ) -> RunOutput:
        """Copy ``inputs`` in, run once, copy every output out.

        With an ``observer``, MNN calls it before and after every op (see ``trace``).
        """
        session = self._session(config)
        m = mnn()
        bind = getattr(observer, "bind", None)
        if bind is not None:
            # An observer that must run this session again afterwards (trace's probe of loop ops) learns how.
            bind(self, config, inputs)
        with capture_native_output() as out:
            for spec in self.info.inputs:
                array = np.ascontiguousarray(inputs[spec.name], dtype=spec.dtype)
                dim_type = m.Tensor_DimensionType_Tensorflow if spec.layout == "NHWC" else m.Tensor_DimensionType_Caffe
                staging = m.Tensor(tuple(array.shape), halide_type(array.dtype), array, dim_type)
                self.interpreter.getSessionInput(session.handle, spec.name).copyFrom(staging)
            start = time.perf_counter()
            if observer is None:
                rc = int(self.interpreter.runSession(session.handle))
            else:
                guard = _CallbackGuard(observer)
                # An observer that only looks after each op (RiskScanner) skips a Python call per op.
                before = guard.before if type(observer).before is not OpObserver.before else _go_on
                rc = int(self.interpreter.runSessionWithCallBackInfo(session.handle, before, guard.after))
            seconds = time.perf_counter() - start
            outputs = {}
            if rc == 0:
                for name in self.info.output_names:
                    outputs[name] = to_numpy(self.interpreter.getSessionOutput(session.handle, name))
        if observer is not None and guard.error is not None:
            raise guard.error
        return RunOutput(outputs, rc, out.text, seconds, session.forward_type)

    def close(self) -> None:
        self._sessions.clear()
        self.interpreter = None


_RUNTIMES: dict[RunConfig, Any] = {}
# Test-only, inert unless set: every session makes its own GPU runtime again, as before ``shared_runtime``, so a
# device test can drive one worker past MNN's Vulkan limit and check that every item after it is reported as a
# fallback (tests/test_gpu_modes.py).
NO_SHARED_RUNTIME_ENV = "MNN_PARITY_TEST_NO_SHARED_RUNTIME"


def shared_runtime(config: RunConfig) -> Any:
    """One MNN runtime per GPU configuration, shared by every model's sessions.

    Each session otherwise creates its own GPU runtime; on the lent H100, MNN's
    Vulkan backend stopped creating devices after about ten models' worth of
    sessions (``Invalide device for support vulkan``) and fell back to the CPU.
    CPU sessions keep their own runtime, as MNN's default.
    """
    if config.backend == "CPU" or os.environ.get(NO_SHARED_RUNTIME_ENV):
        return None
    if config not in _RUNTIMES:
        # createRuntime returns (runtime, status); createSession takes the runtime alone.
        _RUNTIMES[config] = mnn().Interpreter.createRuntime((config.session_config(),))[0]
    return _RUNTIMES[config]


class OpObserver:
    """Receives each op's tensors during a traced run; both methods see borrowed tensors.

    MNN reuses a tensor's memory once the callback returns, so anything kept
    must be copied inside the call (``to_numpy``).
    """

    def before(self, tensors, name: str, op_type: str) -> None:  # pragma: no cover - interface
        pass

    def after(self, tensors, name: str, op_type: str) -> None:  # pragma: no cover - interface
        pass


class _CallbackGuard:
    """Adapts an observer to pymnn's callbacks.

    A callback must return a real bool and must not raise: otherwise a Python
    error stays set and every later callback fails with SystemError.  The
    first exception is kept and re-raised after the run.
    """

    def __init__(self, observer: OpObserver):
        self.observer = observer
        self.error: BaseException | None = None

    def before(self, tensors, info) -> bool:
        return self._call(self.observer.before, tensors, info)

    def after(self, tensors, info) -> bool:
        return self._call(self.observer.after, tensors, info)

    def _call(self, method, tensors, info) -> bool:
        if self.error is None:
            try:
                method(tensors, *_op_name_and_type(info))
            except BaseException as exc:  # noqa: BLE001 - re-raised after the run
                self.error = exc
        return True


def _go_on(tensors, info) -> bool:
    return True


def _op_name_and_type(info) -> tuple[str, str]:
    # pymnn decodes op names as UTF-8 and raises on a corrupt one (found by
    # fuzzing); the same placeholder in both runs keeps ops paired by occurrence.
    try:
        name = info.getName()
    except UnicodeDecodeError:
        name = "<op name not valid UTF-8>"
    try:
        op_type = info.getType()
    except UnicodeDecodeError:
        op_type = "<type not valid UTF-8>"
    return name, op_type


def to_numpy(tensor: Any, copy: bool = True) -> np.ndarray:
    """Copy any session tensor into an owned numpy array in logical (NCHW or NHWC) order.

    An empty or unresized tensor comes back as an empty array of its shape
    (negative dims as 0) so the verdict can name it instead of crashing.
    """
    shape = tuple(int(d) for d in tensor.getShape())
    dtype = tensor_dtype(tensor)
    if any(d <= 0 for d in shape) or dtype is None:
        return np.zeros(tuple(max(d, 0) for d in shape), dtype=dtype or np.float32)
    m = mnn()
    # Same dtype and shape as the session tensor, in host memory; Caffe_C4
    # reports as Caffe so a packed tensor is unpacked by copyToHostTensor.
    host = m.Tensor(tensor, tensor.getDimensionType())
    if not tensor.copyToHostTensor(host):
        return np.zeros((0,) * len(shape), dtype=dtype)
    data = host.getNumpyData()
    if copy:
        return np.array(data, copy=True)
    # A view of ``host``'s memory: valid only while ``host`` lives, so the
    # array keeps a reference to it.
    view = np.asarray(data)
    return _HostView(view, host) if view.base is None else view


class _HostView(np.ndarray):
    """An ndarray that keeps the MNN host tensor owning its memory alive."""

    def __new__(cls, array: np.ndarray, owner: Any):
        obj = array.view(cls)
        obj._owner = owner
        return obj


def backend_label(forward_type: int | None) -> str | None:
    return None if forward_type is None else forward_name(forward_type)


def check_same_interface(model: LoadedModel, ref: LoadedModel) -> None:
    """A reference model (``--mnn-reference``) must be a build of the same network: same inputs and outputs."""
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
