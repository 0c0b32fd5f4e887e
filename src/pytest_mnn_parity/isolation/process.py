"""One worker process (``worker.py``) seen from the parent: start it, talk to it, kill it.

Requests and replies are JSON lines over pipes; a reply that does not come in
time is ``WorkerTimedOut``, a worker that is gone (or answers garbage) is
``WorkerDied``.  The worker's stderr goes to a file, whose tail (faulthandler's
stack after a crash, or after SIGUSR1 before a kill) explains what happened.
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Mapping

from ..core.timeline import mark
from ..engine.results import ParitySettings
from ..mnn import native_output
from . import protocol
from .early import take_early
from .launch import LocalPython, WorkerCommand
from .worker import PARENT_PID_ENV

STARTUP_TIMEOUT = 120.0  # importing numpy and MNN; not part of any configuration's time
STACK_DUMP_WAIT = 1.0
TAIL_LINES = 25


class WorkerDied(Exception):
    def __init__(self, returncode: int | None, detail: str = ""):
        self.returncode = returncode
        self.detail = detail
        super().__init__(detail or f"worker ended with {returncode}")


class WorkerTimedOut(Exception):
    pass


# Workers told to exit and not waited for (``Worker.close(wait=False)``), reaped when next seen finished.
_EXITING: list[subprocess.Popen] = []


def reap_exiting() -> int:
    """Reap the workers ``close(wait=False)`` left exiting that have ended; how many are still exiting."""
    _EXITING[:] = [proc for proc in _EXITING if proc.poll() is None]
    return len(_EXITING)


class Worker:
    """One ``python -m pytest_mnn_parity.isolation.worker`` process and its pipes."""

    def __init__(self, settings: ParitySettings, python: os.PathLike | str | None = None,
                 command: WorkerCommand | None = None):
        """``python``: another environment's interpreter (``envs.EnvCache``, one MNN release); it needs only
        MNN and numpy, since this package is imported from our own source through ``PYTHONPATH``.  ``command``:
        how and where the worker starts (``launch.py``: an emulator, another machine); ``python`` is short for
        ``launch.LocalPython(python)``."""
        reap_exiting()
        if command is None:
            command = LocalPython(python=os.fspath(python)) if python is not None else LocalPython()
        self.command = command
        self.python = getattr(command, "python", sys.executable)
        worker_env = {PARENT_PID_ENV: str(os.getpid())} if command.child else {}
        argv, env = command.argv(worker_env), command.environment(worker_env)
        early = take_early(argv, env)
        if early is not None:
            self.stderr, self.proc = early.stderr, early.proc
            mark(f"worker taken over {self.proc.pid}")
        else:
            self.stderr = tempfile.TemporaryFile(prefix="mnn-parity-worker-", suffix=".stderr")
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                         env=env)
            mark(f"worker started {self.proc.pid}")
        self.pid = self.proc.pid
        self.checks = 0
        self.ready = False
        self.hello: dict[str, Any] = {}  # the worker's first line: its pid, MNN's banner
        # Paths of this machine whose files this (remote) worker already holds (``protocol.put_messages``).
        self.sent: set[str] = set()
        self._buffer = b""
        try:
            # A remote worker has no such folder: it stays where ssh put it.
            cwd = None if command.remote else os.getcwd()
            # The folder for MNN's last words: a worker started early (``early.start_early``) has it from here.
            self._send({"op": "init", "settings": protocol.settings_to_wire(settings), "cwd": cwd,
                        "native_dir": None if command.remote else os.environ.get(native_output.SINK_DIR_ENV)})
        except WorkerDied:
            pass  # it died starting up: the first request reports it, with its stderr

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self) -> None:
        """Wait for the worker's imports (not part of any timeout); ``WorkerDied`` if it died starting."""
        if not self.ready:
            self.hello = self._receive(STARTUP_TIMEOUT)
            self.ready = bool(self.hello.get("ready"))

    def request(self, message: Mapping[str, Any], timeout: float | None) -> dict[str, Any]:
        """Send one request and wait for its reply; ``WorkerDied`` / ``WorkerTimedOut`` otherwise."""
        self.wait_ready()
        self._send(message)
        return self._receive(timeout)

    def send(self, message: Mapping[str, Any]) -> None:
        """One message that gets no reply (a file for a remote worker); ``WorkerDied`` if it is gone."""
        self.wait_ready()
        self._send(message)

    def _send(self, message: Mapping[str, Any]) -> None:
        try:
            self.proc.stdin.write(protocol.dumps(dict(message)))
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise WorkerDied(self._reap()) from None

    def _receive(self, timeout: float | None) -> dict[str, Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                raise WorkerTimedOut()
            ready, _, _ = select.select([fd], [], [], wait)
            if not ready:
                continue
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise WorkerDied(self._reap())
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            return protocol.loads(line)
        except ValueError:  # not our JSON: something in the worker wrote over the channel
            self.kill()
            raise WorkerDied(self._reap(), f"it wrote an unreadable answer ({line[:80]!r}...) and was killed") \
                from None

    def _reap(self, wait: float = 10.0) -> int | None:
        try:
            return self.proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:  # alive but not answering: a closed pipe or a hang
            self.proc.kill()
            try:
                return self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # stuck in the kernel (a GPU driver): leave it
                return None

    def kill(self, dump_stack: bool = False) -> int | None:
        """Kill the worker; with ``dump_stack`` ask faulthandler for every thread's stack first."""
        if self.alive() and dump_stack and self.command.signals_reach_worker:
            before = self._stderr_size()
            os.kill(self.pid, signal.SIGUSR1)
            end = time.monotonic() + STACK_DUMP_WAIT
            last, stable_since = before, time.monotonic()
            while time.monotonic() < end:
                time.sleep(0.02)
                size = self._stderr_size()
                if size != last:
                    last, stable_since = size, time.monotonic()
                elif size > before and time.monotonic() - stable_since > 0.1:
                    break
        if self.alive():
            self.proc.kill()
        return self._reap(5)

    def retire(self) -> None:
        """Ask the worker to exit, without waiting for it (``close`` reaps it later)."""
        if self.alive():
            try:
                self.proc.stdin.write(protocol.dumps({"op": "exit"}))
                self.proc.stdin.close()
            except (BrokenPipeError, OSError, ValueError):
                pass

    def close(self, kill: bool = False, wait: bool = True) -> None:
        """End the worker (politely unless ``kill``) and free its pipes; never blocks for long.

        ``wait=False``, for the end of a run: the worker has been told to exit and is not waited for (a GPU
        process's driver teardown takes up to half a second after its last answer); ``reap_exiting`` reaps it
        later in this process, and it dies with this process at the latest (``worker.PARENT_PID_ENV``)."""
        if kill and self.alive():
            self.proc.kill()
        self.retire()
        if wait:
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                try:
                    self.proc.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    pass
        elif self.proc.poll() is None:
            _EXITING.append(self.proc)
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except (OSError, ValueError):
                pass
        self.stderr.close()

    def _stderr_size(self) -> int:
        try:
            return os.fstat(self.stderr.fileno()).st_size
        except (OSError, ValueError):
            return 0

    def stderr_tail(self, lines: int = TAIL_LINES) -> str:
        try:
            size = self._stderr_size()
            self.stderr.seek(max(0, size - 32768))
            text = self.stderr.read().decode("utf-8", errors="replace")
        except (OSError, ValueError):
            return ""
        # faulthandler's list of loaded extension modules says nothing about the fault.
        kept = [line for line in text.splitlines() if line.strip() and not line.startswith("Extension modules:")]
        return "\n".join(kept[-lines:])
