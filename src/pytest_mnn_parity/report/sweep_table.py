"""The op sweep's table over a run: op name x op type x backend x precision, the metric alone and the verdict.

Built from the JSON records alone (each item's ``op_sweep``), so pytest-xdist's
controller and a saved report give the same table.  The terminal shows the
flagged ops only (out of tolerance in the graph, or wrong alone); the JSON
report keeps every swept row, the HTML report shows the flagged ones per run
and every row per item.
"""
from __future__ import annotations

from html import escape
from typing import Any, Iterable

from ..core.categories import session_made

COLUMNS = ("model", "op", "type", "config", "alone", "max_abs", "cosine", "outside", "in graph", "verdict")


def _flagged(row: dict[str, Any]) -> bool:
    return bool((row.get("in_graph") or {}).get("failed")) or row.get("verdict") == "broken"


def _session_made(row: dict[str, Any]) -> bool:
    """A tensor MNN made at session time (trace/sweep.py SESSION_MADE): nothing in the file to cut."""
    return row.get("verdict") == "not_cut" and session_made(row.get("reason") or "")


def rows(records: Iterable[dict[str, Any]], flagged_only: bool = True) -> list[tuple[str, ...]]:
    """One tuple per swept op and configuration (``COLUMNS``), in the order the items ran."""
    out = []
    for rec in records:
        swept = rec.get("op_sweep")
        if not swept:
            continue
        for row in swept.get("rows") or []:
            if flagged_only and (not _flagged(row) or _session_made(row)):
                continue
            graph = row.get("in_graph") or {}
            in_graph = ",".join(graph.get("health") or []) or ("FAIL" if graph.get("failed") else
                                                                ("ok" if graph else "-"))
            verdict = row["verdict"] if row["verdict"] != "not_cut" else f"not cut: {row.get('reason', '')}"
            label = row["op"] if not row.get("occurrence") else f"{row['op']}#{row['occurrence']}"
            out.append((rec.get("model") or "", label, row.get("type", ""),
                        f"{row.get('backend')}-{row.get('precision')}", row.get("category") or "-",
                        _fmt(row.get("max_abs"), ".4g"), _fmt(row.get("cosine"), ".6f"),
                        _fmt(row.get("outside_fraction"), ".1%"), in_graph, verdict))
    return out


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    try:
        return format(float(value), spec)
    except (TypeError, ValueError):
        return str(value)


def terminal_lines(records: list[dict[str, Any]]) -> list[str]:
    """The flagged ops of every swept item, then each item's conclusion; [] when nothing was swept."""
    swept = [rec for rec in records if rec.get("op_sweep")]
    if not swept:
        return []
    table = rows(swept)
    lines = ["op sweep (each flagged op run alone on the reference's recorded inputs):"]
    if table:
        widths = [max(len(r[i]) for r in [COLUMNS, *table]) for i in range(len(COLUMNS) - 1)]
        for r in [COLUMNS, *table]:
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    else:
        lines.append("  no op was flagged")
    made = sum(1 for rec in swept for row in rec["op_sweep"].get("rows") or [] if _flagged(row) and _session_made(row))
    if made:
        lines.append(f"  (and {made} flagged tensor(s) MNN made at session time, layout copies or parts of decomposed "
                     "ops: not in the file, so not run alone; the JSON report lists them)")
    for rec in swept:
        config = f"{rec.get('backend')}-{rec.get('precision')}"
        lines.append(f"  {rec.get('model')} {config}: {rec['op_sweep'].get('conclusion', '')}")
    return lines


def html_table(records: Iterable[dict[str, Any]], flagged_only: bool = True, with_model: bool = True) -> str:
    table = rows(records, flagged_only)
    if not table:
        return ""
    start = 0 if with_model else 1
    head = "".join(f"<th>{escape(h)}</th>" for h in COLUMNS[start:])
    body = []
    for r in table:
        verdict = r[-1].split(":", 1)[0]
        cells = "".join(f"<td>{escape(c)}</td>" for c in r[start:])
        body.append(f'<tr class="sweep-{escape(verdict.replace(" ", "_"))}" data-op="{escape(r[1])}">{cells}</tr>')
    return f'<table class="matrix sweep"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
