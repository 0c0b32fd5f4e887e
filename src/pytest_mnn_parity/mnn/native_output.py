"""Capture what MNN's C++ code writes to the process's stdout and stderr.

MNN prints from C++ (``The device supports: ...`` on import, ``Can't Find type=3
backend, use 0 instead`` on a silent fallback, ``Converted Failed!`` from the
converter).  Python-level redirection cannot see those bytes, so we swap the
file descriptors themselves.  The text is kept: it is evidence (a fallback, a
shape error) that goes into failure messages instead of into the terminal.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Iterator

# fd swapping is process-wide; two threads doing it at once would steal each
# other's output, so they queue.
_LOCK = threading.RLock()
# One sink file per process, emptied before each use: opening a temporary file
# per capture cost more than the MNN calls it wrapped on small models.
_SINK = None
_DEPTH = 0


@dataclass
class CapturedOutput:
    """Text the native code wrote while the ``capture_native_output`` block ran."""

    text: str = ""
    lines: list[str] = field(default_factory=list)


# The folder where isolated workers keep their capture files (set by the parent, inherited by its workers,
# removed with everything in it when the parent is done).
SINK_DIR_ENV = "MNN_PARITY_NATIVE_DIR"


def sink_path(pid: int) -> str:
    """Where process ``pid`` keeps its capture when ``keep_in_file`` was called (an isolated worker)."""
    return os.path.join(os.environ.get(SINK_DIR_ENV) or tempfile.gettempdir(), f"mnn-parity-native-{pid}.log")


def keep_in_file() -> str:
    """Capture into a named file (``sink_path``) instead of an anonymous one: a process that MNN kills in the
    middle of a call (an abort while it creates a session) leaves there what MNN said last, for its parent
    to read.  Each capture empties it first, so it holds the dying call's words only."""
    global _SINK
    path = sink_path(os.getpid())
    with _LOCK:
        _SINK = open(path, "w+b")  # noqa: SIM115 - kept open for the process's lifetime, as the anonymous one
    return path


def last_words_of(pid: int, remove: bool = True) -> str:
    """What process ``pid`` (dead) captured from MNN in its last call; "" when it kept no file."""
    path = sink_path(pid)
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    if remove:
        with contextlib.suppress(OSError):
            os.remove(path)
    return text


@contextlib.contextmanager
def capture_native_output() -> Iterator[CapturedOutput]:
    global _SINK, _DEPTH
    captured = CapturedOutput()
    with _LOCK:
        if _DEPTH:
            # Nested capture: the outer one already holds the descriptors and
            # will collect this text too.
            _DEPTH += 1
            try:
                yield captured
            finally:
                _DEPTH -= 1
            return
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (AttributeError, ValueError):
                pass
        if _SINK is None:
            _SINK = tempfile.TemporaryFile(mode="w+b")
        # Raw fd calls, never the file object's buffered seek/truncate/read: those cost
        # more than the fd swap itself, once per MNN call.  The sink is emptied after use.
        sink = _SINK.fileno()
        saved = [os.dup(1), os.dup(2)]
        _DEPTH = 1
        try:
            os.dup2(sink, 1)
            os.dup2(sink, 2)
            try:
                yield captured
            finally:
                _flush_c_stdio()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
        finally:
            _DEPTH = 0
            for fd in saved:
                os.close(fd)
            # The fds shared the sink's offset; read from the start regardless.
            size = os.fstat(sink).st_size
            if size:
                captured.text = os.pread(sink, size, 0).decode("utf-8", errors="replace")
                captured.lines = [line for line in captured.text.splitlines() if line.strip()]
                os.ftruncate(sink, 0)
            os.lseek(sink, 0, os.SEEK_SET)


def _flush_c_stdio() -> None:
    # C's stdout is block-buffered when it is not a terminal: without fflush the
    # bytes would land after we restore the descriptor, in the user's terminal.
    fflush = _libc_fflush()
    if fflush is not None:
        fflush(None)


@functools.lru_cache(maxsize=1)
def _libc_fflush():
    try:
        import ctypes

        return ctypes.CDLL(None).fflush
    except (OSError, AttributeError):  # pragma: no cover - non-POSIX libc
        return None
