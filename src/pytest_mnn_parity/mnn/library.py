"""The one place that imports MNN, quietly and lazily.

Importing MNN prints ``The device supports: ...`` to stdout from C++.  A pytest
plugin is imported for every pytest run, including ones that never touch MNN,
so the import is deferred until something needs it and its chatter is kept.
"""
from __future__ import annotations

import functools
from types import ModuleType

from .native_output import capture_native_output


@functools.lru_cache(maxsize=None)
def _load() -> tuple[ModuleType, str]:
    with capture_native_output() as out:
        import MNN  # noqa: PLC0415 - deliberately lazy
    return MNN, out.text


def mnn() -> ModuleType:
    """The ``MNN`` module."""
    return _load()[0]


def mnn_version() -> str:
    return str(mnn().version())


def device_support_line() -> str:
    """What MNN said about the CPU at import (``fp16:0`` means no fp16 arithmetic)."""
    text = _load()[1]
    for line in text.splitlines():
        if "device supports" in line:
            return line.strip()
    return ""
