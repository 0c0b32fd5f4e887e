"""Failures that several configurations share, explained once.

A model that fails the same way on four configurations used to print the same
~40-line explanation four times.  Here the failing records of a run are grouped
by what makes their explanations the same (model, category, first divergent
layer, failing outputs; for a model that cannot be tested at all, its message),
so the terminal can print each group's explanation once, listing its
configurations, while every item keeps a short text of its own: its headline
(category, configuration, its numbers), where the explanation is, and its
reproduce line.  Pure functions of the JSON records, so they give the same
grouping in one process and under pytest-xdist, whichever worker ran what.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

FAILING = ("failed", "error")
SECTION = "MNN parity: explained once"

# The lines of a failure message that belong to one configuration, kept in its own short text.
_OWN_LINES = ("reproduce: ", "pictures:  ")


@dataclass(frozen=True)
class SharedFailure:
    """One explanation and the items it explains (two or more, in the order they finished)."""

    key: tuple
    nodeids: tuple[str, ...]
    labels: tuple[str, ...]
    # The first item's record: its message is the explanation shown.
    record: dict[str, Any]

    @property
    def same_message(self) -> bool:
        """Grouped by an identical message (nothing was compared), not by category and first divergent layer."""
        return len(self.key) == 3

    @property
    def model(self) -> str:
        return str(self.record.get("model"))

    @property
    def what(self) -> str:
        """``zero_output, first divergent layer tiny_conv`` or ``model_error``."""
        layer = (self.record.get("first_divergent_layer") or {}).get("name")
        return self.record.get("category", "?") + (f", first divergent layer {layer}" if layer else "")

    def headline(self) -> str:
        return (f"{self.what}: {self.model} on {len(self.labels)} configurations: {', '.join(self.labels)} "
                f"(the message of {self.labels[0]}; each item's own line is above)")


def config_label(nodeid: str) -> str:
    """``x.mnn::parity[photo1-CPU-low]`` -> ``photo1-CPU-low``: the configuration as the item's id names it."""
    name = nodeid.rsplit("::", 1)[-1]
    return name[name.index("[") + 1:-1] if "[" in name and name.endswith("]") else name


def failure_key(rec: dict[str, Any]) -> tuple | None:
    """What makes two failing items' explanations the same; None for an item that did not fail."""
    if rec.get("outcome") not in FAILING or not rec.get("message"):
        return None
    category = rec.get("category")
    if category in ("ok", "internal_error"):
        return None  # a strict xpass, or a plugin bug whose traceback each item shows
    if not rec.get("outputs"):
        # Nothing was compared (a model that cannot be tested, a crash, a timeout): the message is the whole
        # explanation, and only the same message is the same.
        return rec.get("model"), category, rec.get("message")
    layer = (rec.get("first_divergent_layer") or {}).get("name")
    failing = tuple(sorted(name for name, out in rec["outputs"].items() if out.get("category") not in (None, "ok")))
    return rec.get("model"), category, layer, failing


def shared_failures(records: Iterable[dict[str, Any]]) -> list[SharedFailure]:
    """The groups of two or more failing items that one explanation covers, in the order they first failed."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for rec in records:
        key = failure_key(rec)
        if key is not None:
            groups.setdefault(key, []).append(rec)
    return [SharedFailure(key, tuple(r["nodeid"] for r in recs), tuple(config_label(r["nodeid"]) for r in recs),
                          recs[0])
            for key, recs in groups.items() if len(recs) > 1]


def item_text(rec: dict[str, Any], shared: SharedFailure) -> str:
    """What one item of a group shows in the terminal: its own headline and numbers, where the explanation is,
    and its own reproduce line.  A model error's message is the same for all, so it is not repeated at all."""
    lines = (rec.get("message") or "").splitlines()
    where = f'explained once below, under "{SECTION}"'
    count = f"{len(shared.labels)} configurations"
    if shared.same_message:
        what = "cannot be tested" if rec.get("category") == "model_error" else "failed"
        return (f"{rec.get('category')} on {config_label(rec['nodeid'])}: {shared.model} {what} (the same "
                f"message on {count}); {where}")
    return "\n".join([lines[0], f"{where} (the same {shared.what} on {count})",
                      *(line for line in lines if line.startswith(_OWN_LINES))])


def explained_lines(groups: list[SharedFailure]) -> list[str]:
    """The terminal section: each group's headline, then its whole explanation once."""
    out: list[str] = []
    for group in groups:
        if out:
            out.append("")
        out.append(group.headline())
        out.extend(str(group.record.get("message")).splitlines())
    return out
