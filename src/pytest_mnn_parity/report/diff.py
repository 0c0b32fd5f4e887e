"""Compare two JSON reports of this plugin: what got worse, what got better, what moved.

For the reviewer of a change (a new MNN release, a kernel change, a re-converted model, a new
driver): run the suite before and after, then::

    python -m pytest_mnn_parity.report.diff base.json head.json [--json diff.json] [--fail-on worse]

Items are matched by node id.  Each matched pair falls in one class, the first that applies:

* ``worse``: passed -> failed, or a failure whose category became more severe (in
  ``verdict.CATEGORY_ORDER``, e.g. ``mismatch`` -> ``zero_output``);
* ``better``: the reverse;
* ``changed``: outcome or category changed at the same severity (e.g. failed -> xfailed once a
  sidecar declares the failure expected);
* ``untested`` / ``retested``: an item that ran is now skipped, or the reverse: the machine or
  the MNN build changed (a backend is missing), not the model; reported, never fatal unless
  ``--fail-on any``;
* ``drift``: same outcome and category, but an output's max abs error grew (or shrank) at least
  ``DRIFT_FACTOR`` times and the larger of the two is at least ``DRIFT_FLOOR`` of that output's
  tolerance: the margin a change ate before it fails;
* ``backend``: the backend that really ran, or the measured arithmetic, changed.

``new`` and ``gone`` list items present in one report only.  Nothing here needs pytest or MNN.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..core.files import write_json
from ..core.categories import CATEGORY_ORDER, Category
from .records import SCHEMA, key_metric

DRIFT_FACTOR = 2.0
DRIFT_FLOOR = 0.1
# Exit status: what --fail-on counts as a failure of the comparison.
FAIL_ON = {"worse": ("worse",), "drift": ("worse", "drift"),
           "any": ("worse", "better", "changed", "untested", "retested", "drift", "backend", "new", "gone"),
           "never": ()}
KIND_ORDER = ("worse", "changed", "drift", "backend", "untested", "gone", "new", "retested", "better")
_RANK = {category.value: i for i, category in enumerate(CATEGORY_ORDER)}


class ReportError(ValueError):
    """A file that is not a report of this plugin; the message names the file and the fix."""


@dataclass
class ItemChange:
    nodeid: str
    kind: str
    base: dict[str, Any] | None
    head: dict[str, Any] | None
    detail: str


@dataclass
class ReportDiff:
    base_path: str
    head_path: str
    context: list[str] = field(default_factory=list)
    changes: list[ItemChange] = field(default_factory=list)
    unchanged: int = 0

    def of_kind(self, *kinds: str) -> list[ItemChange]:
        return [c for c in self.changes if c.kind in kinds]

    def failing(self, fail_on: str = "worse") -> list[ItemChange]:
        return self.of_kind(*FAIL_ON[fail_on])

    def as_dict(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for change in self.changes:
            counts[change.kind] = counts.get(change.kind, 0) + 1
        return {"schema": SCHEMA + "/diff", "base": self.base_path, "head": self.head_path, "context": self.context,
                "counts": counts, "unchanged": self.unchanged, "changes": [asdict(c) for c in self.changes]}

    def lines(self) -> list[str]:
        out = [f"MNN parity diff: {self.base_path} -> {self.head_path}"]
        out += [f"  {line}" for line in self.context]
        if not self.changes:
            return out + [f"no changes ({self.unchanged} items compared)"]
        for kind in KIND_ORDER:
            group = self.of_kind(kind)
            if group:
                out.append(f"{kind} ({len(group)}):")
                out += [f"  {c.nodeid}: {c.detail}" for c in group]
        counts = ", ".join(f"{len(self.of_kind(k))} {k}" for k in KIND_ORDER if self.of_kind(k))
        return out + [f"{counts}; {self.unchanged} unchanged"]


def load_report(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file; write one with pytest --mnn-report {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path}: not a JSON report ({exc}); write one with pytest --mnn-report {path}") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("results"), list):
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise ReportError(f"{path}: not a pytest-mnn-parity report (schema {found!r}, expected {SCHEMA!r}); "
                          f"write one with pytest --mnn-report {path}")
    return data


def diff_reports(base: Mapping[str, Any], head: Mapping[str, Any], base_path: str = "base",
                 head_path: str = "head") -> ReportDiff:
    result = ReportDiff(base_path, head_path, _context(base, head))
    old = {r["nodeid"]: r for r in base["results"]}
    new = {r["nodeid"]: r for r in head["results"]}
    for nodeid, b in old.items():
        h = new.get(nodeid)
        if h is None:
            result.changes.append(ItemChange(nodeid, "gone", _brief(b), None, f"only in base ({_state(b)})"))
            continue
        change = compare_items(nodeid, b, h)
        if change is None:
            result.unchanged += 1
        else:
            result.changes.append(change)
    for nodeid, h in new.items():
        if nodeid not in old:
            result.changes.append(ItemChange(nodeid, "new", None, _brief(h), f"only in head ({_state(h)})"))
    result.changes.sort(key=lambda c: (KIND_ORDER.index(c.kind), c.nodeid))
    return result


def compare_items(nodeid: str, b: Mapping[str, Any], h: Mapping[str, Any]) -> ItemChange | None:
    """The class of change between one item's two records (see the module docstring), or None."""
    def change(kind: str, detail: str) -> ItemChange:
        return ItemChange(nodeid, kind, _brief(b), _brief(h), detail)

    ran_b, ran_h = b["outcome"] != "skipped", h["outcome"] != "skipped"
    if ran_b != ran_h:
        return change("untested" if ran_b else "retested", f"{_state(b)} -> {_state(h)}")
    if not ran_b:
        return None
    if (b["outcome"], b["category"]) != (h["outcome"], h["category"]):
        severity = _severity(h) - _severity(b)
        kind = "worse" if severity > 0 else "better" if severity < 0 else "changed"
        return change(kind, f"{_state(b)} -> {_state(h)}")
    drift = _drift(b, h)
    if drift:
        return change("drift", drift)
    moved = []
    if b.get("backend_used") != h.get("backend_used"):
        moved.append(f"backend {b.get('backend_used')} -> {h.get('backend_used')}")
    kind_b, kind_h = (_arith(r) for r in (b, h))
    if kind_b != kind_h:
        moved.append(f"arithmetic {kind_b} -> {kind_h}")
    return change("backend", "; ".join(moved)) if moved else None


