"""pytest-html integration, active only when pytest-html is installed and enabled.

Each parity item's row in pytest-html's report gets an "MNN verdict" column
and, as extras, the same pictures and tables as ``--mnn-html``: the metrics,
the first divergent layer, the per-layer error curve (HTML) and every picture
written by ``--mnn-artifacts`` (PNG).
"""
from __future__ import annotations

import base64
from html import escape
from pathlib import Path

import pytest



class HtmlExtras:
    def __init__(self, artifacts_root: Path | None):
        self.root = artifacts_root

    @pytest.hookimpl(wrapper=True, tryfirst=True)  # outermost: runs after the plugin has attached mnn_parity
    def pytest_runtest_makereport(self, item, call):
        report = yield
        data = getattr(report, "mnn_parity", None)
        if data is not None and data["outcome"] != "skipped":
            from pytest_html import extras

            # Imported with the first record: registered whenever pytest-html is installed, also in runs that
            # check no model.
            from ..report.html import PICTURE_KINDS, result_fragment

            # pytest-html shows the failure message itself; the pictures go in as PNG extras.
            fragment = result_fragment(data, self.root, with_pictures=False, with_message=False)
            found = [extras.html(f"<div class='mnn-parity'>{fragment}</div>")]
            for title, info in _picture_entries(data.get("artifacts")):
                for kind, caption in PICTURE_KINDS:
                    if info.get(kind) and self.root is not None:
                        try:
                            content = base64.b64encode((self.root / info[kind]).read_bytes()).decode("ascii")
                        except OSError:
                            continue
                        found.append(extras.png(content, name=f"{title}: {caption}"))
            report.extras = list(getattr(report, "extras", []) or []) + found
        return report

    @pytest.hookimpl(optionalhook=True)
    def pytest_html_results_table_header(self, cells):
        cells.insert(2, "<th>MNN verdict</th>")

    @pytest.hookimpl(optionalhook=True)
    def pytest_html_results_table_row(self, report, cells):
        data = getattr(report, "mnn_parity", None)
        if data is None:
            cells.insert(2, "<td></td>")
        else:
            from ..report.html import group

            cells.insert(2, f'<td class="mnn-{group(data)}">{escape(data["category"])}</td>')


def _picture_entries(artifacts):
    if not artifacts:
        return []
    entries = [(f"{name}", info) for name, info in (artifacts.get("outputs") or {}).items()]
    entries += [(f"layer {info.get('layer')}", info) for info in (artifacts.get("layers") or {}).values()]
    return entries
