"""Where the hooks find the run's state, and the model's part of a node id.

Kept apart from ``items.py`` (which imports the engine's results and MNN's runner) because the hooks need them
at every pytest start-up, also in runs that never check a model.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

# The run's state, a ``run.ParityRun``; typed loosely so that this module, which every item module imports, does
# not import ``run`` even for type checkers (``run`` imports the item modules: a circle).
PARITY_RUN: pytest.StashKey[Any] = pytest.StashKey()


def node_id_path(path: Path, rootpath: Path) -> str:
    """The model's part of the node id: relative to rootdir where possible."""
    try:
        return path.resolve().relative_to(rootpath.resolve()).as_posix()
    except ValueError:
        return Path(os.path.relpath(path.resolve(), rootpath.resolve())).as_posix()


def is_parity_item(item: pytest.Item) -> bool:
    """An item this plugin generated (a matrix item, a model's load error, a golden, an input search): its class
    lives in this package.  Asked before importing ``items.py``, so a run of plain tests never imports it."""
    return type(item).__module__.startswith("pytest_mnn_parity.plugin.")
