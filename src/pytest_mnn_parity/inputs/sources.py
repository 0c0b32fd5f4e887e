"""Input sources: where one model input's array comes from (picture, mask, array, generator).

Each source turns its declaration into the array a model input needs
(``Target``: name, shape, dtype, layout), or raises a ``SidecarError`` naming
the file, the key and the fix.  ``input_sets`` groups them into named sets and
parses them from TOML.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..mnn.model import ModelError


class SidecarError(ModelError):
    """A problem in a sidecar (or its pyproject table): the file, the key and the fix."""


@dataclass(frozen=True)
class Where:
    """Where a value was declared, for error messages: the file and the TOML key."""

    file: Path
    table: str  # e.g. 'input_sets.photo1' or 'tool.mnn-parity.models."lama.mnn".input_sets.photo1'
    key: str = ""

    def at(self, key: str) -> "Where":
        return Where(self.file, self.table, f"{self.key}.{key}" if self.key else key)

    def sub(self, table: str) -> "Where":
        return Where(self.file, f"{self.table}.{table}" if self.table else table)

    def error(self, reason: str, fix: str = "") -> SidecarError:
        return SidecarError(self.file, f"[{self.table}] {self.key}: {reason}" if self.key else
                            f"[{self.table}]: {reason}", fix)


@dataclass(frozen=True)
class Target:
    """What a source must produce: the model input's name, shape, dtype and layout."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    layout: str  # NCHW or NHWC

    @property
    def image_dims(self) -> tuple[int, int, int, int]:
        """(N, C, H, W) of a 4-D input in its layout."""
        if self.layout == "NHWC":
            n, h, w, c = self.shape
        else:
            n, c, h, w = self.shape
        return n, c, h, w


# -- sources ------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    where: Where

    def load(self, target: Target, seed: int) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self, target: Target | None = None) -> str:  # pragma: no cover - interface
        raise NotImplementedError

    def check_files(self) -> None:
        """Cheap checks that need no model (the file exists and can be read)."""


@dataclass(frozen=True)
class ImageSource(Source):
    path: Path = Path()
    color: str = "RGB"
    resize: bool = True
    resample: str = "bilinear"
    scale: float | None = None  # None: 1/255 for float inputs, 1 for integer inputs
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str | None = None
    dtype: str | None = None

    def check_files(self) -> None:
        _open_image(self.path, self.where, verify=True)

    def pixels(self, target: Target) -> np.ndarray:
        """The picture as float pixels (H, W, C) in 0..255, resized to the input, in ``color`` order."""
        layout = self.layout or target.layout
        _, c, h, w = _image_dims(target, layout, self.where)
        want = 1 if self.color == "GRAY" else 3
        if c != want:
            fix = 'color = "GRAY"' if c == 1 else 'color = "RGB" (or "BGR")'
            raise self.where.error(f"color = {self.color!r} gives {want} channel(s) but input {target.name!r} has "
                                   f"{c} ({_dims(target.shape)} {layout})",
                                   f"use {fix}" if c in (1, 3) else "an image source needs 1 or 3 channels; "
                                                                   "use an array source")
        with _open_image(self.path, self.where) as img:
            img = img.convert("L" if self.color == "GRAY" else "RGB")
            img = _fit(img, (w, h), self.resize, self.resample, self.where, target)
            arr = np.asarray(img, dtype=np.float64)
        arr = arr[..., None] if arr.ndim == 2 else arr
        return arr[..., ::-1] if self.color == "BGR" else arr

    def normalise(self, pixels: np.ndarray, target: Target) -> np.ndarray:
        """(H, W, C) pixels in 0..255 -> the model's array: scale, mean/std, layout, batch, dtype."""
        layout = self.layout or target.layout
        n, c, _, _ = _image_dims(target, layout, self.where)
        dtype = _dtype(self.dtype, target, self.where)
        scale = self.scale if self.scale is not None else (1.0 / 255.0 if dtype.kind == "f" else 1.0)
        mean = _per_channel(self.mean, c, self.where.at("mean"))
        std = _per_channel(self.std, c, self.where.at("std"))
        arr = (pixels * scale - mean) / std
        arr = arr[None] if layout == "NHWC" else arr.transpose(2, 0, 1)[None]
        arr = np.repeat(arr, n, axis=0)
        return _cast(arr, dtype, self.where, target)

    def load(self, target: Target, seed: int) -> np.ndarray:
        return _fits_model(self.normalise(self.pixels(target), target), target, self.where,
                           "check layout (NCHW/NHWC) against the model's input")

    def describe(self, target: Target | None = None) -> str:
        scale = "/255" if self.scale is None else f"x{self.scale:g}"
        extra = "" if self.mean == (0.0,) and self.std == (1.0,) else f", mean {list(self.mean)}, std {list(self.std)}"
        mode = _picture_mode(self.path)
        color = (f"{mode} picture as {self.color}" if mode and mode != ("L" if self.color == "GRAY" else "RGB")
                 else self.color)
        return (f"{self.path.name} ({_fitted(self.path, target, self.layout, self.resample)}{color}, {scale}{extra}"
                f"{_placed(target, self.layout)})")


