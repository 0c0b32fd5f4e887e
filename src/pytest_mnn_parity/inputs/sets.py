"""Named input sets: real images, masks, arrays or generators, turned into model inputs.

An input set maps each model input to a *source*:

* ``image``: a picture file read with Pillow (RGB, BGR or gray), resized to the
  input's height x width, scaled, normalised by mean/std, laid out NCHW or NHWC;
* ``mask``: a picture binarised at a threshold (1 where masked, 0 elsewhere);
* ``array``: an ``.npy`` file or one member of an ``.npz``;
* ``generator``: ``uniform``, ``normal``, ``constant`` or ``zeros``.

Every input set yields two arrays per input, A and B.  B exists for the
stale-output check (a backend that does not recompute returns A's output for
B).  For a named set B is A *mirrored left-right* (the width axis of a 4-D
input, the last axis otherwise), applied to every input alike: an image and its
mask stay aligned, and B has the brightness, masked area and value range of A,
so B breaks parity exactly when A does and never adds a failure of its own.

Problems are ``SidecarError``s naming the file, the key and the fix.  What can
be checked without the model (files exist and decode, keys and values make
sense) is checked when the sidecar is read; the rest (input names, ranks,
shapes, channels, dtypes) when the model is loaded, before it runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .sources import (  # noqa: F401
    ArraySource,
    GeneratorSource,
    ImageSource,
    MaskSource,
    SidecarError,
    Source,
    Target,
    ValueSource,
    Where,
)

GENERATORS = ("uniform", "normal", "constant", "zeros")
COLORS = ("RGB", "BGR", "GRAY")
LAYOUT_NAMES = ("NCHW", "NHWC")
RESAMPLE = ("nearest", "bilinear", "bicubic", "lanczos")
DTYPES = ("float32", "float64", "int32", "int64", "uint8")
SOURCE_KINDS = ("image", "mask", "array", "generator")
_KEYS = {
    "image": {"image", "color", "resize", "resample", "scale", "mean", "std", "layout", "dtype"},
    "mask": {"mask", "threshold", "invert", "resize", "resample", "layout", "dtype"},
    "array": {"array", "key"},
    "generator": {"generator", "low", "high", "mean", "std", "value"},
}
_GENERATOR_KEYS = {"uniform": {"low", "high"}, "normal": {"mean", "std"}, "constant": {"value"}, "zeros": set()}


# -- parsing one source from its TOML table ------------------------------------------


def parse_source(value: Any, where: Where, base: Path) -> Source:
    """``{ image = "a.png", ... }`` -> an ``ImageSource`` etc.; ``where`` names the input's key."""
    if isinstance(value, str):
        raise where.error(f"expected a table, got the string {value!r}",
                          f'write {where.key} = {{ image = "{value}" }} (or mask / array / generator)')
    if not isinstance(value, dict):
        raise where.error(f"expected a table, got {type(value).__name__} {value!r}",
                          f'write {where.key} = {{ image = "photo.png" }} (or mask / array / generator)')
    kinds = [k for k in SOURCE_KINDS if k in value]
    if len(kinds) != 1:
        found = f"both {' and '.join(kinds)}" if kinds else "none of them"
        raise where.error(f"a source needs exactly one of {', '.join(SOURCE_KINDS)}; found {found}",
                          f'e.g. {where.key} = {{ image = "photo.png" }}')
    kind = kinds[0]
    allowed = _KEYS[kind]
    if kind == "generator":
        name = value["generator"]
        if name not in GENERATORS:
            raise where.error(f"unknown generator {name!r}", f"use one of {', '.join(GENERATORS)}")
        allowed = {"generator"} | _GENERATOR_KEYS[name]
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise where.error(f"unknown key(s) {unknown} for a {kind} source",
                          f"known keys: {', '.join(sorted(allowed))}")
    get = _Getter(value, where)
    if kind == "image":
        src: Source = ImageSource(where, _path(base, value["image"], where), get.choice("color", COLORS, "RGB"),
                                  get.bool("resize", True), get.choice("resample", RESAMPLE, "bilinear"),
                                  get.number("scale", None, positive=True), get.floats("mean", (0.0,)),
                                  get.floats("std", (1.0,), positive=True),
                                  get.choice("layout", LAYOUT_NAMES, None), get.choice("dtype", DTYPES, None))
    elif kind == "mask":
        src = MaskSource(where, _path(base, value["mask"], where), get.number("threshold", 0.5),
                         get.bool("invert", False), get.bool("resize", True),
                         get.choice("resample", RESAMPLE, "nearest"), get.choice("layout", LAYOUT_NAMES, None),
                         get.choice("dtype", DTYPES, None))
    elif kind == "array":
        key = value.get("key")
        if key is not None and not isinstance(key, str):
            raise where.at("key").error(f"expected a string, got {key!r}", 'write key = "NAME" (an .npz member)')
        src = ArraySource(where, _path(base, value["array"], where), key)
    else:
        src = GeneratorSource(where, value["generator"], get.number("low", None), get.number("high", None),
                              get.number("mean", 0.0), get.number("std", 1.0, positive=True),
                              get.number("value", 0.0))
        if src.kind == "constant" and "value" not in value:
            raise where.error("a constant generator needs a value", f"e.g. {where.key} = "
                                                                      '{ generator = "constant", value = 0.5 }')
        low, high = src.bounds(np.dtype(np.float32))
        if src.kind == "uniform" and not low < high:
            raise where.error(f"uniform needs low < high, got [{low:g}, {high:g})", "swap or widen the range")
    src.check_files()
    return src


