"""Convert ONNX models to ``.mnn`` offline, in-process or in a child process.

We call the converter's C++ entry point ``_tools.mnnconvert`` directly.  The
Python wrapper ``MNN.tools.mnnconvert`` must never be used: it pip-installs a
logging SDK and sends the machine id to a remote service.  The C++ entry point
returns True even when conversion failed, so success is judged by the output
file and the converter's own log.

``isolated=True`` runs the same entry point in a child Python process: MNN
3.6.1's converter segfaults on some graphs (an ONNX STFT without window or
frame_length, for one), and a crash in-process would end the whole test run
instead of failing one model.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..mnn.library import mnn
from ..mnn.native_output import capture_native_output


class ConversionError(RuntimeError):
    """The converter did not produce a model; ``log`` holds what it said.

    ``ops`` are the ONNX op types the converter named as unsupported, ``opset``
    the model's default-domain opset (when the converter got that far), ``hint``
    what to do about it and ``signal`` the signal that killed an isolated
    converter (``None`` unless it crashed).
    """

    def __init__(self, source: Path, reason: str, log: str, *, ops: Sequence[str] = (), opset: int | None = None,
                 hint: str = "", signal: str | None = None):
        self.source = source
        self.reason = reason
        self.log = log
        self.ops = tuple(ops)
        self.opset = opset
        self.hint = hint
        self.signal = signal
        super().__init__(f"{source}: MNN conversion failed: {reason}")


@dataclass(frozen=True)
class ConversionResult:
    source: Path
    target: Path
    flags: tuple[str, ...]
    log: str


_TIMESTAMP = re.compile(r"^\[\d\d:\d\d:\d\d\]\s*:\d+:\s*")
# MNN 3.6.1 (tools/converter/source/onnx/onnxConverter.cpp) lists every op it
# has no converter for on one line: "These Op Not Support: ONNX::DFT | ONNX::HannWindow".
_NOT_SUPPORTED = re.compile(r"These Op Not Support:\s*(.*)")
_OPSET = re.compile(r"ONNX Model opset version:\s*(\d+)")
# Other phrasings seen in older converters' logs.
_UNSUPPORTED_OP = re.compile(r"(?:not support|Don't support|unsupported)\s*(?:op(?:erator)?s?)?\s*[:=]?\s*"
                             r"(?:ONNX::)?([A-Z][A-Za-z0-9_]+)", re.I)
# Op-specific advice; anything else gets the generic hint.
_OP_HINTS = {
    "DFT": "write the FFT as MatMul with DFT matrices (cos and -sin), as exported LaMa graphs do",
    "STFT": "frame the signal with Conv/Slice and write the FFT as MatMul with DFT matrices",
    "HannWindow": "compute the window at export time and store it as a constant",
    "HammingWindow": "compute the window at export time and store it as a constant",
    "BlackmanWindow": "compute the window at export time and store it as a constant",
}
CHILD_TIMEOUT_S = 3600
_CHILD = """
import ctypes, sys
try:  # unbuffered C stdio: a segfault must not swallow what the converter said before it
    libc = ctypes.CDLL(None)
    libc.setvbuf(ctypes.c_void_p.in_dll(libc, "stdout"), None, 2, 0)
except Exception:
    pass
