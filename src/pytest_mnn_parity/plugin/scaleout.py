"""Spreading models over pytest-xdist workers, one model per worker, with ids that paste back.

Under ``pytest -n auto --dist loadgroup`` xdist sends a model's items to one
worker, which loads the model and computes its reference once.  The items carry
no ``xdist_group`` mark for that: xdist appends ``@<group>`` to the id of every
marked item, and ``x.mnn::parity[CPU-low]@x.mnn``, printed by ``-v``, by the
failure headers and by ``--lf``'s cache, is not found when pasted after
``pytest``.  Instead the plugin hands xdist a ``loadgroup`` scheduler that
groups a model's items by the model part of their ids, and leaves every other
test's grouping (its ``xdist_group`` marks) to xdist as it is.  (``--dist
loadfile`` groups the same way by itself, since an item's id starts with its
model's path.)
"""
from __future__ import annotations

from pathlib import PurePosixPath

import pytest

from ..mnn.model import MODEL_SUFFIXES

MARKER = "xdist_group"


def register_marker(config: pytest.Config) -> None:
    """Without pytest-xdist nobody registers ``xdist_group``; ``--strict-markers`` would reject users' own marks."""
    if not config.pluginmanager.hasplugin("xdist"):
        config.addinivalue_line("markers", f"{MARKER}(name): (pytest-xdist) run items of one group on one worker")


def model_scope(nodeid: str) -> str | None:
    """The model an item id belongs to (``x.mnn::parity[CPU-low]`` -> ``x.mnn``); None for other tests."""
    path, sep, _ = nodeid.partition("::")
    return path if sep and PurePosixPath(path).suffix in MODEL_SUFFIXES else None


def make_scheduler(config: pytest.Config, log):
    """``--dist loadgroup``: xdist's own scheduler, with a model's items in one group; None for other modes."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class ModelGroupScheduling(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            if scope == nodeid:  # no xdist_group mark: ours are grouped by model
                return model_scope(nodeid) or scope
            return scope

    return ModelGroupScheduling(config, log)
