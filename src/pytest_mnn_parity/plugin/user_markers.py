"""The markers a user's own tests carry, read and checked; and the matrix they select.

``@pytest.mark.mnn_parity(model=..., reference=..., backends=..., precisions=...,
atol=..., rtol=..., min_cosine=..., max_outside_fraction=..., partial_zero_fraction=...)``
picks the model and the part of the matrix a test runs on, and its tolerances
(between the ini file and the command line).  ``@pytest.mark.mnn_xfail(backend=...,
precision=..., reason=...)`` expects failure on matching configurations.
``@pytest.mark.mnn_requires_backend("OPENCL")`` skips a test when a backend is absent.

A typo in a marker is an error naming the test, the argument and the known
ones: a misspelt ``atoll=`` silently ignored would loosen nothing and be noticed never.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from ..core.tolerances import OVERRIDABLE, resolve
from ..mnn.backends import canonical_backend, canonical_precision
from ..mnn.config import RunConfig

MARKER_SOURCE = "marker mnn_parity"
PARITY_KEYS = ("model", "reference", "backends", "precisions") + OVERRIDABLE
XFAIL_KEYS = ("backend", "precision", "reason", "strict")

MARKER_HELP = {
    "mnn_parity": "mnn_parity(model=PATH, reference=PATH, backends=LIST, precisions=LIST, atol=, rtol=, "
                  "min_cosine=, max_outside_fraction=, partial_zero_fraction=): run this test over the MNN "
                  "backend x precision matrix on this model (paths relative to the test file); "
                  "see docs/fixtures.md",
    "mnn_xfail": "mnn_xfail(backend=NAME|LIST, precision=NAME|LIST, reason=TEXT, strict=BOOL): expect this "
                 "test to fail on matching MNN configurations",
    "mnn_requires_backend": "mnn_requires_backend(NAME, ...): skip this test unless these MNN backends really "
                            "run here (same discovery and reason as the generated items)",
}


class MarkerError(ValueError):
    """A marker with arguments that cannot be used; the text names the test and the fix."""


@dataclass(frozen=True)
class ParitySpec:
    """The merged ``mnn_parity`` markers of one test (closest marker wins, argument by argument)."""

    model: str | None = None
    reference: str | None = None
    backends: tuple[str, ...] | None = None
    precisions: tuple[str, ...] | None = None
    tolerance: tuple[tuple[str, float], ...] = ()


def parity_spec(marks: Iterable[Any], where: str) -> ParitySpec:
    """Merge ``mnn_parity`` marks given closest first (as ``iter_markers`` yields them)."""
    merged: dict[str, Any] = {}
    for mark in reversed(list(marks)):
        if len(mark.args) > 1:
            raise MarkerError(f"@pytest.mark.mnn_parity on {where}: takes at most one positional argument (the "
                              f"model), got {len(mark.args)}; name the others, e.g. backends=[...]")
        if mark.args:
            merged["model"] = mark.args[0]
        merged.update(mark.kwargs)
    unknown = sorted(set(merged) - set(PARITY_KEYS))
    if unknown:
        raise MarkerError(f"@pytest.mark.mnn_parity on {where}: unknown argument(s) {unknown}; "
                          f"known: {', '.join(PARITY_KEYS)}")
    tolerance = {k: merged[k] for k in OVERRIDABLE if merged.get(k) is not None}
    try:
        resolve("CPU", "high", (MARKER_SOURCE, tolerance))
        backends = _names(merged.get("backends"), canonical_backend, "backends")
        precisions = _names(merged.get("precisions"), canonical_precision, "precisions")
    except (TypeError, ValueError) as exc:
        raise MarkerError(f"@pytest.mark.mnn_parity on {where}: {exc}") from None
    for key in ("model", "reference"):
        if merged.get(key) is not None and not isinstance(merged[key], (str, bytes)) and not hasattr(
                merged[key], "__fspath__"):
            raise MarkerError(f"@pytest.mark.mnn_parity on {where}: {key} must be a path, got {merged[key]!r}")
    return ParitySpec(model=_path_text(merged.get("model")), reference=_path_text(merged.get("reference")),
                      backends=backends, precisions=precisions,
                      tolerance=tuple((k, float(v)) for k, v in tolerance.items()))


@dataclass(frozen=True)
class XfailSpec:
    """One ``mnn_xfail`` marker: which configurations it covers and why."""

    backends: frozenset[str] | None
    precisions: frozenset[str] | None
    reason: str
    strict: bool | None = None

    def matches(self, config: RunConfig) -> bool:
        return ((self.backends is None or config.backend in self.backends)
                and (self.precisions is None or config.precision in self.precisions))


def xfail_specs(marks: Iterable[Any], where: str) -> list[XfailSpec]:
    specs = []
    for mark in marks:
        if mark.args:
            raise MarkerError(f"@pytest.mark.mnn_xfail on {where}: takes keyword arguments only "
                              f"({', '.join(XFAIL_KEYS)})")
        unknown = sorted(set(mark.kwargs) - set(XFAIL_KEYS))
        if unknown:
            raise MarkerError(f"@pytest.mark.mnn_xfail on {where}: unknown argument(s) {unknown}; "
                              f"known: {', '.join(XFAIL_KEYS)}")
        try:
            backends = _names(mark.kwargs.get("backend"), canonical_backend, "backend")
            precisions = _names(mark.kwargs.get("precision"), canonical_precision, "precision")
        except (TypeError, ValueError) as exc:
            raise MarkerError(f"@pytest.mark.mnn_xfail on {where}: {exc}") from None
        label = "-".join(part for part in ("/".join(backends or ("any",)), "/".join(precisions or ("any",))))
        reason = str(mark.kwargs.get("reason") or f"mnn_xfail on {label}")
        strict = mark.kwargs.get("strict")
        specs.append(XfailSpec(frozenset(backends) if backends else None,
                               frozenset(precisions) if precisions else None, reason,
                               None if strict is None else bool(strict)))
    return specs


def required_backends(marks: Iterable[Any], where: str) -> list[str]:
    names: list[str] = []
    for mark in marks:
        if mark.kwargs:
            raise MarkerError(f"@pytest.mark.mnn_requires_backend on {where}: takes backend names only, "
                              f"e.g. mnn_requires_backend(\"OPENCL\")")
        try:
            for arg in mark.args:
                names.extend(_names(arg, canonical_backend, "backend") or ())
        except (TypeError, ValueError) as exc:
            raise MarkerError(f"@pytest.mark.mnn_requires_backend on {where}: {exc}") from None
    return list(dict.fromkeys(names))


def select(wanted: Sequence[str] | None, configured: Sequence[str], narrowed: bool) -> list[str]:
    """The backends (or precisions) a test runs on.

    The marker's list, if any, else the configured one; when the configured
    list was given explicitly (command line or ini) it narrows the marker's,
    keeping the marker's order.
    """
    if wanted is None:
        return list(configured)
    if not narrowed:
        return list(wanted)
    allowed = set(configured)
    return [name for name in wanted if name in allowed]


def matrix_row(nodeid: str, case_id: str) -> str:
    """The node id without the case's part of the parameter id: the test's row in the matrix.

    ``t.py::test_psnr[CPU-low]`` -> ``t.py::test_psnr``;
    ``t.py::test_psnr[img1-CPU-low]`` -> ``t.py::test_psnr[img1]``.
    """
    head, sep, last = nodeid.rpartition("::")
    name, bracket, params = last.partition("[")
    if not bracket or not params.endswith("]") or not case_id:
        return nodeid
    params = params[:-1]
    if params == case_id:
        rest = ""
    elif params.endswith("-" + case_id):
        rest = params[:-len(case_id) - 1]
    elif params.startswith(case_id + "-"):
        rest = params[len(case_id) + 1:]
    elif f"-{case_id}-" in params:
        rest = params.replace(f"-{case_id}-", "-", 1)
    else:
        return nodeid
    return f"{head}{sep}{name}" + (f"[{rest}]" if rest else "")


def _names(value: Any, canon, what: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = [str(v) for v in value]
    else:
        raise TypeError(f"{what} must be a name, a comma-separated string or a list of names, got {value!r}")
    names = tuple(dict.fromkeys(canon(item) for item in items if item.strip()))
    if not names:
        raise ValueError(f"{what} is empty; leave it out to use the configured list")
    return names


def _path_text(value: Any) -> str | None:
    if value is None:
        return None
    return os.fsdecode(value) if isinstance(value, bytes) else os.fspath(value)
