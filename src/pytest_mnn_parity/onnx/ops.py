"""The ONNX op types a model is made of: what a crash names and what the conformance scoreboard counts by.

Read with the ``onnx`` package alone (never with MNN: a model that aborts MNN
must still say what it holds), subgraphs (If, Loop, Scan bodies) included.
A ``.mnn`` file has no ONNX ops; one converted by the run is described by its
ONNX source.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

from .variants import is_onnx


def op_types(path: os.PathLike | str) -> tuple[str, ...]:
    """Distinct op types of an ONNX model in first-use order (a non-default domain as ``domain::Op``);
    () for a file that is no ONNX model or cannot be read (its conversion reports why)."""
    if not is_onnx(path):
        return ()
    try:
        stat = Path(path).stat()
    except OSError:
        return ()
    return _read(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _read(path: str, size: int, mtime_ns: int) -> tuple[str, ...]:
    try:
        import onnx  # noqa: PLC0415 - only for ONNX models

        graph = onnx.load(path, load_external_data=False).graph
    except Exception:  # noqa: BLE001 - an unreadable model is the converter's error to report
        return ()
    seen: dict[str, None] = {}
    graphs = [graph]
    while graphs:
        for node in graphs.pop().node:
            seen.setdefault(node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}")
            for attribute in node.attribute:
                graphs += ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs)
    return tuple(seen)
