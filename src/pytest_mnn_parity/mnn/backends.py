"""Which MNN backends this process can really run, found by trying them.

MNN never refuses a backend: a session asked for OPENCL on a build without
OpenCL silently runs on the CPU.  So a backend counts as available only when a
session created for it *reports* that forward type (``getSessionInfo(s, 2)``)
and a tiny probe model computes the right answer on it (CUDA reports itself
even when it has no usable device).  Discovery runs once per process.
"""
from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

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


@functools.lru_cache(maxsize=1)
def probe_input():
    """The 2x+1 probe's input: values of both signs, one not a power of two.  Made on first use, so that the
    plugin's start-up, which reads this module's names, does not import numpy (issue 22)."""
    import numpy as np  # noqa: PLC0415

    return np.array([[0.5, -1.0, 2.0, 3.25]], dtype=np.float32)


def __getattr__(name: str):
    if name == "PROBE_INPUT":  # the constant's old name, for callers that read it
        return probe_input()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def probe_backend(name: str) -> BackendStatus:
    """Try ``name`` for real: create a session, check where it runs, run it."""
    name = canonical_backend(name)
    note_probe(f"backend {name}")
    import numpy as np  # noqa: PLC0415

    m = mnn()
    x = probe_input()
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
    import numpy as np  # noqa: PLC0415

    x = probe_input()
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


def known_statuses() -> list[BackendStatus]:
    """Every backend status this process knows (probed here, or told by a worker, its parent or an earlier run)."""
    return list(_CACHE.values())


def note_probe(what: str) -> None:
    """Append a line to the file ``MNN_PARITY_PROBE_LOG`` names, in whichever process probes: how tests (and anyone
    measuring) count the probes a run really made."""
    path = os.environ.get("MNN_PARITY_PROBE_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{os.getpid()} {what}\n")
