"""One run's records and what is written from them: the JSON report (rewritten as items finish, so a killed
run still leaves one), the HTML page, and the terminal's "explained once" groups of failures.

``ParityRun`` makes one and the hooks hand it every report; it needs of the run only its options, whether it
checks models and how each backend was found.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable

import pytest

from ..core.categories import Category
from ..core.files import json_safe
from ..mnn.library import mnn_version
from ..report.durable import IncrementalReport
from ..report.explained import SharedFailure, explained_lines, item_text, shared_failures
from ..report.records import RECORD_FIELDS, build_report, peak_rss, record
from ..report.scoreboard import build as build_scoreboard
from .options import Options
from .state import is_parity_item, node_id_path

if TYPE_CHECKING:  # pragma: no cover
    from ..engine.results import ParityResult
    from .items import ModelErrorItem


class RunReport:
    """The records of one pytest run's parity items and the report files written from them."""

    def __init__(self, options: Options, backend_status: Callable[[str], Any], active: Callable[[], bool]):
        self.options = options
        self.backend_status = backend_status
        self._active = active
        self._records: list[dict[str, Any]] = []
        # This process's failing reports with their records: their terminal text is settled once the run is
        # over (finish_reports), when it is known which explanations several items share.
        self._failing: list[tuple[pytest.TestReport, dict[str, Any]]] = []
        self._shared: list[SharedFailure] = []
        # False in a pytest-xdist worker: the controller writes the files from every worker's records.
        self.writes_report = True
        self._report: IncrementalReport | None = None
        self._final = False

    @property
    def active(self) -> bool:
        return self._active()

    def record_for(self, item: pytest.Item, report: pytest.TestReport) -> dict[str, Any] | None:
        data = self._record_for(item, report)
        if data is not None and not data.get("op_types"):
            # Read from the ONNX file alone (never through MNN), once per model: the scoreboard counts by them.
            from ..onnx.ops import op_types

            data["op_types"] = list(op_types(getattr(item, "model_path", None) or item.path))
        return data

    def _record_for(self, item: pytest.Item, report: pytest.TestReport) -> dict[str, Any] | None:
        if not is_parity_item(item):
            return None
        data = self._parity_record(item, report)
        if data is not None:
            data["process"] = this_process(item.config)
        return data

    def _parity_record(self, item: pytest.Item, report: pytest.TestReport) -> dict[str, Any] | None:
        from ..engine.results import ParityResult
        from .input_items import xfail_outcome
        from .items import ModelErrorItem, ParityItem

        if isinstance(item, ModelErrorItem):
            if report.when != "setup":
                return None
            return _error_record(item, report)
        if not isinstance(item, ParityItem):
            return None
        if report.when == "setup" and report.skipped and item.result is None:
            result = ParityResult(node_id_path(item.model_path, item.config.rootpath), item.run_config,
                                  Category.BACKEND_UNAVAILABLE, _skip_reason(report), variant=item.case.variant,
                                  api=item.case.api, api_axis=item.case.api is not None,
                                  mnn_version=item.case.mnn_version)
            if item.case.place is not None:
                result.place = {"name": item.case.place}
            return record(item.nodeid, result, "skipped")
        if item.result is None:
            if not report.failed or report.when == "teardown":
                return None
            # The check itself raised: the item failed, and the report must say so like pytest does.
            item.result = ParityResult(node_id_path(item.model_path, item.config.rootpath), item.run_config,
                                       Category.INTERNAL_ERROR, _internal_error(report), variant=item.case.variant,
                                       api=item.case.api, api_axis=item.case.api is not None,
                                       input_set=item.case.input_set or "")
            return record(item.nodeid, item.result, "error" if report.when == "setup" else "failed")
        if report.when == "setup" and report.failed:
            return record(item.nodeid, item.result, "error")
        if report.when == "call":
            return record(item.nodeid, item.result, xfail_outcome(item, report))
        return None

    def add(self, report: pytest.TestReport) -> None:
        """A report of this process's (``hooks``' ``pytest_runtest_logreport``): its parity record, if it has one."""
        data = getattr(report, "mnn_parity", None)
        if data is not None:
            self._records.append(data)
            if report.failed and self.writes_report:
                self._failing.append((report, data))
            writer = self._report_writer()
            if writer is not None:
                writer.add(data)

    def finish_reports(self) -> None:
        """Each explanation several items share is printed once (the terminal summary's "explained once"); those
        items show a short text of their own instead.  Run after every other reader of the reports (JUnit,
        pytest-html) took the whole message, before the terminal prints them."""
        # Only failures whose text is the parity message (not a traceback, an xpass, a user test's assertion).
        mine = [(report, data) for report, data in self._failing if str(report.longrepr) == data.get("message")]
        self._shared = shared_failures(data for _, data in mine)
        by_item = {nodeid: group for group in self._shared for nodeid in group.nodeids}
        if mine:
            from .items import ShownFailure
        for report, data in mine:
            full = str(report.longrepr)
            group = by_item.get(data["nodeid"])
            report.longrepr = ShownFailure(full, full if group is None else item_text(data, group))

    def explained_once(self) -> list[str]:
        return explained_lines(self._shared)

    def records(self) -> list[dict[str, Any]]:
        return list(self._records)

    def _report_writer(self) -> IncrementalReport | None:
        """The report file, rewritten as items finish so a killed run still leaves one (durable_report.py)."""
        if self.options.report is None or not self.writes_report or not (self.active or self._records):
            return None
        if self._report is None:
            self._report = IncrementalReport(self.options.report, self._report_header)
        return self._report

    def _report_header(self) -> dict[str, Any]:
        statuses = {name: {"available": s.available, "forward_type": s.forward_type, "reason": s.reason}
                    for name, s in ((n, self.backend_status(n)) for n in self.options.backends)}
        header = build_report([], mnn_version=mnn_version(), settings=self.options.settings_dict(), backends=statuses)
        header["peak_rss_mb"] = peak_rss(self._records)  # the records themselves are added by the writer
        if self._final:  # the scoreboard sums the whole run: written once, at the end (a killed run has none)
            header["scoreboard"] = build_scoreboard(self._records)
        return header

    def write_report(self) -> None:
        writer = self._report_writer()
        if writer is not None:
            self._final = True
            writer.flush()

    def report_data(self) -> dict[str, Any]:
        from ..mnn import backends as backend_discovery

        statuses = {name: {"available": s.available, "forward_type": s.forward_type, "reason": s.reason}
                    for name, s in backend_discovery.discover(self.options.backends).items()}
        return build_report(self.records(), mnn_version=mnn_version(), settings=self.options.settings_dict(),
                            backends=statuses)

    def write_html(self) -> None:
        if self.options.html is None or not self.active:
            return
        from ..report.html import write_html

        # From the JSON form of the data, so a saved report renders the same page.
        write_html(self.options.html, json_safe(self.report_data()), self.options.artifacts)


