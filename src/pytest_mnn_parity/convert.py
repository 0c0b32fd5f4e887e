"""Convert ONNX models to ``.mnn`` in-process and offline.

We call the converter's C++ entry point ``_tools.mnnconvert`` directly.  The
Python wrapper ``MNN.tools.mnnconvert`` must never be used: it pip-installs a
logging SDK and sends the machine id to a remote service.  The C++ entry point
returns True even when conversion failed, so success is judged by the output
file and the converter's own log.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .mnn_import import mnn
from .native_output import capture_native_output


class ConversionError(RuntimeError):
    """The converter did not produce a model; ``log`` holds what it said."""

    def __init__(self, source: Path, reason: str, log: str):
        self.source = source
        self.reason = reason
        self.log = log
        super().__init__(f"{source}: MNN conversion failed: {reason}")


@dataclass(frozen=True)
class ConversionResult:
    source: Path
    target: Path
    flags: tuple[str, ...]
    log: str


_TIMESTAMP = re.compile(r"^\[\d\d:\d\d:\d\d\]\s*:\d+:\s*")
_UNSUPPORTED_OP = re.compile(r"(?:not support|Don't support|unsupported)[^\n]*?([A-Z][A-Za-z0-9_]+)", re.I)


def convert_onnx(source: os.PathLike | str, target: os.PathLike | str, *, fp16: bool = False,
                 extra_flags: Sequence[str] = ()) -> ConversionResult:
    """Convert ``source`` (ONNX) to ``target`` (.mnn); raise ``ConversionError`` on failure."""
    source, target = Path(source), Path(target)
    if not source.is_file():
        raise ConversionError(source, "no such file", "")
    flags = ["--fp16"] if fp16 else []
    flags += list(extra_flags)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    argv = ["mnnconvert", "-f", "ONNX", "--modelFile", str(source), "--MNNModel", str(partial),
            "--bizCode", "pytest-mnn-parity", *flags]
    tools = _converter_module()
    with capture_native_output() as out:
        tools.mnnconvert(argv)
    log = out.text
    failed = "Converted Failed" in log or not partial.is_file() or partial.stat().st_size == 0
    if failed:
        partial.unlink(missing_ok=True)
        raise ConversionError(source, _failure_reason(log), log)
    os.replace(partial, target)
    return ConversionResult(source, target, tuple(flags), log)


def _failure_reason(log: str) -> str:
    ops = sorted(set(_UNSUPPORTED_OP.findall(log)))
    if ops:
        return "unsupported operator(s): " + ", ".join(ops)
    lines = [_TIMESTAMP.sub("", line).strip() for line in log.splitlines() if line.strip()]
    errors = [line for line in lines if "ERROR" in line or "Check failed" in line or "Failed" in line]
    chosen = errors or lines[-3:]
    return "; ".join(chosen) if chosen else "the converter wrote no file and said nothing"


def _converter_module():
    mnn()  # the converter links against MNN; import it quietly first
    with capture_native_output():
        import _tools  # noqa: PLC0415 - the in-process converter, shipped in the mnn wheel
    return _tools
