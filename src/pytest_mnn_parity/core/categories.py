"""The failure categories, their order and the words the tables share: what the plugin reads at every pytest start-up.

Apart from ``verdict`` (which judges arrays, with numpy) so that a pytest run that checks no model
never imports numpy for a name (issue 22).
"""
from __future__ import annotations

from enum import Enum


class Category(str, Enum):
    OK = "ok"
    MODEL_ERROR = "model_error"
    BACKEND_UNAVAILABLE = "backend_unavailable"
    BACKEND_FALLBACK = "backend_fallback"
    # The configuration's isolated worker died (by a signal, or exited) or was
    # killed after --mnn-timeout: see isolation.py.
    CRASHED = "crashed"
    # The plugin itself raised while checking (a bug of ours): the item fails and is reported, never dropped.
    INTERNAL_ERROR = "internal_error"
    TIMEOUT = "timeout"
    RUNTIME_ERROR = "runtime_error"
    SHAPE_MISMATCH = "shape_mismatch"
    NON_FINITE = "non_finite"
    ZERO_OUTPUT = "zero_output"
    PARTIAL_ZERO = "partial_zero"
    CONSTANT_OUTPUT = "constant_output"
    STALE_OUTPUT = "stale_output"
    MISMATCH = "mismatch"
    # --mnn-api both: the Module API's outputs disagree with the session API's.
    API_MISMATCH = "api_mismatch"
    # --mnn-golden: no usable golden (missing, unreadable, or made from other inputs).
    NO_GOLDEN = "no_golden"
    # The outputs agree, but the reference's own outputs are all zero, constant or not finite on these inputs:
    # nothing was tested.  A finding of its own, never a pass.
    DEGENERATE_REFERENCE = "degenerate_reference"

    def __str__(self) -> str:
        return self.value


# Most severe / most specific first.
CATEGORY_ORDER = [
    Category.MODEL_ERROR, Category.NO_GOLDEN, Category.BACKEND_UNAVAILABLE, Category.BACKEND_FALLBACK, Category.CRASHED,
    Category.TIMEOUT, Category.INTERNAL_ERROR, Category.RUNTIME_ERROR, Category.SHAPE_MISMATCH, Category.NON_FINITE,
    Category.ZERO_OUTPUT, Category.PARTIAL_ZERO, Category.CONSTANT_OUTPUT, Category.STALE_OUTPUT, Category.MISMATCH, Category.API_MISMATCH,
    Category.DEGENERATE_REFERENCE, Category.OK,
]


def worst(categories) -> Category:
    cats = list(categories)
    return min(cats, key=CATEGORY_ORDER.index) if cats else Category.OK


# The op sweep (trace/sweep.py): the start of a not_cut reason for a tensor MNN made while creating the session (a
# layout copy, part of a decomposed op).  The file has no such op, so there is nothing to cut; the tables leave these
# rows out and count them (engine/explain.py, report/sweep_table.py, which must not import the sweep at start-up).
SESSION_MADE = "made by MNN at session time"


def session_made(reason: str) -> bool:
    return reason.startswith(SESSION_MADE)
