"""The JSON report and the terminal matrix, built from one record per item.

Records are plain dicts (they travel from pytest-xdist workers to the
controller inside test reports); ``SCHEMA`` names their documented layout.
"""
from __future__ import annotations

import platform
from collections import OrderedDict
from typing import Any, Iterable

from .scoreboard import build as build_scoreboard

SCHEMA = "pytest-mnn-parity/1"

RECORD_FIELDS = ("nodeid", "model", "backend", "backend_used", "forward_type", "precision", "threads", "arithmetic", "variant",
                 "input_set", "input_detail", "outcome", "category", "message", "reference", "reference_label", "tolerance", "outputs",
                 "first_divergent_layer", "layer_trace", "layers", "fp16_risks", "fp16_weight_risks", "rc",
                 "seconds", "search", "artifacts", "api", "api_reason", "api_axis", "backend_note", "cross_api",
                 "stream", "inputs_nonfinite", "worker", "fault", "gpu_mode", "num_thread", "mnn_version", "bisect", "place", "op_types",
                 "process", "op_sweep", "repro")


def record(nodeid: str, result, outcome: str) -> dict[str, Any]:
    """One report entry for a parity item (``result`` is a ``ParityResult``)."""
    return {
        "nodeid": nodeid,
        "model": result.model,
        "backend": result.config.backend,
        "backend_used": result.backend_used,
        "forward_type": result.forward_type,
        "precision": result.config.precision,
        "threads": result.config.threads,
        "arithmetic": None if result.arithmetic is None else {
            "kind": result.arithmetic.kind, "probe_errors": result.arithmetic.errors, "note": result.arithmetic.note,
            "kernels": dict(result.arithmetic.kernels)},
        "variant": result.variant,
        "input_set": result.input_set,
        "input_detail": getattr(result, "input_detail", ""),
        "outcome": outcome,
        "category": result.category.value,
        "message": result.message,
        "reference": result.reference,
        "reference_label": getattr(result, "reference_label", ""),
        "tolerance": result.tolerance.as_dict() if result.tolerance else None,
        "outputs": result.outputs_dict(),
        "first_divergent_layer": result.first_divergent_layer,
        "layer_trace": result.trace.summary() if result.trace is not None else None,
        "layers": [layer.as_dict(with_inputs=False) for layer in result.trace.layers] if result.trace else None,
        "fp16_risks": [risk.as_dict() for risk in result.fp16_risks],
        "fp16_weight_risks": [risk.as_dict() for risk in result.weight_risks],
        "rc": result.rc,
        "seconds": result.seconds,
        "search": getattr(result, "search", None),
        "artifacts": result.artifacts,
        "api": result.api,
        "api_reason": result.api_reason,
        "api_axis": result.api_axis,
        "backend_note": result.backend_note,
        "cross_api": result.cross_api,
        "stream": result.stream,
        "inputs_nonfinite": getattr(result, "inputs_nonfinite", None),
        "op_sweep": None if getattr(result, "op_sweep", None) is None else result.op_sweep.as_dict(),
        "repro": getattr(result, "repro", None),
        "worker": getattr(result, "worker", None),
        # The pytest process that ran the item (set by the plugin): its pytest-xdist worker id and peak RSS.
        "process": None,
        "fault": getattr(result, "fault", None),
        # The GPU mode that ran (None: the backend reads none, or the default cheapest tuning) and the
        # numThread value the session was created with (threads on the CPU, mode flags on a GPU backend).
        "gpu_mode": result.config.gpu_mode,
        "num_thread": result.config.num_thread(),
        # The MNN release that ran the item when it was not the report's mnn_version (--mnn-versions).
        "mnn_version": getattr(result, "mnn_version", None),
        "bisect": getattr(result, "bisect", None),
        # Where it ran when not on this machine's CPU (--mnn-cpu, --mnn-remote): name, emulated CPU or host, the
        # CPU features MNN detected there, the MNN release there.
        "place": getattr(result, "place", None),
        # The model's ONNX op types (set by the plugin, per model): what the conformance scoreboard counts by.
        "op_types": [],
    }


def build_report(records: Iterable[dict[str, Any]], *, mnn_version: str, settings: dict[str, Any],
                 backends: dict[str, dict[str, Any]]) -> dict[str, Any]:
    records = list(records)
    counts: dict[str, int] = {}
    for r in records:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    return {
        "schema": SCHEMA,
        "mnn_version": mnn_version,
        "platform": {"python": platform.python_version(), "machine": platform.machine(), "system": platform.system()},
        "settings": settings,
        "backends": backends,
        "summary": counts,
        # By ONNX op type, per configuration (scoreboard.py); None when no model has op types (.mnn files only).
        "scoreboard": build_scoreboard(records),
        "peak_rss_mb": peak_rss(records),
        "results": records,
    }