@dataclass(frozen=True)
class MaskSource(Source):
    path: Path = Path()
    threshold: float = 0.5
    invert: bool = False
    resize: bool = True
    resample: str = "nearest"
    layout: str | None = None
    dtype: str | None = None

    def check_files(self) -> None:
        _open_image(self.path, self.where, verify=True)

    def load(self, target: Target, seed: int) -> np.ndarray:
        layout = self.layout or target.layout
        n, c, h, w = _image_dims(target, layout, self.where)
        with _open_image(self.path, self.where) as img:
            gray = np.asarray(_fit(img.convert("L"), (w, h), self.resize, self.resample, self.where, target),
                              dtype=np.float64) / 255.0
        masked = (gray < self.threshold) if self.invert else (gray >= self.threshold)
        plane = masked.astype(np.float64)
        arr = np.broadcast_to(plane[None, :, :, None] if layout == "NHWC" else plane[None, None],
                              (n, h, w, c) if layout == "NHWC" else (n, c, h, w))
        arr = _cast(np.array(arr), _dtype(self.dtype, target, self.where), self.where, target)
        return _fits_model(arr, target, self.where, "check layout (NCHW/NHWC) against the model's input")

    def describe(self, target: Target | None = None) -> str:
        fitted = _fitted(self.path, target, self.layout, self.resample)
        return (f"{self.path.name} ({fitted}mask, >= {self.threshold:g}{', inverted' if self.invert else ''}"
                f"{_placed(target, self.layout)})")


@dataclass(frozen=True)
class ArraySource(Source):
    path: Path = Path()
    key: str | None = None

    def check_files(self) -> None:
        self._read(None)

    def _read(self, input_name: str | None) -> np.ndarray | None:
        if not self.path.is_file():
            raise self.where.error(f"no such file {self.path}", "paths are relative to the file that declares them")
        try:
            data = np.load(self.path, allow_pickle=False)
        except Exception as exc:  # noqa: BLE001 - numpy raises many types for bad files
            raise self.where.error(f"cannot read {self.path.name} as .npy/.npz ({exc})",
                                   "save it with numpy.save or numpy.savez") from None
        if isinstance(data, np.ndarray):
            return data
        with data:
            names = list(data.files)
            key = self.key or (input_name if input_name in names else (names[0] if len(names) == 1 else None))
            if key is None or key not in names:
                if input_name is None and self.key is None:
                    return None  # which member is chosen depends on the input's name
                raise self.where.error(f"{self.path.name} has no array {key or input_name!r} (it has {names})",
                                       f'add key = "NAME" naming one of {names}')
            return data[key]

    def load(self, target: Target, seed: int) -> np.ndarray:
        arr = self._read(target.name)
        if arr.ndim != len(target.shape):
            raise self.where.error(f"{self.path.name} has rank {arr.ndim} ({_dims(arr.shape)}) but input "
                                   f"{target.name!r} has rank {len(target.shape)} ({_dims(target.shape)})",
                                   "save the array with the model's input shape")
        return _fits_model(_cast(arr, target.dtype, self.where, target), target, self.where,
                           "save the array with the model's input shape (or set [shapes] for dynamic dimensions)")

    def describe(self, target: Target | None = None) -> str:
        name = self.path.name + (f"[{self.key}]" if self.key else "")
        stored = _stored_dtype(self.path) if target is not None and self.key is None else None
        return name + (f" ({stored} cast to {target.dtype})" if stored is not None and stored != target.dtype else "")


