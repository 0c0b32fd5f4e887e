"""Which MNN backends this process can really run, found by trying them.

MNN never refuses a backend: a session asked for OPENCL on a build without
OpenCL silently runs on the CPU.  So a backend counts as available only when a
session created for it *reports* that forward type (``getSessionInfo(s, 2)``)
and a tiny probe model computes the right answer on it (CUDA reports itself
even when it has no usable device).  Discovery runs once per process.
"""
from __future__ import annotations

import atexit
import dataclasses
import functools
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .library import mnn
from .native_output import capture_native_output

# MNN's MNNForwardType.h
FORWARD_TYPES: dict[str, int] = {
    "CPU": 0, "METAL": 1, "CUDA": 2, "OPENCL": 3, "AUTO": 4, "NN": 5, "OPENGL": 6, "VULKAN": 7,
    "USER_0": 8, "USER_1": 9, "USER_2": 10, "USER_3": 11,
}
FORWARD_CPU_EXTENSION = 13
FORWARD_NAMES: dict[int, str] = {v: k for k, v in FORWARD_TYPES.items()} | {FORWARD_CPU_EXTENSION: "CPU"}

DEFAULT_BACKENDS = ("CPU", "METAL", "OPENCL", "VULKAN", "CUDA", "OPENGL", "NN")
PRECISIONS = ("normal", "high", "low", "Low_BF16")
_SESSION_INFO_BACKENDS = 2


# What users write for a precision, in the words of other tools: MNN calls fp16 "low", bf16 "Low_BF16".
PRECISION_ALIASES = {"fp16": "low", "half": "low", "float16": "low", "fp32": "high", "float32": "high",
                     "float": "high", "bf16": "Low_BF16", "bfloat16": "Low_BF16", "default": "normal"}


def did_you_mean(name: str, known) -> str:
    """" (did you mean 'low'?)" for a close misspelling, else ""."""
    import difflib

    lowered = {k.lower(): k for k in known}
    close = [lowered[c] for c in difflib.get_close_matches(name.lower(), list(lowered), n=2, cutoff=0.6)]
    if not close:
        return ""
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)"


def canonical_backend(name: str) -> str:
    upper = name.strip().upper()
    if upper not in FORWARD_TYPES:
        raise ValueError(f"unknown MNN backend {name!r}{did_you_mean(upper, FORWARD_TYPES)}; known: "
                         f"{', '.join(DEFAULT_BACKENDS)}, AUTO")
    return upper


def canonical_precision(name: str) -> str:
    for known in PRECISIONS:
        if name.strip().lower() == known.lower():
            return known
    alias = PRECISION_ALIASES.get(name.strip().lower())
    hint = (f" (did you mean {alias!r}? MNN's precision names are {', '.join(PRECISIONS)}; x86 CPUs compute "
            "every one in fp32)") if alias else did_you_mean(name.strip(), PRECISIONS)
    raise ValueError(f"unknown MNN precision {name!r}{hint}; known: {', '.join(PRECISIONS)}")


@dataclass(frozen=True)
class GpuModeBit:
    """One of MNN's ``MNNGpuMode`` flags (MNNForwardType.h): the session config's ``numThread`` carries them."""

    name: str
    bit: int
    group: str  # "tuning", "memory" or "record": at most one of each group in a mode
    backends: tuple[str, ...]
    means: str


# The applicability is MNN's own header comments and runtimes: memory and record-op are read by OpenCL only
# (Vulkan picks buffer or image at build time, MNN_VULKAN_IMAGE); Metal reads every tuning level and
# record-batch, and warns about memory modes; CUDA, CPU and the NPU backends read none of them.
GPU_MODE_BITS: dict[str, GpuModeBit] = {b.name: b for b in (
    GpuModeBit("tune-none", 1 << 0, "tuning", ("OPENCL", "VULKAN", "METAL"),
               "no kernel tuning: the cheapest session creation"),
    GpuModeBit("tune-heavy", 1 << 1, "tuning", ("OPENCL", "VULKAN", "METAL"),
               "heavy tuning: tries the most work-group sizes (slowest creation)"),
    GpuModeBit("tune-wide", 1 << 2, "tuning", ("OPENCL", "VULKAN", "METAL"),
               "wide tuning: MNN's default when numThread names none"),
    GpuModeBit("tune-normal", 1 << 3, "tuning", ("OPENCL", "METAL"), "normal tuning"),
    GpuModeBit("tune-fast", 1 << 4, "tuning", ("OPENCL", "METAL"), "fast tuning"),
    GpuModeBit("buffer", 1 << 6, "memory", ("OPENCL",), "OpenCL buffer memory: other kernels than image"),
    GpuModeBit("image", 1 << 7, "memory", ("OPENCL",), "OpenCL image memory (the default on most GPUs)"),
    GpuModeBit("record-op", 1 << 8, "record", ("OPENCL",),
               "the kernels of one op recorded into one recording (Qualcomm GPUs only)"),
    GpuModeBit("record-batch", 1 << 9, "record", ("OPENCL", "VULKAN", "METAL"),
               "OpenCL: 10 kernels per recording (Qualcomm only); Vulkan and Metal: every op in one command "
               "buffer"),
)}
# Tuning changes how long a session takes to create (up to 11 s for a model's first OpenCL session with wide
# tuning on the lent H100, 0.5-0.8 s without), not what it computes: parity runs without it unless a mode
# names a tuning level (docs/gpu.md).
CHEAPEST_TUNING = "tune-none"


