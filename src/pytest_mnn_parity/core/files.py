"""Writing files so that no reader ever sees half of one: every report, bundle, golden and cache file.

A file is written beside its target under a temporary name and renamed into
place (``os.replace`` is atomic on one file system), so a run killed mid-write
leaves the previous file or none.  The temporary file is created like any
other file the user writes (mode 0666 less their umask), so the JSON report,
the HTML report, JUnit, bundles and goldens all get the same permissions.
"""
from __future__ import annotations

import json
import math
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def json_safe(value: Any) -> Any:
    """NaN and Inf are not JSON: write them as the strings "nan", "inf", "-inf"."""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


@contextmanager
def replacing(path: os.PathLike | str, suffix: str = ".tmp") -> Iterator[Path]:
    """A fresh temporary path beside ``path``; renamed onto ``path`` when the block succeeds.

    Whatever the block writes at the temporary path (itself, or through a
    converter) replaces ``path`` at once; on an exception it is removed and
    ``path`` is left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # A name of our own rather than mkstemp's: mkstemp creates the file 0600.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{suffix}")
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: os.PathLike | str, data: bytes | str, writer=None) -> None:
    """Write ``data`` (or call ``writer(binary_file)``) to ``path`` atomically, with the user's umask."""
    with replacing(path) as tmp:
        with open(tmp, "xb") as f:
            if writer is not None:
                writer(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)


def write_json(path: os.PathLike | str, data: Any) -> None:
    """``data`` as indented JSON (NaN/Inf as strings), atomically."""
    atomic_write(path, json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n")
