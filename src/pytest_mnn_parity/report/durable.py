"""The JSON report, kept valid on disk while the run goes on.

A run that is killed (CI time limit, OOM killer, a segfault in-process) must
still leave a report of what finished.  So the report is rewritten after items
finish, each time atomically (a temporary file beside it, then a rename): a
reader sees the previous complete report or the next one, never half of one.

Rewriting everything after every item would be quadratic in serialisation
work, so each record is serialised once, when it arrives, and a rewrite only
joins the stored texts.  Rewrites are also throttled: the next one waits at
least ``ratio`` times as long as the last one took, which bounds the time
spent writing to about 1/``ratio`` of the run.  A record that arrives inside
that window is written when the window ends, by a timer, not only when the
next record comes (which, after a slow model, could be minutes later).  In
practice a rewrite takes about a millisecond.

The text written is exactly what ``core.files.write_json`` writes for
the same records (tested), so incremental and final reports read the same.
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from ..core.files import atomic_write, json_safe


class IncrementalReport:
    def __init__(self, path: os.PathLike | str, header: Callable[[], dict[str, Any]], *, ratio: float = 10.0):
        self.path = Path(path)
        self.header = header
        self.ratio = ratio
        self._parts: list[str] = []
        self._counts: dict[str, int] = {}
        self._dirty = False
        self._last_end: float | None = None
        self._last_cost = 0.0
        self._head: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self.writes = 0
        self.write_seconds = 0.0

    def add(self, record: dict[str, Any]) -> None:
        text = json.dumps(json_safe(record), indent=2, allow_nan=False)
        # The header is taken here, in the caller's thread: the first call may import
        # MNN or start a worker process, which a timer thread must never do.
        head = self.header()
        with self._lock:
            self._parts.append("    " + text.replace("\n", "\n    "))
            self._counts[record["outcome"]] = self._counts.get(record["outcome"], 0) + 1
            self._head = head
            self._dirty = True
            wait = self._wait()
            if wait <= 0:
                self._write()
            elif self._timer is None:
                self._start_timer(wait)

    def flush(self) -> None:
        """Write the report now (also with no records: the final write of an empty run)."""
        head = self.header()
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._head = head
            self._write()

    def _wait(self) -> float:
        """Seconds until the next rewrite is due (the last one's cost times ``ratio`` after it ended)."""
        return 0.0 if self._last_end is None else self._last_end + self.ratio * self._last_cost - time.monotonic()

    def _start_timer(self, wait: float) -> None:
        self._timer = threading.Timer(wait, self._on_timer)
        self._timer.daemon = True
        self._timer.start()

    def _on_timer(self) -> None:
        with self._lock:
            self._timer = None
            if not self._dirty:
                return
            # A record that came after the timer was set may have been written already, and that write set a new
            # due time: a timer set for the write before it must not rewrite early (found by the throttle's test).
            wait = self._wait()
            if wait > 0:
                self._start_timer(wait)
            else:
                self._write()

    def _write(self) -> None:
        started = time.monotonic()
        atomic_write(self.path, self.text(self._head))
        self._last_end = time.monotonic()
        self._last_cost = self._last_end - started
        self.writes += 1
        self.write_seconds += self._last_cost
        self._dirty = False

    def text(self, header: dict[str, Any] | None = None) -> str:
        head = dict(header if header is not None else self.header())
        head["summary"] = dict(self._counts)
        head.pop("results", None)
        text = json.dumps(json_safe(head), indent=2, allow_nan=False)
        results = "[\n" + ",\n".join(self._parts) + "\n  ]" if self._parts else "[]"
        return text[:-2] + ',\n  "results": ' + results + "\n}\n"

    @property
    def dirty(self) -> bool:
        return self._dirty


def report_path_problem(path: os.PathLike | str) -> str | None:
    """Why the report cannot be written at ``path``, found before any model runs; None if it can.

    Tries for real (a temporary file in the nearest existing folder), so a
    read-only file system or a root-owned folder is caught as well as a path
    that runs through a file.
    """
    target = Path(path).absolute()
    if target.is_dir():
        return f"{path} is a directory; give a file name, e.g. {Path(path) / 'mnn-parity.json'}"
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is a file, so no folder can be made under it"
    try:
        fd, probe = tempfile.mkstemp(prefix=".mnn-parity-write-test.", dir=parent)
    except OSError as exc:
        return f"cannot create files in {parent} ({exc.strerror or exc})"
    os.close(fd)
    os.unlink(probe)
    return None