@dataclass(frozen=True)
class GeneratorSource(Source):
    kind: str = "uniform"
    low: float | None = None
    high: float | None = None
    mean: float = 0.0
    std: float = 1.0
    value: float = 0.0

    def bounds(self, dtype: np.dtype) -> tuple[float, float]:
        """The range the generator draws from (normal: mean +- 3 std), for searches."""
        if self.kind == "uniform":
            return (0.0 if self.low is None else self.low,
                    (1.0 if dtype.kind == "f" else 8.0) if self.high is None else self.high)
        if self.kind == "normal":
            return self.mean - 3 * self.std, self.mean + 3 * self.std
        value = self.value if self.kind == "constant" else 0.0
        return value, value

    def load(self, target: Target, seed: int) -> np.ndarray:
        # The same stream as the default generated inputs, so a plain
        # { generator = "uniform" } reproduces them.
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(target.name.encode("utf-8"))])
        low, high = self.bounds(target.dtype)
        if self.kind == "uniform":
            if target.dtype.kind in "iu":
                arr = rng.integers(int(low), int(high), size=target.shape)
            elif (low, high) == (0.0, 1.0):
                arr = rng.random(target.shape, dtype=np.float64)
            else:
                arr = rng.uniform(low, high, size=target.shape)
        elif self.kind == "normal":
            arr = rng.normal(self.mean, self.std, size=target.shape)
            if target.dtype.kind in "iu":
                arr = np.rint(arr)
        else:
            arr = np.full(target.shape, low)
        return arr.astype(target.dtype)

    def describe(self, target: Target | None = None) -> str:
        args = {"uniform": lambda: f"[{self.low if self.low is not None else 0:g}, "
                                   f"{self.high if self.high is not None else 1:g})",
                "normal": lambda: f"(mean {self.mean:g}, std {self.std:g})",
                "constant": lambda: f"({self.value:g})", "zeros": lambda: ""}[self.kind]()
        return f"{self.kind}{args}"


@dataclass(frozen=True)
class ValueSource(Source):
    """An array in memory (a search's finding, or arrays handed to the engine directly)."""

    array: Any = None
    label: str = "array"

    def load(self, target: Target, seed: int) -> np.ndarray:
        return _fits_model(_cast(np.asarray(self.array), target.dtype, self.where, target), target, self.where,
                           "give an array of the model's input shape")

    def describe(self, target: Target | None = None) -> str:
        return self.label


# -- helpers --------------------------------------------------------------------------


def _dims(shape) -> str:
    return "x".join(str(d) for d in shape)


def _image_dims(target: Target, layout: str, where: Where) -> tuple[int, int, int, int]:
    if len(target.shape) != 4:
        raise where.error(f"an image or mask needs a 4-D input (NCHW or NHWC) but input {target.name!r} has rank "
                          f"{len(target.shape)} ({_dims(target.shape)})", "use an array or a generator source")
    return Target(target.name, target.shape, target.dtype, layout).image_dims