def gpu_mode_backends() -> tuple[str, ...]:
    """The backends any GPU mode applies to."""
    return tuple(dict.fromkeys(b for bit in GPU_MODE_BITS.values() for b in bit.backends))


def parse_gpu_mode(text: str) -> str:
    """A mode as written (``buffer``, ``image+record-batch``, ``tune-fast+buffer``) in its canonical spelling:
    the parts in the table's order, at most one per group.  ``ValueError`` names what is wrong."""
    parts = [p.strip().lower() for p in text.replace(" ", "").split("+") if p.strip()]
    if not parts:
        raise ValueError(f"empty GPU mode {text!r}; known: {', '.join(GPU_MODE_BITS)}")
    seen: dict[str, str] = {}
    for part in parts:
        if part not in GPU_MODE_BITS:
            raise ValueError(f"unknown GPU mode {part!r}{did_you_mean(part, GPU_MODE_BITS)}; known: "
                             f"{', '.join(GPU_MODE_BITS)} (combine with +, e.g. buffer+record-batch)")
        group = GPU_MODE_BITS[part].group
        if group in seen and seen[group] != part:
            raise ValueError(f"GPU mode {text!r} names two {group} modes ({seen[group]} and {part}): a session "
                             "has one of each")
        seen[group] = part
    return "+".join(name for name in GPU_MODE_BITS if name in seen.values())


def gpu_mode_applies(mode: str, backend: str) -> bool:
    """Whether every flag of ``mode`` means something to ``backend``."""
    return all(backend in GPU_MODE_BITS[part].backends for part in mode.split("+"))


def gpu_mode_number(mode: str | None) -> int:
    """The ``numThread`` value of a mode; a mode without a tuning level gets the cheapest one."""
    parts = mode.split("+") if mode else []
    if not any(GPU_MODE_BITS[p].group == "tuning" for p in parts):
        parts.append(CHEAPEST_TUNING)
    number = 0
    for part in parts:
        number |= GPU_MODE_BITS[part].bit
    return number


def describe_gpu_mode(mode: str | None) -> str:
    """What a mode means, for messages and reports."""
    parts = mode.split("+") if mode else []
    implied = "" if any(GPU_MODE_BITS[p].group == "tuning" for p in parts) else f"{CHEAPEST_TUNING} (implied)"
    words = [f"{p}: {GPU_MODE_BITS[p].means}" for p in parts] + ([implied] if implied else [])
    return f"numThread {gpu_mode_number(mode)} = " + "; ".join(words)


def forward_name(forward_type: int) -> str:
    return FORWARD_NAMES.get(forward_type, f"forward type {forward_type}")


def runs_as(requested: str, forward_type: int) -> bool:
    """Did a session asked for ``requested`` run on that backend (not a fallback)?"""
    if requested == "CPU":
        return forward_type in (FORWARD_TYPES["CPU"], FORWARD_CPU_EXTENSION)
    if requested == "AUTO":
        return True
    return forward_type == FORWARD_TYPES[requested]


def session_forward_type(interpreter, session) -> int:
    return int(interpreter.getSessionInfo(session, _SESSION_INFO_BACKENDS))


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    forward_type: int | None
    reason: str
    log: str = ""
    # Set when probing killed or hung an isolated worker (isolation.py): the
    # backend's items then fail as crashed/timeout instead of being skipped.
    fault: dict | None = None

    def as_dict(self) -> dict:
        """What a worker and its parent tell each other of a probe (a fault stays with the parent)."""
        return {"name": self.name, "available": self.available, "forward_type": self.forward_type,
                "reason": self.reason, "log": self.log}