def this_process(config: pytest.Config) -> dict[str, Any]:
    """Which pytest process ran an item (its pytest-xdist worker id, None without xdist) and its peak resident
    memory so far, MiB: a worker holds at most the models it is running, and this shows it."""
    import resource

    worker = getattr(config, "workerinput", {}).get("workerid")
    return {"xdist_worker": worker, "pid": os.getpid(),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def _error_record(item: ModelErrorItem, report) -> dict[str, Any]:
    data: dict[str, Any] = dict.fromkeys(RECORD_FIELDS)
    data.update(nodeid=item.nodeid, model=node_id_path(item.path, item.config.rootpath), outcome="error",
                category=Category.MODEL_ERROR.value, message=str(item.error), outputs={}, fp16_risks=[], seconds=0.0)
    return data


def _internal_error(report) -> str:
    """The last line of the traceback pytest shows for an item whose check raised."""
    crash = getattr(getattr(report, "longrepr", None), "reprcrash", None)
    what = crash.message if crash is not None else str(report.longrepr).strip().splitlines()[-1:]
    return (f"internal_error: pytest-mnn-parity raised while checking this item ({what}). This is a bug in the "
            "plugin, not a finding about MNN; the traceback is in the test report: please report it")


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def junit_properties(result: ParityResult):
    """The JUnit XML properties of a checked item (docs/report.md): category, backend, tier, key metrics."""
    yield "mnn_category", result.category.value
    yield "mnn_backend_used", str(result.backend_used)
    if result.api is not None:
        yield "mnn_api", result.api
    if result.tolerance is not None:
        yield "mnn_tier", result.tolerance.tier
    if result.variant is not None:
        yield "mnn_variant", result.variant
    if result.verdict is not None:
        for v in result.verdict.outputs:
            if v.metrics is not None:
                for key in ("max_abs", "cosine", "snr_db", "zero_fraction", "outside_fraction"):
                    yield f"mnn_{v.name}_{key}", f"{getattr(v.metrics, key):.6g}"
