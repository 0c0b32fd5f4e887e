"""What arithmetic a backend x precision really computes in, measured by probes.

``precision`` means different things per backend (an x86 CPU computes ``low`` in fp32, Vulkan ``normal`` in
fp16, CUDA ``high`` in fp32 except its depthwise convolution), so the tolerance tier follows what tiny probe
models measure here, not what was asked for (docs/verdicts.md: tolerance tiers, kernel probes).  The probes
run once per process per backend x precision; ``kept_results.py`` keeps them between runs.
"""
from __future__ import annotations

import atexit
import dataclasses
import functools
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .backends import canonical_backend, canonical_precision, note_probe, runs_as, session_forward_type
from .library import mnn
from .native_output import capture_native_output


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