@functools.lru_cache(maxsize=1)
def _probe_model() -> Path:
    """A 4-element ``y = 2x + 1`` model built with MNN's own expression API.

    Built at run time rather than shipped so discovery needs no data files.
    """
    expr = mnn().expr
    folder = Path(tempfile.mkdtemp(prefix="mnn-parity-probe-"))
    atexit.register(shutil.rmtree, folder, True)
    path = folder / "probe.mnn"
    with capture_native_output():
        x = expr.placeholder([1, 4], expr.NCHW)
        x.name = "x"
        y = x * 2.0 + 1.0
        y.name = "y"
        expr.save([y], str(path))
    return path


# The 2x+1 probe's input: values of both signs, one not a power of two.
PROBE_INPUT = np.array([[0.5, -1.0, 2.0, 3.25]], dtype=np.float32)


def probe_backend(name: str) -> BackendStatus:
    """Try ``name`` for real: create a session, check where it runs, run it."""
    name = canonical_backend(name)
    note_probe(f"backend {name}")
    m = mnn()
    x = PROBE_INPUT
    with capture_native_output() as out:
        try:
            interpreter = m.Interpreter(str(_probe_model()))
            session = interpreter.createSession({"backend": name, "precision": "high", "numThread": 1})
            forward = session_forward_type(interpreter, session)
            rc, y = None, None
            if "x" not in interpreter.getSessionInputAll(session):
                # MNN 3.0.0's expression API saves this model without its placeholder input; writing into the
                # input it then hands out kills the process (SIGSEGV, found by --mnn-versions): nothing to run.
                return _unprobed(name, forward, out.text)
            if runs_as(name, forward):
                tensor = interpreter.getSessionInput(session)
                tensor.copyFrom(m.Tensor((1, 4), m.Halide_Type_Float, x, m.Tensor_DimensionType_Caffe))
                rc = int(interpreter.runSession(session))
                result = interpreter.getSessionOutput(session)
                host = m.Tensor((1, 4), m.Halide_Type_Float, np.zeros((1, 4), np.float32),
                                m.Tensor_DimensionType_Caffe)
                result.copyToHostTensor(host)
                y = np.array(host.getNumpyData(), copy=True)
        except Exception as exc:  # a backend that throws is as absent as one that is missing
            return BackendStatus(name, False, None, f"{name}: session creation failed: {exc}", out.text)
    return judge_probe(name, forward, rc, y, log=out.text)


def judge_probe(name: str, forward: int, rc: int | None, y, *, log: str = "") -> BackendStatus:
    """What a 2x+1 probe run says about ``name``: ``forward`` is the forward type its session reported, ``rc``
    and ``y`` what running it on ``PROBE_INPUT`` gave (None where it did not run).  A pure function of the
    recorded run, so the GPU-only verdicts (a wrong answer, a failed run) are unit-tested without a GPU."""
    x = PROBE_INPUT
    if not runs_as(name, forward):
        return BackendStatus(name, False, forward,
                             f"{name}: not in this MNN build (session fell back to {forward_name(forward)})", log)
    if rc != 0:
        return BackendStatus(name, False, forward, f"{name}: reports itself but its probe run failed (code {rc})",
                             log)
    if y is None or not np.allclose(y, 2 * x + 1, rtol=1e-2, atol=1e-2):
        return BackendStatus(name, False, forward,
                             f"{name}: reports itself but computed {y} for 2x+1 of {x} (unusable device?)", log)
    return BackendStatus(name, True, forward, f"{name}: available (forward type {forward})", log)


def _unprobed(name: str, forward: int, log: str) -> BackendStatus:
    if not runs_as(name, forward):
        return BackendStatus(name, False, forward,
                             f"{name}: not in this MNN build (session fell back to {forward_name(forward)})", log)
    return BackendStatus(name, True, forward, f"{name}: available (forward type {forward}); its 2x+1 probe could "
                                              "not run: this MNN's expression API saved the probe model without "
                                              "its input", log)


_CACHE: dict[str, BackendStatus] = {}


def discover(names) -> dict[str, BackendStatus]:
    """Probe each backend once per process (GPU session creation can take seconds)."""
    result = {}
    for raw in names:
        name = canonical_backend(raw)
        if name not in _CACHE:
            forced = forced_unavailable()
            if name in forced:
                _CACHE[name] = BackendStatus(name, False, None, f"{name}: disabled by MNN_PARITY_DISABLE_BACKENDS")
            else:
                _CACHE[name] = probe_backend(name)
        result[name] = _CACHE[name]
    return result


def known_status(name: str) -> BackendStatus | None:
    """What this process already found for ``name`` (probed here, or told by a worker or its parent)."""
    return _CACHE.get(canonical_backend(name))


