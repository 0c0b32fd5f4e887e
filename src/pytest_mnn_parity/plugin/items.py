"""The generated test items: one per model x backend x precision."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ..core.categories import Category
from ..engine.results import ParityResult
from ..mnn.model import ModelError
from ..mnn.config import RunConfig
from .state import PARITY_RUN, node_id_path  # noqa: F401 (imported from here by the other item modules)


class ParityFailure(Exception):
    """A configuration that gave the wrong answer; its text is the failure message."""


@dataclass(frozen=True)
class Case:
    """One generated item: a configuration, optionally of a conversion variant and a named input set.

    Later axes (API, variants, input sets) extend the id in front of the
    configuration: ``parity[module-fp16-photo1-CPU-low]``.
    """

    config: RunConfig
    variant: str | None = None
    input_set: str | None = None
    # "session" or "module" with --mnn-api both; None: the engine's choice (apis.py).
    api: str | None = None
    # An MNN release (--mnn-versions) that runs this item in a worker of its own environment; None: this
    # process's MNN.  ``bisect``: (good, bad) of --mnn-bisect, the item searching the releases between them.
    mnn_version: str | None = None
    bisect: tuple[str, str] | None = None
    # A place (--mnn-cpu, --mnn-remote: ``places.Place.name``, e.g. "arm64.a76") whose worker runs this item;
    # None: this machine.
    place: str | None = None

    @property
    def id(self) -> str:
        release = f"mnn{self.mnn_version}" if self.mnn_version else None
        search = f"bisect{self.bisect[0]}..{self.bisect[1]}" if self.bisect else None
        return "-".join(part for part in (search, release, self.place, self.api, self.variant, self.input_set,
                                          self.config.id) if part)


class ModelFile(pytest.File):
    """A model named by ``--mnn-model``; its children are the matrix items."""

    error: ModelError | None = None

    def collect(self):
        run = self.config.stash[PARITY_RUN]
        if self.error is not None:
            yield ModelErrorItem.from_parent(self, name="load", error=self.error)
            return
        items = [ParityItem.from_parent(self, name=f"parity[{case.id}]", case=case) for case in run.cases(self.path)]
        items += run.regression.items(self)
        yield from items
        yield from run.inputs.extra_items(self, items)


class ParityItem(pytest.Item):
    def __init__(self, *, case: Case, **kwargs: Any):
        super().__init__(**kwargs)
        self.case = case
        self.run_config = run_config = case.config
        self.result: ParityResult | None = None
        run = self.config.stash[PARITY_RUN]
        status = run.backend_status(run_config.backend, case)
        # A required backend that is not there fails its items (setup), never a skip: a broken GPU box is red.
        self.required_unavailable = ""
        if not status.available and not getattr(status, "fault", None):
            if run.options.requires(run_config.backend):
                self.required_unavailable = run.options.required_unavailable(run_config.backend, status.reason)
            else:
                self.add_marker(pytest.mark.skip(reason=status.reason))
        self.add_marker(pytest.mark.mnn_generated)

    @property
    def model_path(self) -> Path:
        return self.parent.path

    def setup(self) -> None:
        run = self.config.stash[PARITY_RUN]
        if self.required_unavailable:
            self.result = ParityResult(node_id_path(self.model_path, self.config.rootpath), self.run_config,
                                       Category.BACKEND_UNAVAILABLE,
                                       self.required_unavailable, variant=self.case.variant, api=self.case.api,
                                       api_axis=self.case.api is not None, mnn_version=self.case.mnn_version)
            return
        self.result = run.check(self)
        if self.result.category is Category.MODEL_ERROR:
            raise ModelLoadFailure(self.result.message)

    def runtest(self) -> None:
        assert self.result is not None
        if self.result.skipped:
            run = self.config.stash[PARITY_RUN]
            if not run.options.requires(self.run_config.backend):
                pytest.skip(self.result.message)
            # Unavailable where the check ran (a worker's discovery): required, so a failure.
            if not self.required_unavailable:
                self.result.message = run.options.required_unavailable(self.run_config.backend, self.result.message)
            raise ParityFailure(self.result.message)
        if not self.result.passed or (self.result.bisect or {}).get("changed"):
            # A bisection that found the release where the verdict changed fails with it, even for a fix:
            # that release is what was asked for.
            raise ParityFailure(self.result.message)

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, (ParityFailure, ModelLoadFailure)):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        # The failure header shows this domain.  pytest's -v line rewrites a domain that ends the node id as a
        # dotted Python name ("x::mnn::parity[...]", which does not paste back); a domain that is not its suffix
        # leaves the -v line as the node id itself, which pasted after ``pytest`` runs this item.
        return self.model_path, 0, f"{self.parent.name}::{self.name} (MNN parity)"


@dataclass(frozen=True)
class _Crash:
    """What pytest's short summary and ``--tb=line`` read of a failure: its first line."""

    message: str

    def __str__(self) -> str:
        return self.message


class ShownFailure:
    """A parity item's failure as the terminal shows it, set once the run is over (``ParityRun.finish_reports``).

    ``shown`` is what the FAILURES section prints (the whole message, or a short text when the explanation is
    shared and printed once in the summary); ``str()`` stays the whole message, and the short test summary
    (also under CI, where pytest prints a plain-text failure whole) gets its first line.
    """

    def __init__(self, full: str, shown: str):
        self.full, self.shown = full, shown
        self.reprcrash = _Crash(shown.splitlines()[0] if shown else "")

    def toterminal(self, tw) -> None:
        for line in self.shown.splitlines():
            tw.line(line)

    def __str__(self) -> str:
        return self.full


class ModelLoadFailure(pytest.fail.Exception):
    """The model cannot be tested at all (missing, corrupt, unconvertible, unrunnable reference).

    A ``pytest.fail`` exception without traceback: pytest renders setup errors
    with ``_repr_failure_py``, not ``repr_failure``, and shows only the message
    for these instead of pytest's own call stack.
    """

    def __init__(self, message: str):
        super().__init__(message, pytrace=False)


class ModelErrorItem(pytest.Item):
    """Stands for a ``--mnn-model`` argument that led to no loadable model."""

    def __init__(self, *, error: ModelError, **kwargs: Any):
        super().__init__(**kwargs)
        self.error = error

    def setup(self) -> None:
        raise ModelLoadFailure(str(self.error))

    def runtest(self) -> None:  # pragma: no cover - setup always raises
        raise ModelLoadFailure(str(self.error))

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, ModelLoadFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return self.path, 0, f"{self.parent.name}::{self.name} (MNN parity)"