def _open_image(path: Path, where: Where, verify: bool = False):
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise where.error(f"no such image {path}", "paths are relative to the file that declares them")
    try:
        img = Image.open(path)
        if verify:
            with img:
                img.verify()  # reads the whole file, checks its integrity, decodes nothing
            return None
        img.load()
        return img
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise where.error(f"cannot read {path.name} as an image ({exc})",
                          "save it as PNG, JPEG, BMP or another format Pillow reads") from None


def _fitted(path: Path, target: Target | None, layout: str | None, resample: str) -> str:
    """What fitting the picture to the input does to it, said before anything else about it: "resized 50x40 ->
    32x32 (bilinear), " (a squashed picture must not pass unmentioned), "" when it fits or cannot be told."""
    if target is None or len(target.shape) != 4:
        return ""
    try:
        from PIL import Image

        with Image.open(path) as img:
            size = img.size
    except (OSError, ValueError):
        return ""
    _, _, h, w = _image_dims(target, layout or target.layout, Where(path, ""))
    if size == (w, h):
        return ""
    return f"resized {size[0]}x{size[1]} -> {w}x{h} ({resample}), "


def _picture_mode(path: Path) -> str:
    """The picture's Pillow mode (``RGBA``, ``L``, ``P``...), "" when it cannot be read here (the load says why)."""
    try:
        from PIL import Image

        with Image.open(path) as img:
            return img.mode
    except (OSError, ValueError):
        return ""


def _placed(target: Target | None, layout: str | None) -> str:
    """How the picture's pixels (height x width x channels) became the input: its layout, and a batch of copies."""
    if target is None or len(target.shape) != 4:
        return ""
    layout, n = layout or target.layout, target.shape[0]
    return f", as {layout}" + (f", the same picture {n} times in the batch" if n > 1 else "") + (
        f", {target.dtype}" if target.dtype.kind != "f" else "")


def _stored_dtype(path: Path) -> np.dtype | None:
    """The dtype an .npy file stores (read from its header alone); None for anything else."""
    if path.suffix != ".npy":
        return None
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False).dtype
    except (OSError, ValueError):
        return None


def _fit(img, size: tuple[int, int], resize: bool, resample: str, where: Where, target: Target):
    from PIL import Image

    if img.size == size:
        return img
    if not resize:
        raise where.error(f"image is {img.size[0]}x{img.size[1]} (WxH) but input {target.name!r} needs "
                          f"{size[0]}x{size[1]} ({_dims(target.shape)})",
                          "resize the file, or remove resize = false to let it be resized")
    return img.resize(size, getattr(getattr(Image, "Resampling", Image), resample.upper()))  # Pillow < 9.1: no enum


def _per_channel(values: tuple[float, ...], channels: int, where: Where) -> np.ndarray:
    if len(values) not in (1, channels):
        raise where.error(f"{len(values)} values for {channels} channel(s)", f"give 1 or {channels} value(s)")
    return np.asarray(values, dtype=np.float64)


def _dtype(name: str | None, target: Target, where: Where) -> np.dtype:
    if name is None:
        return target.dtype
    if np.dtype(name) != target.dtype:
        raise where.at("dtype").error(f"declared {name} but input {target.name!r} is {target.dtype}",
                                      f'remove dtype or set dtype = "{target.dtype}"')
    return np.dtype(name)


def _cast(arr: np.ndarray, dtype: np.dtype, where: Where, target: Target) -> np.ndarray:
    if dtype.kind in "iu" and arr.dtype.kind == "f" and not np.array_equal(arr, np.rint(arr)):
        raise where.error(f"input {target.name!r} is {dtype} but the values are not whole numbers",
                          "give integer values (e.g. scale = 1 for pixel values)")
    return np.ascontiguousarray(arr).astype(dtype)


def _fits_model(arr: np.ndarray, target: Target, where: Where, fix: str) -> np.ndarray:
    if tuple(arr.shape) != tuple(target.shape):
        raise where.error(f"gives shape {_dims(arr.shape)} but input {target.name!r} of the model is "
                          f"{_dims(target.shape)}", fix)
    return arr