def remember_status(status: BackendStatus, *, keep_known: bool = False) -> None:
    """Record a probe made elsewhere (an isolated worker's, or the parent's for a worker)."""
    if not (keep_known and status.name in _CACHE):
        _CACHE[status.name] = status


def forced_unavailable() -> set[str]:
    """Backends turned off by ``MNN_PARITY_DISABLE_BACKENDS`` (for machines where probing hangs the driver)."""
    raw = os.environ.get("MNN_PARITY_DISABLE_BACKENDS", "")
    return {part.strip().upper() for part in raw.split(",") if part.strip()}


# -- what arithmetic a configuration really uses ----------------------------------

@dataclass(frozen=True)
class Arithmetic:
    """The float format a backend x precision was measured to compute in.

    ``kind`` is ``fp32``, ``fp16``, ``bf16``, ``broken`` (a probe was off by
    more than any float format explains) or ``unknown`` (no probe ran, or the
    output equalled the input exactly, which no rounding explains either): what
    the elementwise and MatMul probes say.  ``kernels`` names the kernels whose
    own probe (``KERNEL_PROBES``) rounds in a looser format than ``kind``, with
    that format: ``Arithmetic("fp32", ..., kernels={"depthwise": "fp16"})`` is
    fp32 except for depthwise convolutions, which round like fp16 (CUDA
    ``high`` on the H200 keeps depthwise weights in half precision).
    """

    kind: str
    errors: dict
    note: str = ""
    kernels: dict = field(default_factory=dict)

    def describe(self) -> str:
        errors = ", ".join(f"{k} {v:.3g}" for k, v in self.errors.items())
        reduced = "".join(f"; {KERNEL_PROBES[k].what if k in KERNEL_PROBES else k} rounds like {kind}"
                          for k, kind in self.kernels.items())
        return f"{self.kind}{reduced} (probe errors: {errors}){' - ' + self.note if self.note else ''}"


@dataclass(frozen=True)
class KernelProbe:
    """A kernel that may round differently from the elementwise path, and the MNN op types that run it."""

    what: str
    op_types: tuple[str, ...]


# Why these kernels: on the H200, CUDA 'high' computes elementwise ops and MatMul in fp32 but its depthwise
# convolution keeps its weights in half precision (2.5e-4 of the output range, 1000x the CPU: issue 20's residue);
# a regular convolution runs other kernels (im2col and GEMM, with weights of their own) than the MatMul probe reaches.
KERNEL_PROBES: dict[str, KernelProbe] = {
    "depthwise": KernelProbe("depthwise convolution", ("ConvolutionDepthwise",)),
    "conv": KernelProbe("convolution", ("Convolution",)),
}


# (x + 1024) - 1024 loses what the format cannot hold next to 1024: fp32 keeps
# ~1e-4, fp16 rounds to 1 (error <= 0.5), bf16 to 8 (error < 1 for x < 1).
ARITHMETIC_PROBE_INPUT = np.array([[0.1, 0.2, 0.3, 0.45, 0.55, 0.7, 0.8, 0.95]], dtype=np.float32)
_ARITH_CACHE: dict[tuple[str, str], Arithmetic] = {}
_ARITH_INTERPRETERS: list = []  # kept alive: destroying interpreters exhausts Vulkan devices
_KERNEL_INTERPRETERS: list = []


# The kernel probes' input, shape (1, 8, 8, 8), and weights (3x3, only the centre tap set, so each output is one
# product): channels 0-3 carry 1024 + a fraction times weight 1 (what a half-precision *activation* loses, as the
# (x + 1024) - 1024 probe); channels 4-6 carry 1024 + an integer (exact in fp16) times a weight that fp16 cannot
# hold (invisible with weight 1): 1 + a few 2**-13, below half of fp16's step above 1, so a half-precision weight
# is 1, its product an integer again, and the loss 0.125-0.38 next to 1024.  (Weights just below 1 would round to
# fp16's finer step there and the product round again: 0.62 in all.)  Channel 7 carries 1024 times 1 + 2**-9,
# exact in fp16 but 1 in bf16 (a loss of 2).  So half precision anywhere (weights, activations or both; a
# 10-bit-mantissa TF32 multiply alike) stays within 0.5 and bf16 within 4 (3.4 at most): the bounds
# classify_arithmetic reads the elementwise probes by.
KERNEL_CHANNELS, KERNEL_SIZE = 8, 8
KERNEL_WEIGHTS = np.array([1.0, 1.0, 1.0, 1.0, 1 + 3 * 2.0 ** -13, 1 + 2.0 ** -12, 1 + 2.0 ** -13, 1 + 2.0 ** -9],
                          dtype=np.float32)
