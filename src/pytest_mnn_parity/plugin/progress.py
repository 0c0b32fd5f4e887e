"""A progress line per model during long runs: model, configurations done/total, elapsed.

pytest's dots say nothing about where a run of 16 configurations x 30 models
is.  Every ``interval`` seconds at most, when an item finishes, its model's
progress is written as a line of its own; a model that took longer than that
also gets a line when its last item finishes.

When: an interactive terminal outside CI gets a line every 10 s; a log that
is not a terminal, or any run with CI set, gets none (a CI log keeps pytest's
own lines), unless ``--mnn-progress SECONDS`` asks for them; ``-q`` and
``--mnn-progress 0`` turn them off.  Under pytest-xdist the controller writes
them, counting what the workers collected.
"""
from __future__ import annotations

import os
import sys
import time
from collections import Counter

import pytest

from .scaleout import model_scope

DEFAULT_INTERVAL = 10.0


def interval_for(given: float | None, verbosity: int, isatty: bool, environ=os.environ) -> float | None:
    """Seconds between lines, or None for no lines at all."""
    if verbosity < 0 or given == 0:
        return None
    if given is not None:
        return given
    if not isatty or environ.get("CI"):
        return None
    return DEFAULT_INTERVAL


def progress_line(model: str, done: int, total: int, elapsed: float) -> str:
    minutes, seconds = divmod(int(round(elapsed)), 60)
    clock = f"{minutes}m{seconds:02d}s" if minutes else f"{elapsed:.1f} s"
    return f"mnn-parity progress: {model}: {done}/{total} configurations done, {clock} elapsed"


class Progress:
    """Counts each model's finished items and writes the lines (a plugin of its own, in the controller)."""

    def __init__(self, config: pytest.Config, interval: float, clock=time.monotonic):
        self.config, self.interval, self.clock = config, interval, clock
        self.total: Counter = Counter()
        self.done: Counter = Counter()
        self.started: dict[str, float] = {}
        self.last_line = clock()

    @classmethod
    def install(cls, config: pytest.Config, given: float | None) -> None:
        if hasattr(config, "workerinput"):
            return  # an xdist worker: the controller counts
        interval = interval_for(given, config.get_verbosity(), sys.stdout.isatty())
        if interval is not None:
            config.pluginmanager.register(cls(config, interval), "mnn-parity-progress")

    def expect(self, nodeids) -> None:
        self.total = Counter(model for model in map(model_scope, nodeids) if model is not None)

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.expect(item.nodeid for item in session.items)

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node, ids) -> None:
        if not self.total:  # every worker collects the same ids
            self.expect(ids)

    def pytest_runtest_logstart(self, nodeid: str) -> None:
        model = model_scope(nodeid)
        if model is not None:
            self.started.setdefault(model, self.clock())

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        model = model_scope(report.nodeid)
        if model is None or report.when != "teardown" or model not in self.total:
            return
        self.done[model] += 1
        now = self.clock()
        elapsed = now - self.started.get(model, now)
        finished = self.done[model] >= self.total[model]
        if now - self.last_line >= self.interval or (finished and elapsed >= self.interval):
            self.last_line = now
            self.write(progress_line(model, self.done[model], self.total[model], elapsed))

    def write(self, line: str) -> None:
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is None:
            return
        if self.config.pluginmanager.has_plugin("dsession"):
            # pytest-xdist's controller writes every result onto one line of dots, which the reporter does not
            # track as a file's line: end it here.
            reporter.write("\n")
        reporter.write_line(line)
        # The next result starts a line of its own with its file's name again, as after a new file.
        reporter.currentfspath = None
