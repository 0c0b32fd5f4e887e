"""pytest-mnn-parity: backend x precision parity checks for MNN models.

The engine (load, run, compare, judge) works without pytest; the pytest plugin
(``plugin/hooks.py``) is a thin layer over it.  The layers, lowest first, are
described in docs/architecture.md.

The public names below are imported on first use: pytest imports this package
for every run (the ``pytest11`` entry point), most of which never touch MNN.
"""
from __future__ import annotations

import importlib
from typing import Any

from .core.version import __version__

_PUBLIC = {
    "Category": "pytest_mnn_parity.core.verdict",
    "LoadedModel": "pytest_mnn_parity.mnn.runner",
    "ParityEngine": "pytest_mnn_parity.engine.engine",
    "ParityResult": "pytest_mnn_parity.engine.results",
    "ParitySettings": "pytest_mnn_parity.engine.results",
    "RunConfig": "pytest_mnn_parity.mnn.runner",
}
# Modules documented as public (docs/index.md uses ``backends.discover``).
_MODULES = {"backends": "pytest_mnn_parity.mnn.backends"}

__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    if name in _MODULES:
        return importlib.import_module(_MODULES[name])
    raise AttributeError(f"module 'pytest_mnn_parity' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC) | set(_MODULES))