KERNEL_PROBE_INPUT = np.concatenate([
    1024 + np.resize(ARITHMETIC_PROBE_INPUT, (4, KERNEL_SIZE, KERNEL_SIZE)),
    1024 + np.resize(np.arange(4, dtype=np.float32), (3, KERNEL_SIZE, KERNEL_SIZE)),
    np.full((1, KERNEL_SIZE, KERNEL_SIZE), 1024, np.float32)])[None].astype(np.float32)
# The regular convolution runs at stride 2: a probe of the format, not of Winograd, whose transforms (stride 1
# only) multiply the rounding (MNN's fp16 CPU on an emulated Cortex-A76 read 1.45 next to 1024 at stride 1: about
# three fp16 roundings, which would read as bf16).  Its output (c, y, x) is input (c, 2y, 2x) times weight c.
KERNEL_STRIDES = {"depthwise": 1, "conv": 2}
# What an exact kernel returns (float64): each output element is one input times its channel's weight.
KERNEL_PROBE_EXPECTED = {
    kind: (KERNEL_PROBE_INPUT.astype(np.float64)[:, :, ::stride, ::stride]
           * KERNEL_WEIGHTS.astype(np.float64)[None, :, None, None])
    for kind, stride in KERNEL_STRIDES.items()}
# A kernel sums its taps in its own order (9 here, most of them zero): up to 80 of fp32's ulps next to 1024 still
# read as fp32, 10x below the least that half precision loses in any element here (0.1).
KERNEL_FP32_LIMIT = 1e-2
KERNEL_FP16_LIMIT = 1.0 + 1e-6


def _kernel_weights(kind: str) -> np.ndarray:
    """The probe kernel's weights in MNN's layout: (C, 1, 3, 3) depthwise, (C, C, 3, 3) a regular convolution whose
    output channel c reads input channel c alone (an identity apart from the weights' rounding)."""
    c = KERNEL_CHANNELS
    w = np.zeros((c, 1 if kind == "depthwise" else c, 3, 3), np.float32)
    for channel in range(c):
        w[channel, 0 if kind == "depthwise" else channel, 1, 1] = KERNEL_WEIGHTS[channel]
    return w


def _build_kernel_model(path: Path) -> None:
    """One model, one output per kernel probe.  Built through ``MNN.nn.conv`` in inference mode, not
    ``expr.conv2d``: the latter feeds the weights as Const inputs, which MNN runs with other kernels (CUDA: im2col
    and MatMul) than the weights stored in the op, as every converted model has them."""
    m = mnn()
    expr, nn = m.expr, m.nn
    x = expr.placeholder([1, KERNEL_CHANNELS, KERNEL_SIZE, KERNEL_SIZE], expr.NC4HW4)
    x.name = "x"
    outputs = []
    for kind in KERNEL_PROBES:
        stride = KERNEL_STRIDES[kind]
        conv = nn.conv(KERNEL_CHANNELS, KERNEL_CHANNELS, [3, 3], [stride, stride], [1, 1],
                       depthwise=kind == "depthwise", bias=True, padding_mode=expr.Padding_Mode.CAFFE)
        weights = _kernel_weights(kind)
        # The module's parameters are (bias, weight) in MNN 3.x; matched by shape so another order still loads.
        by_shape = {(KERNEL_CHANNELS,): np.zeros(KERNEL_CHANNELS, np.float32), weights.shape: weights}
        values = [by_shape[tuple(p.shape)] for p in conv.parameters]
        if not conv.load_parameters([expr.const(v.flatten().tolist(), list(v.shape), expr.NCHW) for v in values]):
            raise RuntimeError(f"the {kind} probe's weights did not load")
        conv.train(False)
        y = expr.convert(conv.forward(x), expr.NCHW)
        y.name = kind
        outputs.append(y)
    expr.save(outputs, str(path))


@functools.lru_cache(maxsize=1)
def _arithmetic_models() -> dict[str, Path]:
    expr = mnn().expr
    folder = Path(tempfile.mkdtemp(prefix="mnn-parity-arith-"))
    atexit.register(shutil.rmtree, folder, True)
    paths = {}
    with capture_native_output():
        for kind in ("add", "matmul"):
            x = expr.placeholder([1, 8], expr.NCHW)
            x.name = "x"
            if kind == "add":
                y = (x + 1024.0) - 1024.0
            else:
                eye = expr.const(np.eye(8, dtype=np.float32).flatten().tolist(), [8, 8], expr.NCHW)
                y = expr.matmul(x + 1024.0, eye) - 1024.0
            y.name = "y"
            paths[kind] = folder / f"{kind}.mnn"
            expr.save([y], str(paths[kind]))
    return paths