import _tools
_tools.mnnconvert(sys.argv[1:])
"""


def convert_onnx(source: os.PathLike | str, target: os.PathLike | str, *, fp16: bool = False,
                 extra_flags: Sequence[str] = (), isolated: bool = False) -> ConversionResult:
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
    killed_by = None
    if isolated:
        log, killed_by = _run_child(source, argv)
    else:
        tools = _converter_module()
        with capture_native_output() as out:
            tools.mnnconvert(argv)
        log = out.text
    failed = killed_by or "Converted Failed" in log or not partial.is_file() or partial.stat().st_size == 0
    if failed:
        partial.unlink(missing_ok=True)
        _weight_file(partial).unlink(missing_ok=True)
        raise failure(source, log, killed_by)
    os.replace(partial, target)
    # Large models get their weights in "<model>.weight", named after the file
    # the converter wrote; MNN looks for it next to the final name.
    if _weight_file(partial).is_file():
        os.replace(_weight_file(partial), _weight_file(target))
    return ConversionResult(source, target, tuple(flags), log)


def _weight_file(path: Path) -> Path:
    return path.with_name(path.name + ".weight")


def _run_child(source: Path, argv: list[str]) -> tuple[str, str | None]:
    try:
        proc = subprocess.run([sys.executable, "-c", _CHILD, *argv], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        text = (exc.stdout or b"").decode("utf-8", errors="replace")
        return text, f"timeout after {CHILD_TIMEOUT_S} s"
    text = proc.stdout.decode("utf-8", errors="replace")
    # What MNN prints when it is imported, not what the converter said.
    text = "".join(line for line in text.splitlines(keepends=True) if "device supports" not in line)
    if proc.returncode < 0:
        return text, _signal_name(-proc.returncode)
    if proc.returncode != 0 and "Converted Success" not in text:
        return text, f"exit status {proc.returncode}"
    return text, None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def unsupported_ops(log: str) -> list[str]:
    """The op types the converter's log names as unsupported, in the order it named them."""
    ops: list[str] = []
    for match in _NOT_SUPPORTED.finditer(log):
        for part in match.group(1).split("|"):
            name = part.strip().split("::")[-1].strip()
            if name and name not in ops:
                ops.append(name)
    if not ops:
        for name in _UNSUPPORTED_OP.findall(log):
            if name not in ops and name.upper() != "ONNX":
                ops.append(name)
    return ops


def log_opset(log: str) -> int | None:
    match = _OPSET.search(log)
    return int(match.group(1)) if match else None


def failure(source: Path, log: str, killed_by: str | None = None) -> ConversionError:
    """The most specific ``ConversionError`` the converter's log allows."""
    ops, opset = unsupported_ops(log), log_opset(log)
    at = f" (opset {opset})" if opset is not None else ""
    version = _mnn_version()
    if ops:
        specific = [f"{op}: {_OP_HINTS[op]}" for op in ops if op in _OP_HINTS]
        hint = "; ".join(specific + [
            f"MNN {version} has no converter for {', '.join(ops)}: replace them in the model or the exporter "
            "(e.g. a decomposition into supported ops), or register an MNN custom op; "
            "`MNNConvert -f ONNX --OP` lists the supported ops"])
        return ConversionError(source, f"unsupported ONNX operator(s) {', '.join(ops)}{at}", log, ops=ops,
                               opset=opset, hint=hint, signal=killed_by)
    if killed_by is not None:
        said = [_TIMESTAMP.sub("", line).strip() for line in log.splitlines() if line.strip()]
        last = f" after {said[-1]!r}" if said else ""
        return ConversionError(
            source, f"the converter crashed ({killed_by}){last}{at}", log, opset=opset,
            signal=killed_by,
            hint=f"a bug in MNN {version}'s converter triggered by this graph: check the model with "
                 "onnx.checker and ONNX Runtime, simplify it (onnxsim), or try another MNN release")
    return ConversionError(source, _reason_lines(log), log, opset=opset,
                           hint="check the model with onnx.checker and ONNX Runtime; the converter's log is below")


def _reason_lines(log: str) -> str:
    lines = [_TIMESTAMP.sub("", line).strip() for line in log.splitlines() if line.strip()]
    lines = [line for line in lines if "device supports" not in line]
    errors = [line for line in lines if "ERROR" in line or "Check failed" in line or "Failed" in line]
    chosen = errors or lines[-3:]
    return "; ".join(chosen) if chosen else "the converter wrote no file and said nothing"


def _mnn_version() -> str:
    try:
        return str(mnn().version())
    except Exception:  # noqa: BLE001 - only used in a hint
        return "(unknown version)"


def _converter_module():
    mnn()  # the converter links against MNN; import it quietly first
    with capture_native_output():
        import _tools  # noqa: PLC0415 - the in-process converter, shipped in the mnn wheel
    return _tools
