"""Deterministic model inputs built from the model's own input specs.

Floats are uniform in [0, 1) (image-like); integers are in [0, 8) so index
inputs stay in range for small embedding tables.  Each input draws from its
own stream keyed by (seed, input name), so adding an input to a model does not
change the data of the others.
"""
from __future__ import annotations

import re
import zlib
from typing import TYPE_CHECKING, Mapping

from ..mnn.model import TensorSpec

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

INT_HIGH = 8
_SHAPE = re.compile(r"^\s*([^=\s]+)\s*=\s*(\d+(?:\s*[x,]\s*\d+)*)\s*$")


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``image=1x3x512x512`` -> ``("image", (1, 3, 512, 512))``."""
    match = _SHAPE.match(text)
    if not match and "{" in text:  # a pasted template whose placeholders were not filled in
        raise ValueError(f"--mnn-input-shape {text!r}: replace each {{NAME}} by a size, e.g. "
                         f"{re.sub(r'[{][^}]*[}]', '16', text)}")
    if not match:
        raise ValueError(f"--mnn-input-shape {text!r}: expected NAME=DIMxDIMx..., e.g. image=1x3x512x512")
    dims = tuple(int(d) for d in re.split(r"\s*[x,]\s*", match.group(2)))
    if any(d <= 0 for d in dims):
        raise ValueError(f"--mnn-input-shape {text!r}: every dimension must be a positive integer")
    return match.group(1), dims


def parse_input_shapes(items) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for item in items or ():
        for part in str(item).split(";"):
            if part.strip():
                name, dims = parse_input_shape(part)
                shapes[name] = dims
    return shapes


def _stream(seed: int, name: str) -> np.random.Generator:
    import numpy as np  # noqa: PLC0415 - lazy: the plugin reads this module's names at start-up (issue 22)

    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode("utf-8"))])


def generate_input(spec: TensorSpec, shape: tuple[int, ...], seed: int) -> np.ndarray:
    import numpy as np  # noqa: PLC0415 - lazy: the plugin reads this module's names at start-up (issue 22)

    rng = _stream(seed, spec.name)
    dtype = spec.dtype if spec.dtype is not None else np.dtype(np.float32)
    if dtype.kind == "f":
        return rng.random(shape, dtype=np.float64).astype(dtype)
    if dtype.kind in "iu":
        return rng.integers(0, INT_HIGH, size=shape).astype(dtype)
    raise TypeError(f"input {spec.name!r}: cannot generate data of dtype {dtype}")


def generate_inputs(specs, shapes: Mapping[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    """One array per input, shaped by ``shapes`` (already resolved, see ``runner``)."""
    return {spec.name: generate_input(spec, shapes[spec.name], seed) for spec in specs}


def fingerprint(arrays: Mapping[str, np.ndarray]) -> str:
    """A short content hash of an input set, for the report."""
    import numpy as np  # noqa: PLC0415 - lazy: the plugin reads this module's names at start-up (issue 22)

    h = zlib.crc32(b"")
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h = zlib.crc32(name.encode() + str(a.dtype).encode() + str(a.shape).encode(), h)
        h = zlib.crc32(a.tobytes(), h)
    return f"{h:08x}"