@functools.lru_cache(maxsize=1)
def kernel_probe_model() -> Path:
    """The kernel probes' model (``_build_kernel_model``), built once per process."""
    folder = Path(tempfile.mkdtemp(prefix="mnn-parity-kernels-"))
    atexit.register(shutil.rmtree, folder, True)
    with capture_native_output():
        _build_kernel_model(folder / "kernels.mnn")
    return folder / "kernels.mnn"


def known_arithmetic() -> dict[tuple[str, str], Arithmetic]:
    """Every configuration's arithmetic measured (or learnt) in this process so far."""
    return dict(_ARITH_CACHE)


def remember_arithmetic(backend: str, precision: str, arithmetic: Arithmetic) -> None:
    """Reuse a measurement made in another process (probing a GPU configuration takes seconds)."""
    _ARITH_CACHE.setdefault((backend, precision), arithmetic)


def probe_arithmetic(backend: str, precision: str) -> Arithmetic:
    """Measure (once per process) the float format ``backend`` x ``precision`` computes in."""
    key = (canonical_backend(backend), canonical_precision(precision))
    if key not in _ARITH_CACHE:
        _ARITH_CACHE[key] = _measure_arithmetic(*key)
    return _ARITH_CACHE[key]


def _measure_arithmetic(backend: str, precision: str) -> Arithmetic:
    note_probe(f"arithmetic {backend}-{precision}")
    m = mnn()
    code = {"normal": 0, "high": 1, "low": 2, "Low_BF16": 3}[precision]
    errors: dict[str, float] = {}
    try:
        with capture_native_output():
            if not _ARITH_INTERPRETERS:
                _ARITH_INTERPRETERS.extend((k, m.Interpreter(str(p))) for k, p in _arithmetic_models().items())
            for kind, interpreter in _ARITH_INTERPRETERS:
                outputs, why = _run_probe(interpreter, backend, code, {"x": ARITHMETIC_PROBE_INPUT}, ("y",))
                if why:
                    return Arithmetic("unknown", {}, why)
                errors.update(probe_errors({kind: outputs["y"]}))
    except Exception as exc:  # a probe must never take discovery down
        return Arithmetic("unknown", errors, f"probe failed: {exc}")
    kernel_errors, why = _measure_kernels(backend, code)
    arithmetic = classify_arithmetic(errors | kernel_errors)
    if why and arithmetic.kind in _FORMATS:
        note = f"the kernel probes did not run ({why}): their kernels are taken to compute as the elementwise path"
        arithmetic = dataclasses.replace(arithmetic, note="; ".join(filter(None, (arithmetic.note, note))))
    return arithmetic


def _measure_kernels(backend: str, code: int) -> tuple[dict[str, float], str]:
    """Each kernel probe's error (``kernel_probe_errors``), or ({}, why they did not run): the elementwise
    verdict stands without them."""
    m = mnn()
    try:
        with capture_native_output():
            if not _KERNEL_INTERPRETERS:
                _KERNEL_INTERPRETERS.append(m.Interpreter(str(kernel_probe_model())))
            outputs, why = _run_probe(_KERNEL_INTERPRETERS[0], backend, code, {"x": KERNEL_PROBE_INPUT},
                                      tuple(KERNEL_PROBES))
    except Exception as exc:  # an MNN without nn.conv, a backend without the op
        outputs, why = {}, f"{type(exc).__name__}: {exc}"
    return ({}, why) if why else (kernel_probe_errors(outputs), "")


def _run_probe(interpreter, backend: str, code: int, inputs: dict, names: tuple[str, ...]):
    """Run a probe model once on ``backend`` at precision ``code``: ({output name: array}, "") or ({}, why not)."""
    m = mnn()
    # numThread 1: on GPU backends it means "no kernel tuning", which
    # keeps probing fast; it does not change the arithmetic.
    session = interpreter.createSession({"backend": backend, "precision": code, "numThread": 1})
    if not runs_as(backend, session_forward_type(interpreter, session)):
        return {}, "the probe session fell back to another backend"
    if not interpreter.getSessionInputAll(session):  # MNN 3.0.0 saves it without its input
        return {}, "this MNN's expression API saved the probe model without its input"
    for name, array in inputs.items():
        interpreter.getSessionInput(session, name).copyFrom(
            m.Tensor(array.shape, m.Halide_Type_Float, array, m.Tensor_DimensionType_Caffe))
    if int(interpreter.runSession(session)) != 0:
        return {}, "the probe run failed"
    outputs = {}
    for name in names:
        out = interpreter.getSessionOutput(session, name)
        host = m.Tensor(out, out.getDimensionType())
        out.copyToHostTensor(host)
        outputs[name] = np.array(host.getNumpyData(), copy=True)
    return outputs, ""