def _severity(rec: Mapping[str, Any]) -> int:
    """Higher is worse: a failure's rank by category, above every pass."""
    if rec["outcome"] not in ("failed", "error"):
        return 0
    return 1 + len(CATEGORY_ORDER) - _RANK.get(rec["category"], _RANK[Category.MISMATCH.value])


def _drift(b: Mapping[str, Any], h: Mapping[str, Any]) -> str:
    notes = []
    outputs_b, outputs_h = b.get("outputs") or {}, h.get("outputs") or {}
    for name in sorted(set(outputs_b) & set(outputs_h)):
        x, y = _num(outputs_b[name].get("max_abs")), _num(outputs_h[name].get("max_abs"))
        if not (math.isfinite(x) and math.isfinite(y)):
            continue
        bound = _bound(h, outputs_h[name])
        grew = max(x, y) / max(min(x, y), 1e-30)
        if grew >= DRIFT_FACTOR and bound > 0 and max(x, y) >= DRIFT_FLOOR * bound:
            direction = "grew" if y > x else "shrank"
            notes.append(f"{name}: max abs {x:.3g} -> {y:.3g} ({direction} {grew:.3g}x; "
                         f"now {y / bound:.0%} of its tolerance {bound:.3g})")
    return "; ".join(notes)


def _bound(rec: Mapping[str, Any], output: Mapping[str, Any]) -> float:
    """The absolute error an output may have: atol + rtol, both scaled to its reference (as tolerances.py)."""
    tol = rec.get("tolerance") or {}
    scale = _num(output.get("ref_scale", 1.0))
    scale = max(scale, 1.0) if math.isfinite(scale) else 1.0
    return (_num(tol.get("atol", 0.0)) + _num(tol.get("rtol", 0.0))) * scale


def _num(value: Any) -> float:
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _arith(rec: Mapping[str, Any]) -> str | None:
    arithmetic = rec.get("arithmetic")
    return arithmetic.get("kind") if isinstance(arithmetic, Mapping) else None


def _state(rec: Mapping[str, Any]) -> str:
    metric = _key_number(rec)
    return f"{rec['outcome']} {rec['category']}" + (f" ({metric})" if metric else "")


def _key_number(rec: Mapping[str, Any]) -> str:
    try:
        return key_metric(dict(rec))
    except (KeyError, TypeError, ValueError):
        return ""


def _brief(rec: Mapping[str, Any]) -> dict[str, Any]:
    return {"outcome": rec["outcome"], "category": rec["category"], "backend_used": rec.get("backend_used"),
            "key_metric": _key_number(rec), "first_divergent_layer": (rec.get("first_divergent_layer") or {}).get("name")}


def _context(base: Mapping[str, Any], head: Mapping[str, Any]) -> list[str]:
    """What differs between the two runs themselves: MNN version, platform, settings."""
    lines = []
    for what, key in (("MNN", "mnn_version"), ("platform", "platform")):
        if base.get(key) != head.get(key):
            lines.append(f"{what}: {base.get(key)} -> {head.get(key)}")
    settings_b, settings_h = base.get("settings") or {}, head.get("settings") or {}
    for key in sorted(set(settings_b) | set(settings_h)):
        if settings_b.get(key) != settings_h.get(key):
            lines.append(f"setting {key}: {settings_b.get(key)} -> {settings_h.get(key)}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pytest_mnn_parity.report.diff",
                                     description="Compare two pytest-mnn-parity JSON reports.")
    parser.add_argument("base", help="the report before the change")
    parser.add_argument("head", help="the report after the change")
    parser.add_argument("--json", metavar="PATH", help="also write the diff as JSON")
    parser.add_argument("--fail-on", choices=sorted(FAIL_ON), default="worse",
                        help="exit 1 when there are changes of these kinds: worse (default), drift (worse or "
                             "drift), any, never")
    args = parser.parse_args(argv)
    try:
        result = diff_reports(load_report(args.base), load_report(args.head), args.base, args.head)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(result.lines()))
    if args.json:
        write_json(args.json, result.as_dict())
    return 1 if result.failing(args.fail_on) else 0


if __name__ == "__main__":
    sys.exit(main())
