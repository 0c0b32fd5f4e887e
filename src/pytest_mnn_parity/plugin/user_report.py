"""The report entry of a user's test item: its category, outcome and metrics, as generated items have.

Entries are plain dicts attached to the pytest report (``report.mnn_parity``),
so they travel from pytest-xdist workers to the controller like the
generated items' ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

from ..core.categories import CATEGORY_ORDER, Category
from ..mnn import backends as backend_discovery
from ..mnn.model import ModelError
from ..report.records import record
from .user_cases import CASE, MissingModel, UserCase
from .user_markers import MarkerError, matrix_row, required_backends

if TYPE_CHECKING:  # pragma: no cover
    from ..engine.results import ParityResult

RESULTS = pytest.StashKey[list]()
LAST_RUN = pytest.StashKey["RunSummary"]()
SETUP_FAILURE = pytest.StashKey[tuple]()


@dataclass(frozen=True)
class RunSummary:
    """Where and how fast a test's last ``mnn_run`` ran (kept instead of its outputs, which can be large)."""

    forward_type: int | None
    backend_used: str | None
    seconds: float
    rc: int


def user_record(item, case: UserCase, report, category: str, message: str) -> dict[str, Any]:
    """The report entry of one user test item; the layout of generated items' plus ``test`` and ``checks``."""
    from ..engine.results import ParityResult

    results = item.stash.get(RESULTS, [])
    worst = worst_result(results)
    base = worst if worst is not None else ParityResult(case.model_label, case.config, Category.OK, "")
    last = item.stash.get(LAST_RUN, None)
    if worst is None and last is not None:
        base.forward_type, base.backend_used = last.forward_type, last.backend_used
        base.seconds, base.rc = last.seconds, last.rc
    data = record(item.nodeid, base, _outcome(report))
    data.update(model=case.model_label, category=category, message=message,
                test=matrix_row(item.nodeid, case.config.id), checks=len(results))
    return data


def classify(excinfo, results: list[ParityResult], unavailable: set[str]) -> tuple[str, str]:
    """A user test's category: its worst comparison, else how it stopped."""
    from ..engine.user_inputs import MnnRunError

    worst = worst_result(results)
    exc = excinfo.value if excinfo is not None else None
    if worst is not None and not worst.passed:
        return worst.category.value, worst.message
    if isinstance(exc, MnnRunError):
        return exc.category.value, str(exc)
    if isinstance(exc, (ModelError, MissingModel)):
        return Category.MODEL_ERROR.value, str(exc)
    if isinstance(exc, pytest.skip.Exception):
        reason = str(exc.msg)
        return ("backend_unavailable" if reason in unavailable else "skipped"), reason
    if exc is not None:
        return "test_failed", excinfo.exconly()[:2000]
    return Category.OK.value, ""


def worst_result(results: list[ParityResult]) -> ParityResult | None:
    """The most severe comparison, the first among equals."""
    return min(results, key=lambda r: CATEGORY_ORDER.index(r.category)) if results else None


def unavailable_reasons(item, case: UserCase) -> set[str]:
    names = [case.config.backend]
    try:
        names += required_backends(item.iter_markers("mnn_requires_backend"), item.nodeid)
    except MarkerError:
        pass
    return {s.reason for s in backend_discovery.discover(names).values() if not s.available}


def matrix_case(item) -> UserCase | None:
    callspec = getattr(item, "callspec", None)
    case = callspec.params.get(CASE) if callspec is not None else None
    return case if isinstance(case, UserCase) and case.config is not None else None


def _outcome(report) -> str:
    if hasattr(report, "wasxfail"):
        return "xfailed" if report.skipped else "xpassed"
    if report.when != "call" and report.failed:
        return "error"
    return report.outcome