def probe_errors(outputs) -> dict[str, float]:
    """Each arithmetic probe's error, from its raw output ({probe: array}) for ``ARITHMETIC_PROBE_INPUT``."""
    return {kind: float(np.max(np.abs(np.asarray(y) - ARITHMETIC_PROBE_INPUT))) for kind, y in outputs.items()}


def kernel_probe_errors(outputs) -> dict[str, float]:
    """Each kernel probe's error, from its raw output ({kernel: array}) for ``KERNEL_PROBE_INPUT``: the largest
    distance from the exact products, on the scale of 1024 as ``probe_errors``."""
    errors = {}
    for kind, y in outputs.items():
        expected = KERNEL_PROBE_EXPECTED[kind]
        with np.errstate(invalid="ignore", over="ignore"):
            errors[kind] = float(np.max(np.abs(np.asarray(y, np.float64).reshape(expected.shape) - expected)))
    return errors


# Tightest first: a kernel is reported when it rounds in a later format than the elementwise path.
_FORMATS = ("fp32", "fp16", "bf16")


def classify_arithmetic(errors: dict[str, float]) -> Arithmetic:
    """The float format that explains the probes' errors (``probe_errors``, ``kernel_probe_errors``): what
    survives next to 1024.  The elementwise and MatMul probes decide ``kind``; each kernel probe
    (``KERNEL_PROBES``, by name) that rounds in a looser format is named in ``kernels``.

    A pure function of the recorded errors, so the GPU-only outcomes (fp16, bf16, an output equal to its
    input, a reduced kernel) are unit-tested on recorded probe outputs (tests/test_backend_probes.py)."""
    base = {k: v for k, v in errors.items() if k not in KERNEL_PROBES}
    arithmetic = _classify_base(errors, base)
    if arithmetic.kind not in _FORMATS:
        return arithmetic
    kernels, notes = {}, [arithmetic.note] if arithmetic.note else []
    for name, error in errors.items():
        if name not in KERNEL_PROBES:
            continue
        kind = kernel_format(error)
        if kind == "broken":
            notes.append(f"the {KERNEL_PROBES[name].what} probe was off by {error:.3g}, more than any float format "
                         "explains")
        elif _FORMATS.index(kind) > _FORMATS.index(arithmetic.kind):
            kernels[name] = kind
    return Arithmetic(arithmetic.kind, errors, "; ".join(notes), kernels)


def kernel_format(error: float) -> str:
    """The float format one kernel probe's error needs (``broken`` past any of them)."""
    if not np.isfinite(error) or error > 4.0:
        return "broken"
    if error <= KERNEL_FP32_LIMIT:
        return "fp32"
    # Up to two fp16 roundings next to 1024 (the input's and the product's, half a unit each): Vulkan's fp16 path
    # on the H200 read 0.95 (depthwise) and 0.8 (convolution) where its elementwise probes read 0.45, and under the
    # one-rounding bound of the elementwise probes it was called bf16, a tier looser than its arithmetic.  bf16
    # loses 2 on the exact-in-fp16 channel (1024 x (1 + 2**-9)), so the two stay apart.
    return "fp16" if error <= KERNEL_FP16_LIMIT else "bf16"


def _classify_base(errors: dict[str, float], base: dict[str, float]) -> Arithmetic:
    if not base:
        return Arithmetic("unknown", errors, "no probe ran")
    # np.max, not max(): a NaN error must win wherever it sits (max() keeps whichever comes first).
    worst = float(np.max(list(base.values())))
    if all(e == 0.0 for e in base.values()):
        return Arithmetic("unknown", errors, "output equals the input exactly: no rounding at all, the backend "
                                             "may not have computed")
    if not np.isfinite(worst) or worst > 4.0:
        return Arithmetic("broken", errors, "a probe was off by more than any float format explains")
    if worst <= 1e-3:
        return Arithmetic("fp32", errors)
    if worst <= 0.5 + 1e-6:
        return Arithmetic("fp16", errors)
    return Arithmetic("bf16", errors)


def model_kernels(arithmetic: Arithmetic | None, op_types) -> dict[str, str]:
    """The kernels ``arithmetic`` found reduced that a model with ``op_types`` (MNN op type names, as
    ``weights.op_types`` reads them) really runs: {"depthwise convolution (ConvolutionDepthwise)": "fp16"}."""
    if arithmetic is None:
        return {}
    ops = set(op_types)
    found = {}
    for name, kind in arithmetic.kernels.items():
        probe = KERNEL_PROBES.get(name)
        used = [op for op in probe.op_types if op in ops] if probe else []
        if used:
            found[f"{probe.what} ({', '.join(used)})"] = kind
    return found


