"""The run's first isolated worker, started before the run's settings are known.

On a small run the longest thing on the critical path is the worker's own start: a fresh interpreter importing
numpy, MNN and the engine (issue 22's timeline).  The plugin starts it here at the very beginning of pytest's
configure, before it imports the engine itself, so both imports overlap; the first ``process.Worker`` that would
start the same command takes it over.  Kept apart from ``process.py`` so that starting it imports nothing heavy.
"""
from __future__ import annotations

import atexit
import os
import shlex
import subprocess
import tempfile
from typing import Mapping, Sequence

from ..core.timeline import mark
from ..mnn import native_output
from .launch import LocalPython
from .worker import PARENT_PID_ENV


class EarlyWorker:
    """A local worker process started before its settings are known (``start_early``), not yet a ``Worker``."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        self.argv, self.env = argv, env
        self.stderr = tempfile.TemporaryFile(prefix="mnn-parity-worker-", suffix=".stderr")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     env=env)

    def matches(self, argv: list[str], env: Mapping[str, str]) -> bool:
        # The folder for MNN's last words is made later by the isolation; the worker gets it with ``init``.
        def same(e: Mapping[str, str]) -> dict[str, str]:
            return {k: v for k, v in e.items() if k != native_output.SINK_DIR_ENV}
        return self.proc.poll() is None and argv == self.argv and same(env) == same(self.env)

    def discard(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - stuck in the kernel
            pass
        for stream in (self.proc.stdin, self.proc.stdout, self.stderr):
            try:
                stream.close()
            except (OSError, ValueError):
                pass


_early: EarlyWorker | None = None


def start_early() -> None:
    """Start this interpreter's first local worker now, before the run's settings are final, so its interpreter
    start and imports (numpy, MNN, the engine: the longest thing on a small run's critical path) overlap the
    parent's own start-up (issue 22's timeline).  The first ``Worker`` that would start the same command in the
    same environment takes it over (its settings go with ``init``, which the worker reads after its imports);
    one that differs (another Python, a variable set since) starts its own and this one is killed.  Never
    taken: ``discard_early`` (the plugin, at the run's end), atexit, and the worker's own parent-death signal."""
    global _early
    if _early is not None:
        return
    command = LocalPython()
    worker_env = {PARENT_PID_ENV: str(os.getpid())}
    _early = EarlyWorker(command.argv(worker_env), command.environment(worker_env))
    mark(f"early worker started {_early.proc.pid}")
    atexit.register(discard_early)


# Words of a command line after which a run may start no local worker, or start it elsewhere: pytest-xdist's
# controller (its workers check the models), help and version, and --mnn-isolate never.
_NO_WORKER = ("-n", "--numprocesses", "--dist", "--tx", "-h", "--help", "--version", "-V")


def command_line_starts_a_worker(args: Sequence[str], addopts: str = "") -> bool:
    """Whether pytest's command line ``args`` (and ``PYTEST_ADDOPTS``) name a model and say nothing that could
    mean that no local worker runs.  Read before pytest parses anything, at the plugin's import, so it only
    looks at words: an ini file's ``addopts`` or ``mnn_isolate`` it cannot see (``pytest_configure`` decides
    with the final options and kills a worker started for nothing)."""
    try:
        words = [*shlex.split(addopts), *args]
    except ValueError:
        return False
    model = isolate = False
    for i, word in enumerate(words):
        if word == "--":
            break
        if word == "--mnn-model" or word.startswith("--mnn-model="):
            model = True
        if word in ("--mnn-isolate=never",) or (word == "--mnn-isolate" and words[i + 1:i + 2] == ["never"]):
            isolate = True
        if word in _NO_WORKER or word.startswith(("-n", "--numprocesses=", "--dist=", "--tx=")):
            return False
    return model and not isolate


def current() -> EarlyWorker | None:
    """The early worker not yet taken over, if any."""
    return _early


def discard_early() -> None:
    """Kill the early worker if no ``Worker`` took it over."""
    global _early
    early, _early = _early, None
    if early is not None:
        early.discard()


def take_early(argv: list[str], env: Mapping[str, str]) -> EarlyWorker | None:
    global _early
    early, _early = _early, None
    if early is None:
        return None
    if early.matches(argv, env):
        return early
    early.discard()
    return None
