"""The conformance scoreboard: a run over many models summarised by ONNX op type.

The ONNX backend scoreboard's idea, for MNN and for a user's own zoo: for each
op type, how many of the models that use it convert, run, agree, diverge or
crash, per configuration (conversion variant x backend x precision).  Built
from the JSON records alone (each carries its model's ``op_types``), so
pytest-xdist's controller and a saved report give the same table.

Each model gets one status per configuration, the worst of its items there
(several input sets), in ``STATUSES`` order.  A model counts once under every
op type it uses, so an op type's counts add up to its ``models``; a model that
never converts counts against all its op types alike (the converter names the
op it lacks in the item's message).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterable

# Worst first.  convert_failed: MNN cannot convert the ONNX model; crashed: the process died or hung (timeout);
# run_failed: MNN converted it but cannot create a session or run it; error: the model could not be tested
# (no reference, a bad input set); diverged: it ran and its outputs are wrong; inconclusive: the outputs
# agree but the reference is degenerate on these inputs; agreed: within tolerance.
STATUSES = ("convert_failed", "crashed", "run_failed", "error", "diverged", "inconclusive", "agreed")
# The terminal shows the scoreboard from this many models with op types on (a run over a model zoo).
MIN_MODELS = 5
TOP_ROWS = 10
ALL = "(all models)"

_RUN_FAILED_TEXT = ("could not create a session", "the reference run failed", "produced empty outputs")


def status_of(record: dict[str, Any]) -> str | None:
    """The scoreboard status of one item's record; None for an item that says nothing of conformance (a skip,
    a user's own test)."""
    category, outcome = record.get("category"), record.get("outcome")
    if outcome == "skipped" or category in ("backend_unavailable", None) or record.get("test"):
        return None
    if category == "ok":
        return "agreed"
    if category in ("crashed", "timeout"):
        return "crashed"
    if category == "runtime_error":
        return "run_failed"
    if category == "model_error":
        message = record.get("message") or ""
        if "MNN cannot convert it" in message:
            return "convert_failed"
        if any(text in message for text in _RUN_FAILED_TEXT):
            return "run_failed"
        return "error"
    if category == "degenerate_reference":
        return "inconclusive"
    if category in ("internal_error", "no_golden", "backend_fallback"):
        return "error"
    return "diverged"


def config_label(record: dict[str, Any]) -> str:
    """A scoreboard column: the item id's configuration part (``fp32-CPU-high``; ``load`` for no model).  With
    --mnn-versions each MNN release is a column of its own (``mnn3.4.0-fp32-CPU-high``): the same table across
    releases."""
    if not record.get("backend"):
        return "load"
    release = f"mnn{record['mnn_version']}" if record.get("mnn_version") and not record.get("bisect") else ""
    parts = ["bisect" if record.get("bisect") else "", release,
             record["api"] if record.get("api_axis") and record.get("api") else "", record.get("variant") or "",
             record["backend"], record.get("precision") or "", record.get("gpu_mode") or ""]
    return "-".join(p for p in parts if p)


def build(records: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """The scoreboard of a run (the JSON report's ``scoreboard``), or None when no record has op types."""
    per_model: OrderedDict[str, dict[str, Any]] = OrderedDict()
    configs: OrderedDict[str, None] = OrderedDict()
    for rec in records:
        status = status_of(rec)
        if status is None:
            continue
        model = per_model.setdefault(rec["model"], {"op_types": list(rec.get("op_types") or []), "configs": {}})
        config = config_label(rec)
        configs.setdefault(config)
        known = model["configs"].get(config)
        if known is None or STATUSES.index(status) < STATUSES.index(known):
            model["configs"][config] = status
    if not any(m["op_types"] for m in per_model.values()):
        return None
    # A model that never loaded has one "load" record: it stands for every configuration of the run.
    real = [c for c in configs if c != "load"] or ["load"]
    for model in per_model.values():
        failed = model["configs"].pop("load", None) if real != ["load"] else None
        if failed is not None:
            for config in real:
                model["configs"].setdefault(config, failed)
    op_types: dict[str, dict[str, Any]] = {}
    totals = _empty(real)
    for name, model in per_model.items():
        _count(totals, model, real)
        for op in model["op_types"]:
            _count(op_types.setdefault(op, _empty(real)), model, real)
    ordered = OrderedDict(sorted(op_types.items(), key=lambda kv: (-_failing(kv[1]), kv[0])))
    return {"statuses": list(STATUSES), "configs": real, "models": len(per_model),
            "totals": totals, "op_types": ordered,
            "per_model": {name: {"op_types": m["op_types"], "configs": m["configs"]} for name, m in per_model.items()}}


def _empty(configs: list[str]) -> dict[str, Any]:
    return {"models": 0, "configs": {c: dict.fromkeys(STATUSES, 0) for c in configs}}


def _count(row: dict[str, Any], model: dict[str, Any], configs: list[str]) -> None:
    row["models"] += 1
    for config in configs:
        status = model["configs"].get(config)
        if status is not None:
            row["configs"][config][status] += 1


def _failing(row: dict[str, Any]) -> int:
    return sum(n for counts in row["configs"].values() for s, n in counts.items() if s != "agreed")


def converts(counts: dict[str, int]) -> int:
    """Models of a cell that MNN converted (every status but convert_failed)."""
    return sum(counts.values()) - counts.get("convert_failed", 0)


def runs(counts: dict[str, int]) -> int:
    """Models of a cell that MNN converted and ran to outputs (agreed, diverged or inconclusive)."""
    return counts.get("agreed", 0) + counts.get("diverged", 0) + counts.get("inconclusive", 0)


def cell(counts: dict[str, int]) -> str:
    """``3/5 agree, 1 diverge, 1 crash``: agreeing models of all, then each way the others failed."""
    total = sum(counts.values())
    if not total:
        return "-"
    words = {"diverged": "diverge", "crashed": "crash", "run_failed": "no run", "convert_failed": "no convert",
             "error": "error", "inconclusive": "inconclusive"}
    parts = [f"{counts['agreed']}/{total} agree"]
    parts += [f"{counts[s]} {words[s]}" for s in STATUSES if s != "agreed" and counts.get(s)]
    return ", ".join(parts)


def table(board: dict[str, Any], top: int | None = None) -> list[list[str]]:
    """Rows of cells, header first: the totals, then op types with the most failures first (``top`` of them)."""
    configs = board["configs"]
    rows = [["op type", "models", *configs]]
    rows.append([ALL, str(board["totals"]["models"]), *(cell(board["totals"]["configs"][c]) for c in configs)])
    ops = list(board["op_types"].items())
    for op, row in ops[:top] if top is not None else ops:
        rows.append([op, str(row["models"]), *(cell(row["configs"][c]) for c in configs)])
    return rows


def terminal_lines(records: list[dict[str, Any]], top: int = TOP_ROWS) -> list[str]:
    """The short terminal form, for a run over ``MIN_MODELS`` or more models with op types; [] otherwise."""
    board = build(records)
    if board is None or sum(1 for m in board["per_model"].values() if m["op_types"]) < MIN_MODELS:
        return []
    rows = table(board, top)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    shown = min(top, len(board["op_types"]))
    lines = [f"conformance by ONNX op type: {board['models']} models, {len(board['op_types'])} op types "
             f"(the {shown} with most failures below; all in the JSON and HTML reports)"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return lines
