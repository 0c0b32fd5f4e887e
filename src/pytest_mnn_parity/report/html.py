"""A self-contained HTML report, rendered from the JSON report's data (``--mnn-html PATH``).

Built from the same dict as the JSON report, so pytest-xdist's controller
renders the merged run, and a saved report can be rendered again later::

    python -m pytest_mnn_parity.report.html report.json report.html --artifacts DIR

One file, nothing fetched: inline CSS, a few lines of inline JavaScript (open
the result a matrix cell links to), the per-layer error curve as inline SVG
and the pictures from ``--mnn-artifacts`` embedded as ``data:`` URIs.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
from html import escape
from pathlib import Path
from typing import Any, Iterable

from ..core.files import atomic_write
from . import scoreboard, sweep_table
from .layercurve import fmt, layer_curve_svg, number
from .records import key_metric

GROUPS = {
    "ok": "ok", "backend_unavailable": "skip", "mismatch": "drift",
    "zero_output": "broken", "partial_zero": "broken", "constant_output": "broken", "stale_output": "broken",
    "non_finite": "broken", "shape_mismatch": "broken", "runtime_error": "broken", "backend_fallback": "broken",
    "model_error": "error",
}
STATUS = {"passed": "PASS", "failed": "FAIL", "error": "ERROR", "skipped": "SKIP"}
PICTURE_KINDS = (("reference", "reference"), ("target", "target"), ("error", "|target - reference|"),
                 ("mask", "zero / NaN mask"), ("histogram", "error histogram"))

CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em;color:#1b1b1b}
h1{font-size:1.5em;margin:0 0 .3em}h2{font-size:1.2em;margin:1.4em 0 .5em}h3{font-size:1em;margin:1em 0 .3em}
.meta{color:#555}code,pre{font:12px/1.35 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto;white-space:pre}
table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}
table.matrix td{padding:0;min-width:8em}
table.matrix td a{display:block;padding:.35em .5em;color:inherit;text-decoration:none}
table.matrix td a:hover{outline:2px solid #333}table.matrix small{display:block;color:#333}
.g-ok{background:#c8e6c9}.g-skip{background:#eeeeee;color:#777}.g-drift{background:#ffcc80}
.g-broken{background:#ef9a9a}.g-error{background:#ce93d8}
.badge{display:inline-block;padding:0 .4em;border-radius:3px;font-weight:600}
details.result{border:1px solid #ccc;margin:.5em 0;padding:.3em .6em}details.result[open]{border-color:#333}
details.result>summary{cursor:pointer}details.result:target{box-shadow:0 0 0 3px #1e88e5}
.pics{display:flex;flex-wrap:wrap;gap:.8em;align-items:flex-start}figure{margin:0}
figure img{image-rendering:pixelated;border:1px solid #999;max-width:100%}figcaption{font-size:12px;color:#444}
.missing{color:#b00}table.nums td{text-align:right}table.nums td:first-child,table.nums td.l{text-align:left}
svg text{font:11px sans-serif}
"""

JS = """
function mnnOpen(){var id=decodeURIComponent(location.hash.slice(1));if(!id)return;
if(id==='all'){document.querySelectorAll('details.result').forEach(function(d){d.open=true;});return;}
var el=document.getElementById(id);if(el&&el.tagName==='DETAILS'){el.open=true;el.scrollIntoView();}}
window.addEventListener('hashchange',mnnOpen);mnnOpen();
"""


def result_id(nodeid: str) -> str:
    """A stable anchor per item (the same in a single-process and an xdist run)."""
    return "r-" + hashlib.sha1(nodeid.encode()).hexdigest()[:12]


def group(rec: dict[str, Any]) -> str:
    if rec.get("outcome") == "error":
        return "error"
    return GROUPS.get(rec.get("category") or "", "broken")


def _row_key(rec: dict[str, Any]) -> str:
    return rec["model"] + (f" [{rec['variant']}]" if rec.get("variant") else "")


def _column(rec: dict[str, Any]) -> tuple[str, str]:
    return (rec["backend"], rec["precision"]) if rec.get("backend") else ("load", "")


