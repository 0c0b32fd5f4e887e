"""Capture what MNN's C++ code writes to the process's stdout and stderr.

MNN prints from C++ (``The device supports: ...`` on import, ``Can't Find type=3
backend, use 0 instead`` on a silent fallback, ``Converted Failed!`` from the
converter).  Python-level redirection cannot see those bytes, so we swap the
file descriptors themselves.  The text is kept: it is evidence (a fallback, a
shape error) that goes into failure messages instead of into the terminal.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Iterator

# fd swapping is process-wide; two threads doing it at once would steal each
# other's output, so they queue.
_LOCK = threading.RLock()


@dataclass
class CapturedOutput:
    """Text the native code wrote while the ``capture_native_output`` block ran."""

    text: str = ""
    lines: list[str] = field(default_factory=list)


@contextlib.contextmanager
def capture_native_output() -> Iterator[CapturedOutput]:
    captured = CapturedOutput()
    with _LOCK:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (AttributeError, ValueError):
                pass
        with tempfile.TemporaryFile(mode="w+b") as sink:
            saved = [os.dup(1), os.dup(2)]
            try:
                os.dup2(sink.fileno(), 1)
                os.dup2(sink.fileno(), 2)
                try:
                    yield captured
                finally:
                    _flush_c_stdio()
                    os.dup2(saved[0], 1)
                    os.dup2(saved[1], 2)
            finally:
                for fd in saved:
                    os.close(fd)
                sink.seek(0)
                captured.text = sink.read().decode("utf-8", errors="replace")
                captured.lines = [line for line in captured.text.splitlines() if line.strip()]


def _flush_c_stdio() -> None:
    # C's stdout is block-buffered when it is not a terminal: without fflush the
    # bytes would land after we restore the descriptor, in the user's terminal.
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):  # pragma: no cover - non-POSIX libc
        pass
