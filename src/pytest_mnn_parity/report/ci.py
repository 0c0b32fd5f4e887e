"""What CI systems pick up from a run: GitHub Actions annotations and a job summary.

Under GitHub Actions (``GITHUB_ACTIONS=true``) each failing item becomes one
``::error file=MODEL,title=...::`` line in the log, which GitHub shows on the
pull request next to the model file, and the matrix is appended as markdown to
the file ``$GITHUB_STEP_SUMMARY`` names.  Pure functions of the JSON records,
so a saved report gives the same lines.  GitLab reads the JUnit XML instead
(docs/ci.md).
"""
from __future__ import annotations

from typing import Any

from .records import key_metric, matrix_table

FAILING = ("failed", "error", "xpassed")


def _escape(text: str, *, prop: bool = False) -> str:
    """GitHub's workflow-command escaping: data escapes %, CR, LF; properties also ':' and ','."""
    text = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    return text.replace(":", "%3A").replace(",", "%2C") if prop else text


def github_annotations(records: list[dict[str, Any]]) -> list[str]:
    """One ``::error`` line per failing item: category, configuration, first divergent layer, numbers."""
    lines = []
    for rec in records:
        if rec.get("outcome") not in FAILING:
            continue
        config = f"{rec.get('backend')}-{rec.get('precision')}" if rec.get("backend") else "load"
        variant = f" [{rec['variant']}]" if rec.get("variant") else ""
        title = f"MNN parity: {rec.get('category')} on {config}{variant}"
        layer = rec.get("first_divergent_layer") or {}
        parts = [(rec.get("message") or "").splitlines()[0] if rec.get("message") else rec.get("category", "")]
        if layer.get("name"):
            parts.append(f"first divergent layer: {layer['name']} ({layer.get('type', '?')})")
        metric = key_metric(rec)
        if metric:
            parts.append(metric)
        parts.append(f"item: {rec.get('nodeid')}")
        lines.append(f"::error file={_escape(str(rec.get('model')), prop=True)},"
                     f"title={_escape(title, prop=True)}::{_escape('; '.join(parts))}")
    return lines


def markdown_summary(records: list[dict[str, Any]]) -> str:
    """The matrix as a markdown table, with counts and the failing items listed."""
    counts: dict[str, int] = {}
    for rec in records:
        counts[rec["outcome"]] = counts.get(rec["outcome"], 0) + 1
    out = ["## MNN parity", "", ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no items", ""]
    rows = matrix_table(records)
    if len(rows) > 1:
        out.append("| " + " | ".join(rows[0]) + " |")
        out.append("|" + "---|" * len(rows[0]))
        out.extend("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows[1:])
    failing = [r for r in records if r.get("outcome") in FAILING]
    if failing:
        out += ["", "### Failing", ""]
        out += [f"- `{r['nodeid']}`: {r.get('category')} {key_metric(r)}".rstrip() for r in failing]
    return "\n".join(out) + "\n"