def _ordered_columns(records: list[dict[str, Any]], settings: dict[str, Any]) -> list[tuple[str, str]]:
    shown = {_column(r) for r in records if r["outcome"] != "skipped"}
    asked_backends, asked_precisions = list(settings.get("backends") or []), list(settings.get("precisions") or [])
    backends = asked_backends + sorted({b for b, _ in shown} - set(asked_backends))
    precisions = asked_precisions + sorted({p for _, p in shown} - set(asked_precisions))
    ordered = [(b, p) for b in backends for p in precisions if (b, p) in shown]
    return ordered + ([("load", "")] if ("load", "") in shown else [])


def _cell_text(rec: dict[str, Any]) -> str:
    detail = rec["category"] if rec["category"] != "ok" else ""
    return " ".join(p for p in (STATUS.get(rec["outcome"], rec["outcome"].upper()), detail) if p)


def matrix(records: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    columns = _ordered_columns(records, settings)
    rows = sorted({_row_key(r) for r in records})
    cells: dict[tuple[str, tuple[str, str]], list[dict[str, Any]]] = {}
    for rec in records:
        cells.setdefault((_row_key(rec), _column(rec)), []).append(rec)
    spans: list[tuple[str, int]] = []
    for backend, _ in columns:
        if spans and spans[-1][0] == backend:
            spans[-1] = (backend, spans[-1][1] + 1)
        else:
            spans.append((backend, 1))
    out = ['<table class="matrix"><thead><tr><th rowspan="2">model</th>']
    out += [f'<th colspan="{n}">{escape(b)}</th>' for b, n in spans]
    out.append("</tr><tr>")
    out += [f"<th>{escape(p)}</th>" for _, p in columns]
    out.append("</tr></thead><tbody>")
    for row in rows:
        out.append(f'<tr data-model="{escape(row)}"><th scope="row">{escape(row)}</th>')
        for column in columns:
            recs = sorted(cells.get((row, column), []), key=lambda r: r["nodeid"])
            if not recs:
                out.append('<td class="empty">-</td>')
                continue
            for i, rec in enumerate(recs):
                # More than one item per cell (e.g. named input sets): one cell each would break the grid,
                # so they share it, each with a link of its own.
                if i == 0:
                    out.append(f'<td class="g-{group(rec)}" data-nodeid="{escape(rec["nodeid"])}" '
                               f'data-category="{escape(rec["category"])}" data-outcome="{escape(rec["outcome"])}">')
                title = rec["message"].splitlines()[0] if rec.get("message") else rec["category"]
                href = "" if rec["outcome"] == "skipped" else f' href="#{result_id(rec["nodeid"])}"'
                out.append(f'<a{href} title="{escape(title)}">{escape(_cell_text(rec))}'
                           f'<small>{escape(key_metric(rec))}</small></a>')
            out.append("</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def scoreboard_table(board: dict[str, Any]) -> str:
    """Every op type of the scoreboard (scoreboard.py), most failures first; a cell is coloured by its worst."""
    rows = scoreboard.table(board)
    names = [None, *board["op_types"].values()]  # the totals row, then each op type's counts
    configs = board["configs"]
    out = ['<table class="matrix scoreboard"><thead><tr>', *(f"<th>{escape(h)}</th>" for h in rows[0]),
           "</tr></thead><tbody>"]
    for row, counts in zip(rows[1:], [board["totals"], *names[1:]]):
        out.append(f'<tr data-op="{escape(row[0])}"><th scope="row">{escape(row[0])}</th><td>{escape(row[1])}</td>')
        for config, text in zip(configs, row[2:]):
            worst = next((st for st in scoreboard.STATUSES if counts["configs"][config].get(st)), "agreed")
            out.append(f'<td class="g-{SCOREBOARD_GROUPS[worst]}" data-config="{escape(config)}">{escape(text)}</td>')
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


SCOREBOARD_GROUPS = {"convert_failed": "error", "crashed": "broken", "run_failed": "broken", "error": "error",
                     "diverged": "drift", "inconclusive": "skip", "agreed": "ok"}


def skipped_summary(records: list[dict[str, Any]]) -> str:
    reasons: dict[str, set[str]] = {}
    for rec in records:
        if rec["outcome"] == "skipped":
            reasons.setdefault(rec.get("message") or rec["category"], set()).add(f"{rec['backend']}-{rec['precision']}")
    if not reasons:
        return ""
    items = "".join(f"<li>{escape(', '.join(sorted({c.split('-', 1)[0] for c in cfgs})))} ({len(cfgs)} configs): "
                    f"{escape(reason)}</li>" for reason, cfgs in reasons.items())
    return f'<ul class="skips">{items}</ul>'


def _outputs_table(outputs: dict[str, Any]) -> str:
    cols = ("output", "category", "max_abs", "max_rel", "cosine", "snr_db", "outside", "zeros t/ref", "new zeros",
            "NaN/Inf", "shape")
    rows = ["<table class='nums outputs'><tr>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>"]
    for name, o in outputs.items():
        rows.append(
            f"<tr><td>{escape(name)}</td><td class='l'>{escape(o.get('category', ''))}</td>"
            f"<td>{fmt(o.get('max_abs'))}</td><td>{fmt(o.get('max_rel'), '.3g')}</td>"
            f"<td>{fmt(o.get('cosine'), '.6f')}</td><td>{fmt(o.get('snr_db'), '.1f')}</td>"
            f"<td>{fmt(o.get('outside_fraction'), '.2%')}</td>"
            f"<td>{fmt(o.get('zero_fraction'), '.0%')}/{fmt(o.get('ref_zero_fraction'), '.0%')}</td>"
            f"<td>{fmt(o.get('new_zero_fraction'), '.1%')}</td><td>{fmt(o.get('nonfinite_count'), '.0f')}</td>"
            f"<td class='l'>{escape('x'.join(map(str, o.get('shape') or [])))}</td></tr>")
    rows.append("</table>")
    # The verdict's sentence per output, under the table: a column of prose would squeeze the numbers.
    rows += [f"<p class='detail'><b>{escape(name)}</b>: {escape(o['detail'])}</p>"
             for name, o in outputs.items() if o.get("detail")]
    return "".join(rows)


def _facts(rec: dict[str, Any]) -> str:
    tol = rec.get("tolerance") or {}
    arithmetic = rec.get("arithmetic") or {}
    reason = f" ({tol['tier_reason']})" if tol.get("tier_reason") else ""
    facts = [
        ("configuration", f"{rec.get('backend')} {rec.get('precision')}, {rec.get('threads')} thread(s)"),
        ("ran on", f"{rec.get('backend_used')} (forward type {rec.get('forward_type')})"),
        ("arithmetic", arithmetic.get("kind", "-") + "".join(
            f"; {kernel} rounds like {kind}" for kernel, kind in (arithmetic.get("kernels") or {}).items())),
        ("tolerance", f"tier {tol.get('tier')}{reason}: atol {fmt(tol.get('atol'))} x ref scale, rtol {fmt(tol.get('rtol'))}, "
                      f"min cosine {fmt(tol.get('min_cosine'))}" if tol else "-"),
        ("reference", rec.get("reference") or "-"),
        ("inputs", rec.get("input_set") or "-"),
        ("one inference", f"{fmt(rec.get('seconds'), '.3g')} s"),
    ]
    return "<table class='facts'>" + "".join(f"<tr><th>{k}</th><td>{escape(str(v))}</td></tr>"
                                             for k, v in facts) + "</table>"


def _data_uri(path: Path) -> str | None:
    try:
        return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    except OSError:
        return None


def pictures_html(artifacts: dict[str, Any] | None, root: Path | None, group: str = "outputs") -> str:
    """The pictures of the outputs (``group="outputs"``) or of the drawn layers (``"layers"``)."""
    if not artifacts:
        return ""
    if group == "outputs":
        entries = [(f"output {name!r}", info) for name, info in (artifacts.get("outputs") or {}).items()]
    else:
        entries = [(f"layer {info.get('layer')!r} ({info.get('type')}, #{info.get('index')}, {info.get('role')}), "
                    f"output {info.get('output')}", info) for info in (artifacts.get("layers") or {}).values()]
    out = []
    if artifacts.get("error") and group == "outputs":
        out.append(f"<p class='missing'>{escape(artifacts['error'])}</p>")
    for title, info in entries:
        out.append(f"<h3>{escape(title)}</h3>")
        if info.get("layout"):
            out.append(f"<p class='meta'>{escape(info['layout'])}</p>")
        if info.get("note"):
            out.append(f"<p class='meta'>{escape(info['note'])}</p>")
        figures = []
        for kind, caption in PICTURE_KINDS:
            rel = info.get(kind)
            if not rel:
                continue
            uri = _data_uri(root / rel) if root is not None else None
            if uri is None:
                figures.append(f"<p class='missing'>picture not found: {escape(rel)}</p>")
            else:
                alt = escape(f"{caption} of {title}")
                figures.append(f'<figure data-kind="{kind}"><img src="{uri}" alt="{alt}">'
                               f"<figcaption>{escape(caption)}</figcaption></figure>")
        out.append("<div class='pics'>" + "".join(figures) + "</div>")
    return "".join(out)


def result_fragment(rec: dict[str, Any], root: Path | None = None, with_pictures: bool = True,
                    with_message: bool = True) -> str:
    """Everything known about one item, pictures before prose: a reviewer should see before reading.

    Facts, output metrics and pictures, the first divergent layer with the per-layer curve and its
    pictures, fp16 risks, then the failure message as the terminal showed it.
    """
    artifacts = rec.get("artifacts") if with_pictures else None
    parts = [_facts(rec)]
    if rec.get("outputs"):
        parts.append("<h3>Outputs</h3>" + _outputs_table(rec["outputs"]))
    parts.append(pictures_html(artifacts, root, "outputs"))
    first = rec.get("first_divergent_layer")
    if first:
        blame = "its inputs were within tolerance" if not any(i.get("failed") for i in first.get("inputs") or []) \
            else "its inputs had already diverged"
        health = f" [{', '.join(first.get('health') or [])}]" if first.get("health") else ""
        if first.get("proven_by"):  # the op sweep proved it: its verdict replaces the trace's guess
            blame = (f"wrong when run alone on the reference's exact inputs (op sweep); the trace's guess was "
                     f"{escape(first.get('trace_guess') or '-')}")
        heading = "Broken op (proven alone)" if first.get("proven_by") else "First divergent layer"
        parts.append(f"<h3>{heading}</h3><p class='first-layer'><b>{escape(first['name'])}</b> "
                     f"({escape(first['type'])}, #{first['index']}){escape(health)}; {blame}; max|d| "
                     f"{fmt(first.get('max_abs'))}, cosine {fmt(first.get('cosine'), '.6f')}</p>")
    if rec.get("layers"):
        tol = rec.get("tolerance") or {}
        parts.append("<h3>Per-layer error</h3>" + layer_curve_svg(rec["layers"], number(tol.get("atol")),
                                                                   first["index"] if first else None))
    parts.append(pictures_html(artifacts, root, "layers"))
    if rec.get("op_sweep"):
        parts.append(f"<h3>Op sweep</h3><p class='sweep'>{escape(rec['op_sweep'].get('conclusion') or '')}</p>"
                     + sweep_table.html_table([rec], flagged_only=False, with_model=False))
    risks = [f"{r['layer']} ({r['type']}): {r['kind']}, max |x| {fmt(r['max_abs'], '.3g')}"
             for r in rec.get("fp16_risks") or []]
    risks += [f"{r['op']} {r['role']}: {r['kind']} under --fp16 ({r['count']}/{r['total']})"
              for r in rec.get("fp16_weight_risks") or []]
    if risks:
        parts.append("<h3>fp16 risks</h3><ul>" + "".join(f"<li>{escape(r)}</li>" for r in risks) + "</ul>")
    if with_message and rec.get("message") and rec["outcome"] != "passed":
        parts.append(f"<h3>Failure message</h3><pre class='message'>{escape(rec['message'])}</pre>")
    return "".join(parts)


def _sort_key(rec: dict[str, Any], columns: list[tuple[str, str]]) -> tuple:
    column = _column(rec)
    # Failures first: they are what a reviewer opens the page for.
    return (rec["outcome"] == "passed", _row_key(rec), columns.index(column) if column in columns else len(columns),
            rec["nodeid"])


def render(data: dict[str, Any], artifacts_root: os.PathLike | str | None = None) -> str:
    """The whole page for one report dict (as ``report.build_report`` makes it, or as read from JSON)."""
    root = Path(artifacts_root) if artifacts_root else None
    records = list(data.get("results") or [])
    settings = data.get("settings") or {}
    summary = data.get("summary") or {}
    platform = data.get("platform") or {}
    columns = _ordered_columns(records, settings)
    counts = ", ".join(f"{n} {k}" for k, n in sorted(summary.items()))
    body = [f"<h1>MNN parity</h1><p class='meta'>MNN {escape(str(data.get('mnn_version')))} &middot; Python "
            f"{escape(str(platform.get('python')))} on {escape(str(platform.get('system')))} "
            f"{escape(str(platform.get('machine')))} &middot; reference {escape(str(settings.get('reference')))} "
            f"&middot; seed {escape(str(settings.get('seed')))} "
            f"&middot; layers {escape(str(settings.get('layers')))}</p>",
            f"<p class='summary'>{escape(counts) or 'no items'}</p>"]
    if root is None:
        body.append("<p class='meta'>No pictures: run with <code>--mnn-artifacts DIR</code> to include them.</p>")
    legend = "".join(f'<span class="badge g-{g}">{label}</span> ' for g, label in
                     (("ok", "pass"), ("drift", "mismatch"), ("broken", "broken output / run"),
                      ("error", "model error"), ("skip", "skipped")))
    body += ["<h2>Matrix</h2>", matrix(records, settings), f"<p>{legend}</p>", skipped_summary(records)]
    if data.get("scoreboard"):
        body += ["<h2>Conformance by ONNX op type</h2>", scoreboard_table(data["scoreboard"])]
    swept = sweep_table.html_table(records)
    if swept:
        body += ["<h2>Op sweep: flagged ops run alone</h2>", swept]
    body.append("<h2>Results</h2>")
    for rec in sorted((r for r in records if r["outcome"] != "skipped"), key=lambda r: _sort_key(r, columns)):
        metric = key_metric(rec)
        body.append(f'<details class="result" id="{result_id(rec["nodeid"])}" data-nodeid="{escape(rec["nodeid"])}">'
                    f'<summary><span class="badge g-{group(rec)}">{escape(_cell_text(rec))}</span> '
                    f'<code>{escape(rec["nodeid"])}</code> {escape(metric)}</summary>'
                    f"{result_fragment(rec, root)}</details>")
    failed = summary.get("failed", 0) + summary.get("error", 0)
    title = f"MNN parity: {failed} failing of {len(records)}" if records else "MNN parity"
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{CSS}</style></head>'
            f"<body>{''.join(body)}<script>{JS}</script></body></html>\n")


def write_html(path: os.PathLike | str, data: dict[str, Any], artifacts_root: os.PathLike | str | None = None) -> None:
    """Render and write atomically (a temporary file, then a rename), as the JSON report is."""
    atomic_write(path, render(data, artifacts_root))


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pytest_mnn_parity.report.html",
                                     description="Render a pytest-mnn-parity JSON report as one HTML file.")
    parser.add_argument("report", help="the JSON report (--mnn-report)")
    parser.add_argument("html", help="where to write the HTML")
    parser.add_argument("--artifacts", help="the --mnn-artifacts directory of that run (default: as the report "
                                            "records it)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    data = json.loads(Path(args.report).read_text(encoding="utf-8"))
    recorded = ((data.get("settings") or {}).get("artifacts") or {}).get("dir")
    write_html(args.html, data, args.artifacts or recorded)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
