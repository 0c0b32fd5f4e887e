"""Input guards: refuse inputs too large to allocate, and flag inputs that are not finite.

A model (or ``--mnn-input-shape``) can declare an input of 1x3x100000x100000.
MNN creates a session for it without touching the memory, so nothing fails
until the inputs are generated and copied in, and then the failure is an
allocation error (or the OOM killer) far from its cause.  The engine checks
the size of one input set against ``--mnn-max-input-mb`` first.

Non-finite inputs (NaN/Inf, e.g. from a user's own arrays) are allowed: a model
may be meant to handle them.  They are reported, so that NaN outputs that
follow from them are not mistaken for a backend bug.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from .model import ModelError, TensorSpec

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

DEFAULT_MAX_INPUT_MB = 1024.0
_MIB = 1 << 20


def input_set_bytes(specs, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """Bytes each input of one input set takes at its resolved shape."""
    import numpy as np  # noqa: PLC0415 - lazy: the plugin reads this module's names at start-up (issue 22)

    sizes = {}
    for spec in specs:
        count = 1
        for dim in shapes[spec.name]:
            count *= max(int(dim), 0)
        itemsize = np.dtype(spec.dtype).itemsize if spec.dtype is not None else 4
        sizes[spec.name] = count * itemsize
    return sizes


def check_input_budget(path, specs: tuple[TensorSpec, ...], shapes: Mapping[str, tuple[int, ...]],
                       max_mb: float) -> None:
    """Raise ``ModelError`` when one input set needs more than ``max_mb`` MiB."""
    sizes = input_set_bytes(specs, shapes)
    total = sum(sizes.values())
    if total <= max_mb * _MIB:
        return
    dtypes = {spec.name: spec.dtype for spec in specs}
    parts = ", ".join(f"{name} {'x'.join(map(str, shapes[name]))} {dtypes[name]} = {_human(size)}"
                      for name, size in sorted(sizes.items(), key=lambda kv: -kv[1]))
    raise ModelError(path, f"its inputs need {_human(total)} per input set ({parts}), above the limit of "
                           f"{max_mb:g} MiB (--mnn-max-input-mb); refused before allocating anything",
                     "give smaller shapes with --mnn-input-shape NAME=DIMxDIM..., or raise --mnn-max-input-mb if "
                     "this machine really has the memory (the run holds two input sets, their outputs and the "
                     "model's activations)")


def _human(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", _MIB), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def nonfinite_inputs(*input_sets: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]] | None:
    """Per input name, NaN and Inf counts over the given input sets; ``None`` when all are finite."""
    import numpy as np  # noqa: PLC0415 - lazy: the plugin reads this module's names at start-up (issue 22)

    found: dict[str, dict[str, Any]] = {}
    for index, arrays in enumerate(input_sets):
        label = "AB"[index] if index < 2 else str(index)
        for name, array in arrays.items():
            a = np.asarray(array)
            if a.dtype.kind not in "fc" or bool(np.isfinite(a).all()):
                continue
            entry = found.setdefault(name, {"nan": 0, "inf": 0, "size": 0, "sets": ""})
            entry["nan"] += int(np.count_nonzero(np.isnan(a)))
            entry["inf"] += int(np.count_nonzero(np.isinf(a)))
            entry["size"] += int(a.size)
            entry["sets"] += label
    return found or None


def describe_nonfinite(found: Mapping[str, Mapping[str, Any]]) -> str:
    return "; ".join(f"{name}: {v['nan']} NaN and {v['inf']} Inf in input set(s) {v['sets']}"
                     for name, v in found.items())
