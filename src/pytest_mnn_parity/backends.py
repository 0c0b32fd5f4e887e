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

import numpy as np

from .mnn_import import mnn
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


def canonical_backend(name: str) -> str:
    upper = name.strip().upper()
    if upper not in FORWARD_TYPES:
        raise ValueError(f"unknown MNN backend {name!r}; known: {', '.join(DEFAULT_BACKENDS)}, AUTO")
    return upper


def canonical_precision(name: str) -> str:
    for known in PRECISIONS:
        if name.strip().lower() == known.lower():
            return known
    raise ValueError(f"unknown MNN precision {name!r}; known: {', '.join(PRECISIONS)}")


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


def probe_backend(name: str) -> BackendStatus:
    """Try ``name`` for real: create a session, check where it runs, run it."""
    name = canonical_backend(name)
    m = mnn()
    x = np.array([[0.5, -1.0, 2.0, 3.25]], dtype=np.float32)
    with capture_native_output() as out:
        try:
            interpreter = m.Interpreter(str(_probe_model()))
            session = interpreter.createSession({"backend": name, "precision": "high", "numThread": 1})
            forward = session_forward_type(interpreter, session)
            rc, y = None, None
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
    if not runs_as(name, forward):
        return BackendStatus(name, False, forward,
                             f"{name}: not in this MNN build (session fell back to {forward_name(forward)})", out.text)
    if rc != 0:
        return BackendStatus(name, False, forward, f"{name}: reports itself but its probe run failed (code {rc})",
                             out.text)
    if y is None or not np.allclose(y, 2 * x + 1, rtol=1e-2, atol=1e-2):
        return BackendStatus(name, False, forward,
                             f"{name}: reports itself but computed {y} for 2x+1 of {x} (unusable device?)", out.text)
    return BackendStatus(name, True, forward, f"{name}: available (forward type {forward})", out.text)


_CACHE: dict[str, BackendStatus] = {}


def discover(names) -> dict[str, BackendStatus]:
    """Probe each backend once per process (GPU session creation can take seconds)."""
    result = {}
    for raw in names:
        name = canonical_backend(raw)
        if name not in _CACHE:
            forced = _forced_unavailable()
            if name in forced:
                _CACHE[name] = BackendStatus(name, False, None, f"{name}: disabled by MNN_PARITY_DISABLE_BACKENDS")
            else:
                _CACHE[name] = probe_backend(name)
        result[name] = _CACHE[name]
    return result


def _forced_unavailable() -> set[str]:
    # An escape hatch for machines where probing a backend hangs the driver.
    raw = os.environ.get("MNN_PARITY_DISABLE_BACKENDS", "")
    return {part.strip().upper() for part in raw.split(",") if part.strip()}