def peak_rss(records: list[dict[str, Any]]) -> dict[str, float]:
    """The peak resident memory (MiB) of each process that ran items: ``main`` (or the pytest-xdist worker id,
    ``gw0``...) for the pytest processes, ``isolated PID`` for each isolated worker."""
    peaks: dict[str, float] = {}
    for r in records:
        for name, value in _rss_of(r):
            peaks[name] = max(peaks.get(name, 0.0), value)
    return dict(sorted(peaks.items()))


def _rss_of(rec: dict[str, Any]):
    process, worker = rec.get("process") or {}, rec.get("worker") or {}
    if process.get("peak_rss_mb") is not None:
        yield process.get("xdist_worker") or "main", process["peak_rss_mb"]
    if worker.get("peak_rss_mb") is not None:
        yield f"isolated {worker.get('pid')}", worker["peak_rss_mb"]


# -- terminal matrix ----------------------------------------------------------------

def key_metric(rec: dict[str, Any]) -> str:
    """The one number a reviewer wants in a matrix cell, chosen by category."""
    outputs = [o for o in (rec.get("outputs") or {}).values() if "max_abs" in o]
    if not outputs:
        return ""
    category = rec["category"]
    if category in ("zero_output", "partial_zero"):  # the real share of zeros, as the message says it
        return f"zeros {max(o['zero_fraction'] for o in outputs):.0%}"
    if category == "non_finite":
        return f"nan/inf {sum(o['nonfinite_count'] for o in outputs)}"
    if category == "stale_output":  # its cosine against the reference can be 1.0: not the telling number
        return "same output for 2 inputs"
    if category == "ok" or rec.get("outcome") == "passed":
        return f"max|d| {max(_num(o['max_abs']) for o in outputs):.2g}"
    return f"cos {min(_num(o['cosine']) for o in outputs):.4f}"


def _num(value: Any) -> float:
    return float(value) if not isinstance(value, str) else float(value.replace("inf", "Infinity").replace("Infinity", "inf"))


def matrix_lines(records: list[dict[str, Any]]) -> list[str]:
    """Model x configuration table of the items that ran; skips are summarised below it."""
    ran = [r for r in records if r["outcome"] != "skipped"]
    skipped = [r for r in records if r["outcome"] == "skipped"]
    lines: list[str] = []
    if ran:
        rows = matrix_table(ran)
        header = rows[0]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.extend(reference_lines(ran))
    lines.extend(bisect_lines(records))
    lines.extend(risk_lines(records))
    reasons = OrderedDict()
    for r in skipped:
        reasons.setdefault(r["message"] or r["category"], set()).add(f"{r['backend']}-{r['precision']}")
    for reason, cfgs in reasons.items():
        backends = sorted({c.split("-", 1)[0] for c in cfgs})
        prefix = backends[0] + ": "
        if len(backends) == 1 and reason.startswith(prefix):
            reason = reason[len(prefix):]
        lines.append(f"skipped {', '.join(backends)} ({len(cfgs)} configs): {reason}")
    return lines


def matrix_table(records: list[dict[str, Any]]) -> list[list[str]]:
    """The matrix as rows of cells, header first: one row per model (and variant, input set), one column per
    configuration; what the terminal, the HTML report and a CI summary each lay out."""
    ran = [r for r in records if r["outcome"] != "skipped"]
    configs = list(OrderedDict.fromkeys(_column(r) for r in ran))
    models = list(OrderedDict.fromkeys(_row(r) for r in ran))
    cells = {(_row(r), _column(r)): _cell(r) for r in ran}
    return [["model"] + configs] + [[m] + [cells.get((m, c), "-") for c in configs] for m in models]


def _row(rec: dict[str, Any]) -> str:
    """A model's row; conversion variants, named input sets and searches get rows of their own."""
    # A user's own test (docs/fixtures.md) gets a row of its own, next to its
    # model's generated items.
    if rec.get("test"):
        return rec["test"]
    label = f"{rec['model']} [{rec['variant']}]" if rec.get("variant") else rec["model"]
    input_set = rec.get("input_set") or ""
    if input_set and not input_set.startswith("seeded:") and input_set != "seeded":
        label += f" [{input_set}]"
    return label + (" search" if rec.get("search") else "")


