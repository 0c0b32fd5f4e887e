"""Hypothesis strategies for model inputs that look like real data.

Noise is a poor probe for an image model: what breaks inpainting networks is
flat regions, hard edges, saturated pixels, and masks of a certain size.  These
strategies build arrays from a few such parts, so hypothesis can also shrink a
failure to a simple picture (one flat level, one rectangle):

* images: a base level, an optional step edge, up to 3 rectangles (grey or
  coloured), optional noise, up to 4 saturated pixels;
* masks: up to 3 rectangles of 1 on 0, or of 0 on 1 (empty to full);
* other float tensors: a base level, up to 3 spans, noise, saturated elements;
* integer tensors: a base value, spans, optional uniform noise.

``mnn_inputs(model, input_set)`` draws every input of a model within what its
input set declares: a generator's range, an image's pixel range passed through
the same scale/mean/std, a mask's binary values, an array's min..max; inputs
with ``constant``/``zeros`` generators stay fixed.  Write your own tests with it::

    from hypothesis import given, settings
    from pytest_mnn_parity.inputs.strategies import mnn_inputs

    @settings(max_examples=50, deadline=None)
    @given(inputs=mnn_inputs("models/lama.mnn", input_set="photo1"))
    def test_lama_low_precision(inputs): ...
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from hypothesis import strategies as st

from .generate import INT_HIGH
from .sets import (
    ArraySource,
    GeneratorSource,
    ImageSource,
    InputSet,
    MaskSource,
    Source,
    Target,
    ValueSource,
    target_of,
)

__all__ = ["float_arrays", "int_arrays", "masks", "mnn_inputs", "source_arrays", "unit_images"]

_LEVEL = st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0, allow_nan=False))
_NOISE = st.one_of(st.just(0.0), st.floats(0.0, 0.25, allow_nan=False))
_SEED = st.integers(0, 2 ** 32 - 1)


def _rect(h: int, w: int) -> tuple[st.SearchStrategy, ...]:
    """Top, left, height, width of a rectangle (clipped to the picture when painted)."""
    return st.integers(0, h - 1), st.integers(0, w - 1), st.integers(1, h), st.integers(1, w)


@st.composite
def unit_images(draw, shape: tuple[int, int, int, int]) -> np.ndarray:
    """Float64 images in [0, 1], shape (N, C, H, W), built from flat regions, edges and saturated pixels."""
    n, c, h, w = shape
    color = st.one_of(_LEVEL.map(lambda v: (v,)), st.tuples(*[_LEVEL] * c)) if c <= 4 else _LEVEL.map(lambda v: (v,))

    def paint(region: np.ndarray, value: tuple[float, ...]) -> None:
        region[...] = np.asarray(value, dtype=np.float64).reshape(1, -1, 1, 1)

    img = np.empty(shape, dtype=np.float64)
    paint(img, draw(color))
    edge = draw(st.none() | st.tuples(st.sampled_from([2, 3]), st.integers(0, max(h, w) - 1), color))
    if edge is not None:
        axis, at, value = edge
        index = [slice(None)] * 4
        index[axis] = slice(min(at, shape[axis] - 1), None)
        paint(img[tuple(index)], value)
    for y, x, dy, dx, value in draw(st.lists(st.tuples(*_rect(h, w), color), max_size=3)):
        paint(img[:, :, y:y + dy, x:x + dx], value)
    amplitude, seed = draw(_NOISE), draw(_SEED)
    if amplitude:
        img += np.random.default_rng(seed).uniform(-amplitude, amplitude, size=shape)
    for y, x, value in draw(st.lists(st.tuples(st.integers(0, h - 1), st.integers(0, w - 1),
                                               st.sampled_from([0.0, 1.0])), max_size=4)):
        img[:, :, y, x] = value
    return np.clip(img, 0.0, 1.0)


@st.composite
def masks(draw, shape: tuple[int, int, int, int]) -> np.ndarray:
    """Binary float64 masks (1 = masked), shape (N, C, H, W), from empty to full.

    Up to 3 rectangles of 1 on 0, or (inverted) of 0 on 1, so that large masked
    areas are as easy to reach as small ones.
    """
    _, _, h, w = shape
    inverted = draw(st.booleans())
    mask = np.full(shape, 1.0 if inverted else 0.0)
    for y, x, dy, dx in draw(st.lists(st.tuples(*_rect(h, w)), max_size=3)):
        mask[:, :, y:y + dy, x:x + dx] = 0.0 if inverted else 1.0
    return mask


@st.composite
def float_arrays(draw, shape: tuple[int, ...]) -> np.ndarray:
    """Float64 arrays in [0, 1] of any shape: a base level, spans of other levels, noise, saturated elements."""
    size = int(np.prod(shape, dtype=np.int64))
    flat = np.full(size, draw(_LEVEL))
    if size:
        for start, length, value in draw(st.lists(st.tuples(st.integers(0, size - 1), st.integers(1, size), _LEVEL),
                                                  max_size=3)):
            flat[start:start + length] = value
        amplitude, seed = draw(_NOISE), draw(_SEED)
        if amplitude:
            flat += np.random.default_rng(seed).uniform(-amplitude, amplitude, size=size)
        for index, value in draw(st.lists(st.tuples(st.integers(0, size - 1), st.sampled_from([0.0, 1.0])),
                                          max_size=4)):
            flat[index] = value
    return np.clip(flat, 0.0, 1.0).reshape(shape)


@st.composite
def int_arrays(draw, shape: tuple[int, ...], low: int, high: int) -> np.ndarray:
    """Int64 arrays with values in [low, high): a base value, spans, optional uniform noise."""
    size = int(np.prod(shape, dtype=np.int64))
    value = st.integers(low, high - 1)
    flat = np.full(size, draw(value), dtype=np.int64)
    if size:
        for start, length, v in draw(st.lists(st.tuples(st.integers(0, size - 1), st.integers(1, size), value),
                                              max_size=3)):
            flat[start:start + length] = v
        if draw(st.booleans()):
            flat = np.random.default_rng(draw(_SEED)).integers(low, high, size=size)
    return flat.reshape(shape)


def _nchw(target: Target, layout: str | None = None) -> tuple[tuple[int, int, int, int], bool]:
    """The (N, C, H, W) to draw for a 4-D target, and whether to transpose to NHWC afterwards."""
    nhwc = (layout or target.layout) == "NHWC"
    n, c, h, w = Target(target.name, target.shape, target.dtype, "NHWC" if nhwc else "NCHW").image_dims
    return (n, c, h, w), nhwc


def _layout(arr: np.ndarray, nhwc: bool) -> np.ndarray:
    return np.ascontiguousarray(arr.transpose(0, 2, 3, 1)) if nhwc else arr


def _in_range(target: Target, low: float, high: float) -> st.SearchStrategy:
    """Any tensor of ``target`` with values in [low, high] (integers: [low, high))."""
    if low == high:
        return st.just(np.full(target.shape, low).astype(target.dtype))
    if target.dtype.kind in "iu":
        return int_arrays(target.shape, int(np.ceil(low)), max(int(np.ceil(low)) + 1, int(np.ceil(high)))
                          ).map(lambda a: a.astype(target.dtype))
    if len(target.shape) == 4:
        shape, nhwc = _nchw(target)
        units = unit_images(shape).map(lambda u: _layout(u, nhwc))
    else:
        units = float_arrays(target.shape)
    return units.map(lambda u: (low + u * (high - low)).astype(target.dtype))


def source_arrays(source: Source | None, target: Target) -> st.SearchStrategy:
    """Arrays for one input within what its source declares (see the module docstring)."""
    if source is None:
        if target.dtype.kind in "iu":
            return _in_range(target, 0, INT_HIGH)
        if "mask" in target.name.lower() and len(target.shape) == 4:
            shape, nhwc = _nchw(target)
            return masks(shape).map(lambda m: _layout(m, nhwc).astype(target.dtype))
        return _in_range(target, 0.0, 1.0)
    if isinstance(source, GeneratorSource):
        if source.kind in ("constant", "zeros"):
            return st.just(source.load(target, 0))
        return _in_range(target, *source.bounds(target.dtype))
    if isinstance(source, MaskSource):
        shape, nhwc = _nchw(target, source.layout)
        return masks(shape).map(lambda m: _layout(m, nhwc).astype(target.dtype))
    if isinstance(source, ImageSource):
        shape, nhwc = _nchw(target, source.layout)
        if len(target.shape) != 4:
            source.normalise(np.zeros((1, 1, 1)), target)  # raises the source's rank error
        one = (1,) + shape[1:]
        return unit_images(one).map(lambda u: source.normalise(np.rint(u[0].transpose(1, 2, 0) * 255.0), target))
    if isinstance(source, (ArraySource, ValueSource)):
        example = source.load(target, 0)
        finite = example[np.isfinite(example)] if example.dtype.kind == "f" else example
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        if target.dtype.kind in "iu" and high > low:
            high += 1
        return _in_range(target, low, high)
    raise TypeError(f"no strategy for source {type(source).__name__}")


def mnn_inputs(model, input_set: InputSet | str | None = None) -> st.SearchStrategy:
    """``{input name: array}`` for every input of ``model`` (a ``LoadedModel`` or a path to an ``.mnn``).

    ``input_set``: an ``InputSet`` or the name of one in the model's sidecar;
    its sources bound what is drawn.  Without one: floats in [0, 1], integers
    in [0, 8), and binary masks for 4-D float inputs whose name contains "mask".
    """
    from ..mnn.runner import LoadedModel

    if isinstance(model, (str, os.PathLike)):
        model = _load(Path(model), input_set)
    if isinstance(input_set, str):
        input_set = _named_set(model.path, input_set)
    if input_set is not None and input_set.error is not None:
        raise input_set.error
    if not isinstance(model, LoadedModel):
        raise TypeError(f"mnn_inputs needs a LoadedModel or a path to an .mnn file, got {type(model).__name__}")
    if input_set is not None:
        input_set.build(model, 0)  # the same validation as a parity run, with the same errors
    sources = input_set.sources if input_set is not None else {}
    return st.fixed_dictionaries({spec.name: source_arrays(sources.get(spec.name), target_of(model, spec))
                                  for spec in model.info.inputs})


def _load(path: Path, input_set):
    from ..mnn.runner import LoadedModel
    from .sidecar import find_sidecar

    sidecar = find_sidecar(path, Path.cwd())
    shapes = sidecar.shapes if sidecar is not None else {}
    return LoadedModel(path, shapes)


def _named_set(path: Path, name: str) -> InputSet:
    from .sidecar import find_sidecar

    sidecar = find_sidecar(path, Path.cwd())
    found = sidecar.input_set(name) if sidecar is not None else None
    if found is None:
        declared = [s.name for s in sidecar.input_sets] if sidecar is not None else []
        raise ValueError(f"{path}: no input set {name!r} (declared: {', '.join(declared) or 'none'}; "
                         f"input sets live in {path.name}.toml beside the model)")
    return found
