"""Spreading models over pytest-xdist workers, one model per worker, with stable ids.

Every generated item carries ``xdist_group(name=<model>)``; under
``pytest -n auto --dist loadgroup`` xdist sends a model's items to one worker,
which loads the model and computes its reference once.  (``--dist loadfile``
groups the same way, since an item's node id starts with its model's path.)

Under ``loadgroup`` xdist appends ``@<group>`` to each node id.  The JSON
report, the HTML report and the artifact folders use the id without it, so a
report does not depend on how the run was distributed.
"""
from __future__ import annotations

import pytest

MARKER = "xdist_group"


def group_mark(model_nodeid: str) -> pytest.MarkDecorator:
    return getattr(pytest.mark, MARKER)(name=model_nodeid)


def register_marker(config: pytest.Config) -> None:
    """Without pytest-xdist nobody registers ``xdist_group``; ``--strict-markers`` would reject it."""
    if not config.pluginmanager.hasplugin("xdist"):
        config.addinivalue_line("markers", f"{MARKER}(name): (pytest-xdist) run items of one group on one worker")


def stable_nodeid(item: pytest.Item) -> str:
    """The node id without the ``@group`` suffix xdist's loadgroup adds (computed as xdist does)."""
    nodeid = item.nodeid
    names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in item.iter_markers(MARKER)})
    suffix = "@" + "_".join(names)
    if names and nodeid.endswith(suffix):
        return nodeid[: -len(suffix)]
    return nodeid