class _Getter:
    def __init__(self, table: Mapping[str, Any], where: Where):
        self.table, self.where = table, where

    def number(self, key: str, default, positive: bool = False):
        value = self.table.get(key, default)
        if value is default:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.where.at(key).error(f"expected a number, got {value!r}", f"write {key} = 0.5 (no quotes)")
        if positive and not value > 0:
            raise self.where.at(key).error(f"must be positive, got {value!r}", f"give {key} a value above 0")
        return float(value)

    def floats(self, key: str, default, positive: bool = False) -> tuple[float, ...]:
        value = self.table.get(key, default)
        if value is default:
            return value
        values = value if isinstance(value, list) else [value]
        if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
            raise self.where.at(key).error(f"expected a number or a list of numbers (one per channel), got {value!r}",
                                           f"write {key} = 0.5 or {key} = [0.485, 0.456, 0.406]")
        if positive and any(not v > 0 for v in values):
            raise self.where.at(key).error(f"every value must be positive, got {value!r}", "use values above 0")
        return tuple(float(v) for v in values)

    def bool(self, key: str, default: bool) -> bool:
        value = self.table.get(key, default)
        if not isinstance(value, bool):
            raise self.where.at(key).error(f"expected true or false, got {value!r}", f"write {key} = true or false")
        return value

    def choice(self, key: str, choices, default):
        value = self.table.get(key, default)
        if value is default:
            return value
        match = next((c for c in choices if isinstance(value, str) and c.lower() == value.lower()), None)
        if match is None:
            raise self.where.at(key).error(f"unknown value {value!r}", f"use one of {', '.join(choices)}")
        return match


def _path(base: Path, value: Any, where: Where) -> Path:
    if not isinstance(value, str) or not value:
        raise where.error(f"expected a file path, got {value!r}", 'give a path in quotes, e.g. "photo.png"')
    return (base / value) if not Path(value).is_absolute() else Path(value)


# -- the input set --------------------------------------------------------------------


@dataclass
class InputSet:
    """A named set of sources, one per model input."""

    name: str
    sources: dict[str, Source]
    where: Where | None = None
    seed: int | None = None
    # Found when the sidecar was read; raised when the set is used, so the
    # model's other input sets still run.
    error: SidecarError | None = None
    origin: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # Outputs stored with the inputs (an ONNX test-data set's output_*.pb, see test_data): the reference of
    # input set A instead of a reference run.
    expected: dict[str, np.ndarray] | None = None
    expected_from: str = ""

    @classmethod
    def from_arrays(cls, name: str, arrays: Mapping[str, np.ndarray], label: str = "array") -> "InputSet":
        where = Where(Path(label), f"input_sets.{name}")
        short = Path(label).name
        return cls(name, {k: ValueSource(where.at(k), np.asarray(v), f"{short}[{k}]") for k, v in arrays.items()},
                   where, origin=label)

    def describe(self, model=None) -> str:
        """What each input is made of; with ``model``, also what was done to fit it (a picture resized)."""
        origin = f" from {self.origin}" if self.origin else ""
        specs = {spec.name: spec for spec in model.info.inputs} if model is not None else {}

        def one(name, source) -> str:
            return source.describe(target_of(model, specs[name]) if name in specs else None)

        return f"{self.name}{origin}: " + ", ".join(f"{k} <- {one(k, s)}" for k, s in self.sources.items())

    def build(self, model, default_seed: int, label: str | None = None
              ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Input sets A and B (A mirrored) for ``model`` (a ``LoadedModel``), validated against its inputs;
        ``label`` names the model in messages (the user's ``.onnx`` rather than its conversion)."""
        if self.error is not None:
            raise self.error
        where = self.where or Where(Path(str(model.path)), f"input_sets.{self.name}")
        names = [spec.name for spec in model.info.inputs]
        unknown = [k for k in self.sources if k not in names]
        if unknown:
            from ..mnn.backends import did_you_mean  # noqa: PLC0415 - difflib, only for this message

            said = "; ".join(f"{k!r}{did_you_mean(k, names)}" for k in unknown)
            raise where.at(unknown[0]).error(
                f"the model {label or model.path.name} has no input {said} (its inputs: {', '.join(names)})",
                "rename the key to one of the model's inputs")
        missing = [n for n in names if n not in self.sources]
        if missing:
            raise where.error(f"no source for input {missing[0]!r} (the model's inputs: {', '.join(names)})",
                              f'add {missing[0]} = {{ generator = "uniform" }} (or an image, mask or array)')
        seed = default_seed if self.seed is None else self.seed
        a = {spec.name: self.sources[spec.name].load(target_of(model, spec), seed) for spec in model.info.inputs}
        b = {spec.name: mirror(a[spec.name], target_of(model, spec).layout) for spec in model.info.inputs}
        return a, b


def target_of(model, spec) -> Target:
    return Target(spec.name, tuple(model.shapes[spec.name]), spec.dtype, "NHWC" if spec.layout == "NHWC" else "NCHW")


def mirror(array: np.ndarray, layout: str = "NCHW") -> np.ndarray:
    """Reverse the width axis (axis 3 of NCHW, 2 of NHWC; the last axis of other ranks)."""
    if array.ndim == 0:
        return array.copy()
    axis = (2 if layout == "NHWC" else 3) if array.ndim == 4 else array.ndim - 1
    return np.ascontiguousarray(np.flip(array, axis=axis))