def _column(rec: dict[str, Any]) -> str:
    if rec.get("reference_label") == GOLDEN:
        return GOLDEN
    # A model that never loaded has no configuration: it gets a column of its own.
    if not rec.get("backend"):
        return "load"
    # --mnn-api both: the API is an axis of the matrix, as in the item ids.
    api = f"{rec['api']}-" if rec.get("api_axis") and rec.get("api") else ""
    release = f"mnn{rec['mnn_version']}-" if rec.get("mnn_version") and not rec.get("bisect") else ""
    search = "bisect-" if rec.get("bisect") else ""
    mode = f"-{rec['gpu_mode']}" if rec.get("gpu_mode") else ""
    place = f"{rec['place']['name']}-" if rec.get("place") else ""
    return f"{search}{release}{place}{api}{rec['backend']}-{rec['precision']}{mode}"


def _cell(rec: dict[str, Any]) -> str:
    status = {"passed": "PASS", "failed": "FAIL", "error": "ERROR"}.get(rec["outcome"], rec["outcome"].upper())
    # A passing item never shows a failure category next to PASS (an xfail-free search, a user's test that
    # passed on its own terms): the cell says what the outcome says.
    detail = rec["category"] if rec["category"] != "ok" and rec["outcome"] != "passed" else ""
    metric = key_metric(rec)
    if rec.get("search") and not rec["search"].get("found"):
        metric = f"{rec['search']['runs']} examples"
    # Say where auto chose the Module API, so a column never hides which API ran.
    api = "(module)" if rec.get("api") == "module" and not rec.get("api_axis") else ""
    return " ".join(part for part in (status, api, detail, metric) if part)


GOLDEN = "golden"


def bisect_lines(records: list[dict[str, Any]]) -> list[str]:
    """One line per bisected model x configuration: the first release whose verdict changed, or none."""
    lines = []
    for rec in records:
        found = rec.get("bisect")
        if not found:
            continue
        where = f"{rec['model']} {rec['backend']}-{rec['precision']}"
        if found.get("first_changed"):
            metrics = found.get("metrics") or {}
            lines.append(f"bisect {where}: first changed in {found['first_changed']} "
                         f"({found['last_same']}: {metrics.get(found['last_same'], '?')}; "
                         f"{found['first_changed']}: {metrics.get(found['first_changed'], '?')})")
        else:
            lines.append(f"bisect {where}: no change between {found['good']} and {found['bad']} "
                         f"(checked {', '.join(found.get('steps') or [])})")
    return lines


def reference_lines(records: list[dict[str, Any]]) -> list[str]:
    """What each row's configurations were compared with: one line when every row agrees."""
    per_row: OrderedDict[str, OrderedDict[str, set]] = OrderedDict()
    for r in records:
        label = r.get("reference_label")
        if label and label != GOLDEN:
            per_row.setdefault(_row(r), OrderedDict()).setdefault(label, set()).add(r.get("reference") or "")

    def describe(labels: OrderedDict) -> str:
        parts = []
        for label, descriptions in labels.items():
            only = next(iter(descriptions)) if len(descriptions) == 1 else ""
            only = only.removeprefix(label.partition("::")[0] + " ")  # "bundle DIR" is in the label already
            parts.append(f"{label} ({only})" if only and only != label else label)
        return "; ".join(parts)

    texts = OrderedDict((row, describe(labels)) for row, labels in per_row.items())
    if len(set(texts.values())) == 1 and len(texts) > 1:
        return [f"reference (every row): {next(iter(texts.values()))}"]
    return [f"reference of {row}: {text}" for row, text in texts.items()]


def risk_lines(records: list[dict[str, Any]]) -> list[str]:
    """fp16 risks per model, shown even when every configuration passed.

    A model that passes ``low`` on an x86 CPU (which computes it in fp32) can
    still black out on a phone or GPU with real fp16: this is the warning.
    """
    lines: list[str] = []
    seen: set[str] = set()
    for rec in records:
        risks = [f"{r['layer']} {r['kind']} (max |x| {float(r['max_abs']):.3g})" for r in rec.get("fp16_risks") or []]
        risks += [f"{r['op']} {r['role']} {r['kind']} under --fp16 ({r['count']}/{r['total']})"
                  for r in rec.get("fp16_weight_risks") or []]
        if not risks or rec["model"] in seen:
            continue
        seen.add(rec["model"])
        lines.append(f"fp16 risk in {rec['model']}: " + "; ".join(risks[:3])
                     + (f"; +{len(risks) - 3} more" if len(risks) > 3 else ""))
    return lines