# -- what discovery and the probes found, kept between runs ----------------------------------------------------
# A GPU's discovery and arithmetic probes take seconds every run (1.65 s + 3.58 s on the lent H100); what they find
# changes only with the MNN build, the driver and the devices, or MNN_PARITY_DISABLE_BACKENDS.  The plugin keeps
# it in pytest's cache under ``discovery_key()`` (plugin/run.py); everything here works without pytest.
DISCOVERY_FORMAT = 2  # 2: the arithmetic carries the kernel probes' errors and reduced kernels
# Environment variables that choose which devices a GPU runtime shows (and so what a probe finds).
_DEVICE_ENV = ("MNN_PARITY_DISABLE_BACKENDS", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES",
               "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "VK_ICD_FILENAMES", "VK_DRIVER_FILES",
               "OCL_ICD_VENDORS", "OCL_ICD_FILENAMES")
_DRIVER_FILES = ("/proc/driver/nvidia/version", "/sys/module/nvidia/version", "/sys/module/amdgpu/version")
_DRIVER_DIRS = ("/etc/OpenCL/vendors", "/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d", "/proc/driver/nvidia/gpus")


def discovery_key() -> dict[str, str]:
    """What can change what discovery and the arithmetic probes find, read without importing MNN (the point of
    keeping the results is not to pay for that either): the MNN build, the driver and devices, the environment
    variables that pick devices or disable backends.  Equal keys: the cached results stand; any change re-probes."""
    import hashlib
    import importlib.util
    import platform

    from ..core.version import __version__

    key = {"format": str(DISCOVERY_FORMAT), "plugin": __version__, "machine": platform.node()}
    try:
        spec = importlib.util.find_spec("_mnncengine")
    except (ImportError, ValueError):
        spec = None
    origin = getattr(spec, "origin", None)
    if origin:
        # The build: the extension's size, time and first 64 KiB (ELF headers and the build id): a rebuilt or
        # reinstalled MNN changes them; hashing all 24 MB would cost more than the probes do on a CPU machine.
        try:
            stat = os.stat(origin)
            with open(origin, "rb") as f:
                head = hashlib.sha256(f.read(1 << 16)).hexdigest()[:16]
            key["mnn"] = f"{origin}:{stat.st_size}:{stat.st_mtime_ns}:{head}"
        except OSError as exc:
            key["mnn"] = f"{origin}: {exc.strerror}"
    else:
        key["mnn"] = "not installed"
    for name in _DEVICE_ENV:
        if os.environ.get(name):
            key[f"env {name}"] = os.environ[name]
    for path in _DRIVER_FILES:
        try:
            key[path] = Path(path).read_text(errors="replace").strip()[:400]
        except OSError:
            pass
    for folder in _DRIVER_DIRS:
        try:
            key[folder] = ",".join(sorted(os.listdir(folder)))
        except OSError:
            pass
    drm = []
    for card in sorted(Path("/sys/class/drm").glob("card[0-9]*/device")):
        try:
            drm.append(f"{(card / 'vendor').read_text().strip()}:{(card / 'device').read_text().strip()}")
        except OSError:
            pass
    if drm:
        key["drm devices"] = ",".join(drm)
    return key


def known_results() -> dict:
    """This process's discovery and arithmetic results in JSON form (``remember_results`` reads it back).  A probe
    that crashed or hung a worker (``fault``) is left out: it is tried again next run, not believed forever."""
    return {"statuses": [status.as_dict() for status in _CACHE.values() if status.fault is None],
            "arithmetic": [[backend, precision, {"kind": a.kind, "errors": a.errors, "note": a.note,
                                                  "kernels": a.kernels}]
                           for (backend, precision), a in _ARITH_CACHE.items()]}


def remember_results(data: dict) -> int:
    """Take in results kept by an earlier run (``known_results``) as if probed here; returns how many.  Whatever
    this process already found stands."""
    count = 0
    for status in data.get("statuses", []):
        remember_status(BackendStatus(**status), keep_known=True)
        count += 1
    for backend, precision, arithmetic in data.get("arithmetic", []):
        remember_arithmetic(backend, precision, Arithmetic(**arithmetic))
        count += 1
    return count


def note_probe(what: str) -> None:
    """Append a line to the file ``MNN_PARITY_PROBE_LOG`` names, in whichever process probes: how tests (and anyone
    measuring) count the probes a run really made."""
    path = os.environ.get("MNN_PARITY_PROBE_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{os.getpid()} {what}\n")
