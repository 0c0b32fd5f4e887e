"""Pictures of one output: reference, target, absolute error, zero/NaN mask and an error histogram.

numpy and Pillow only (no MNN, no pytest), so the pictures can be tested by
their pixels.  Which outputs are drawn as images (``image_layout``):

* rank 4 is read as NCHW with H >= 2 and W >= 2, except that a last axis of
  1, 3 or 4 entries after two axes of at least 8 is read as NHWC (a
  TensorFlow-layout image);
* rank 3 ``[C, H, W]`` and rank 2 ``[H, W]`` when H >= 8 and W >= 8 (smaller
  ones are more likely vectors than pictures);
* 1 channel is drawn grey, 3 as RGB; any other channel count, 4 included, as
  one grey tile per channel (at most ``MAX_CHANNEL_TILES``, ``CHANNELS_PER_ROW``
  to a row): four channels are more often features than RGBA, and an alpha
  channel would hide the very pixels that went wrong.  Each batch item starts
  a row of its own; at most ``MAX_BATCH_ITEMS`` are drawn.

Values map to brightness through the reference's finite range (per channel
for channel tiles), so target and reference are drawn on the same scale and a
target that collapsed to 0 is drawn as 0 is in the reference.  In the error
heatmap and the mask an image's channels are reduced per pixel (the largest
error; a pixel is marked when any channel is), channel tiles stay per channel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image, ImageFont

MAX_CHANNEL_TILES = 64
MAX_BATCH_ITEMS = 8
CHANNELS_PER_ROW = 8
IMAGES_PER_ROW = 4
GAP = 2
TARGET_TILE_SIZE = 64  # small tensors are scaled up (nearest) to about this many pixels

# Mask colours (documented in docs/reports.md).
NEW_ZERO = (255, 0, 0)
NON_FINITE = (255, 0, 255)
BOTH_ZERO = (70, 70, 70)
OTHER = (0, 0, 0)
GAP_COLOUR = (128, 128, 128)

# Anchors of matplotlib's "inferno" map: dark for no error, bright for the largest.
_INFERNO = np.array([(0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66), (245, 125, 21),
                     (250, 193, 39), (252, 255, 164)], dtype=np.float64)
_LUT = np.stack([np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_INFERNO)), _INFERNO[:, c])
                 for c in range(3)], axis=1).round().astype(np.uint8)


@dataclass(frozen=True)
class ImageLayout:
    """How a tensor is read as pictures."""

    shape: tuple[int, ...]
    batch: int
    channels: int
    height: int
    width: int
    channels_last: bool = False

    @property
    def mode(self) -> str:
        return {1: "grey", 3: "rgb"}.get(self.channels, "channels")

    @property
    def shown_channels(self) -> int:
        return min(self.channels, MAX_CHANNEL_TILES) if self.mode == "channels" else self.channels

    @property
    def shown_batch(self) -> int:
        return min(self.batch, MAX_BATCH_ITEMS)

    @property
    def tiles(self) -> int:
        return self.shown_batch * (self.shown_channels if self.mode == "channels" else 1)

    @property
    def scale(self) -> int:
        return max(1, min(8, TARGET_TILE_SIZE // max(self.height, self.width)))

    def grid(self) -> tuple[int, int]:
        """Columns and rows of tiles."""
        if self.mode == "channels":
            per_row = min(self.shown_channels, CHANNELS_PER_ROW)
            return per_row, self.shown_batch * math.ceil(self.shown_channels / per_row)
        per_row = min(self.shown_batch, IMAGES_PER_ROW)
        return per_row, math.ceil(self.shown_batch / per_row)

    def tile_box(self, index: int) -> tuple[int, int, int, int]:
        """Pixel box (left, top, right, bottom) of tile ``index`` in a picture of this layout.

        Tile ``index`` is channel ``index % shown_channels`` of batch item
        ``index // shown_channels`` in channel mode, batch item ``index`` otherwise.
        """
        cols, _ = self.grid()
        if self.mode == "channels":
            per_row = cols
            item, channel = divmod(index, self.shown_channels)
            rows_per_item = math.ceil(self.shown_channels / per_row)
            row, col = item * rows_per_item + channel // per_row, channel % per_row
        else:
            row, col = divmod(index, cols)
        tw, th = self.width * self.scale, self.height * self.scale
        left, top = col * (tw + GAP), row * (th + GAP)
        return left, top, left + tw, top + th

    def describe(self) -> str:
        dims = "x".join(map(str, self.shape))
        order = "NHWC" if self.channels_last else "NCHW"
        kind = {"grey": "grey", "rgb": "RGB"}.get(self.mode, f"{self.channels} channel tiles")
        more = (f", first {MAX_CHANNEL_TILES} channels shown" if self.mode == "channels"
                and self.channels > MAX_CHANNEL_TILES else "")
        more += f", first {MAX_BATCH_ITEMS} batch items shown" if self.batch > MAX_BATCH_ITEMS else ""
        return f"{dims} read as {order}, {kind}{more}"


def image_layout(shape) -> ImageLayout | None:
    """The layout of an image-like tensor of this shape, ``None`` when it is not image-like."""
    shape = tuple(int(d) for d in shape)
    if len(shape) == 4:
        n, a, b, c = shape
        if c in (1, 3, 4) and a >= 8 and b >= 8 and a not in (1, 3, 4):
            return ImageLayout(shape, n, c, a, b, channels_last=True)
        if b >= 2 and c >= 2 and n >= 1 and a >= 1:
            return ImageLayout(shape, n, a, b, c)
        return None
    if len(shape) == 3 and shape[1] >= 8 and shape[2] >= 8 and shape[0] >= 1:
        return ImageLayout(shape, 1, shape[0], shape[1], shape[2])
    if len(shape) == 2 and shape[0] >= 8 and shape[1] >= 8:
        return ImageLayout(shape, 1, 1, shape[0], shape[1])
    return None


def _nchw(array: np.ndarray, layout: ImageLayout) -> np.ndarray:
    a = np.asarray(array, dtype=np.float64).reshape(layout.shape)
    if len(layout.shape) == 4:
        a = a.transpose(0, 3, 1, 2) if layout.channels_last else a
    else:
        a = a.reshape(layout.batch, layout.channels, layout.height, layout.width)
    return a[:layout.shown_batch, :layout.shown_channels]


def _tile_planes(a: np.ndarray, layout: ImageLayout) -> list[np.ndarray]:
    """[H, W, K] planes, one per tile: K = channels for images, 1 per channel tile."""
    if layout.mode == "channels":
        return [a[n, c][..., None] for n in range(a.shape[0]) for c in range(a.shape[1])]
    return [a[n].transpose(1, 2, 0) for n in range(a.shape[0])]


def _assemble(tiles: list[np.ndarray], layout: ImageLayout) -> Image.Image:
    """Paste [H, W, 3] uint8 tiles, scaled up, into the layout's grid."""
    from PIL import Image
    cols, rows = layout.grid()
    s = layout.scale
    tw, th = layout.width * s, layout.height * s
    canvas = Image.new("RGB", (cols * tw + (cols - 1) * GAP, rows * th + (rows - 1) * GAP), GAP_COLOUR)
    for i, tile in enumerate(tiles):
        big = np.repeat(np.repeat(tile, s, axis=0), s, axis=1)
        left, top, _, _ = layout.tile_box(i)
        canvas.paste(Image.fromarray(np.ascontiguousarray(big), "RGB"), (left, top))
    return canvas


def _finite_range(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = float(finite.min()), float(finite.max())
    return (lo, hi) if hi > lo else (lo - 0.5, lo + 0.5)


def value_ranges(reference: np.ndarray, layout: ImageLayout) -> list[tuple[float, float]]:
    """Brightness range per tile, from the reference: one for a whole image, one per channel for
    channel tiles (feature channels differ in scale; a shared range would flatten the small ones)."""
    a = _nchw(reference, layout)
    if layout.mode != "channels":
        return [_finite_range(a)] * layout.tiles
    per_channel = [_finite_range(a[:, c]) for c in range(a.shape[1])]
    return per_channel * a.shape[0]


def picture(array: np.ndarray, layout: ImageLayout, ranges: list[tuple[float, float]]) -> Image.Image:
    """The tensor as an image, brightness from each tile's range; NaN/Inf pixels in magenta."""
    tiles = []
    for plane, (lo, hi) in zip(_tile_planes(_nchw(array, layout), layout), ranges):
        bad = ~np.isfinite(plane).all(axis=2)
        level = np.clip((np.nan_to_num(plane, nan=lo, posinf=hi, neginf=lo) - lo) / (hi - lo), 0.0, 1.0)
        rgb = np.repeat(level, 3, axis=2) if plane.shape[2] == 1 else level
        tile = (rgb * 255).round().astype(np.uint8)
        tile[bad] = NON_FINITE
        tiles.append(tile)
    return _assemble(tiles, layout)


def _reduce(plane: np.ndarray, how) -> np.ndarray:
    return how(plane, axis=2)


def abs_error(target: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """|target - reference| (0 where both hold the same NaN/Inf) and where the error is not finite."""
    t, r = np.asarray(target, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.abs(t - r)
    same = (t == r) | (np.isnan(t) & np.isnan(r))
    err[same] = 0.0
    return err, ~np.isfinite(err)


def error_heatmap(target: np.ndarray, reference: np.ndarray, layout: ImageLayout) -> tuple[Image.Image, float]:
    """Absolute error in the inferno map with a labelled colour scale; NaN/Inf in magenta.

    Returns the picture and the error that the brightest colour stands for.
    """
    err, bad = abs_error(target, reference)
    top = float(err[~bad].max()) if (~bad).any() else 0.0
    tiles = []
    for e, b in zip(_tile_planes(_nchw(err, layout), layout), _tile_planes(_nchw(bad, layout), layout)):
        e = _reduce(np.where(b, 0.0, e), np.max)
        scaled = np.zeros(e.shape) if top == 0 else np.clip((e / top * 255).round(), 0, 255)
        index = scaled.astype(np.intp)
        tile = _LUT[index]
        tile[_reduce(b, np.any)] = NON_FINITE
        tiles.append(tile)
    grid = _assemble(tiles, layout)
    return _with_colour_scale(grid, top, all_bad=bool(bad.all())), top


def _font() -> ImageFont.ImageFont:
    from PIL import ImageFont
    return ImageFont.load_default()


def _with_colour_scale(grid: Image.Image, top: float, all_bad: bool = False) -> Image.Image:
    from PIL import Image, ImageDraw
    width = max(grid.width, 200)
    out = Image.new("RGB", (width, grid.height + 34), (255, 255, 255))
    out.paste(grid, (0, 0))
    bar = np.repeat(_LUT[np.linspace(0, 255, width).round().astype(np.intp)][None], 10, axis=0)
    out.paste(Image.fromarray(np.ascontiguousarray(bar), "RGB"), (0, grid.height + 4))
    draw = ImageDraw.Draw(out)
    font = _font()
    draw.text((0, grid.height + 16), "0", fill=(0, 0, 0), font=font)
    label = f"{top:.3g}" if top > 0 else ("every error is NaN/Inf" if all_bad else "0 (identical)")
    draw.text((width - draw.textlength(label, font=font), grid.height + 16), label, fill=(0, 0, 0), font=font)
    return out


def zero_nan_mask(target: np.ndarray, reference: np.ndarray, layout: ImageLayout) -> Image.Image:
    """Red: exactly 0 where the reference is not; magenta: NaN/Inf where the reference is finite;
    grey: 0 in both; black: anything else."""
    t, r = np.asarray(target, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    new_zero = (t == 0) & (r != 0) & np.isfinite(r)
    non_finite = ~np.isfinite(t) & np.isfinite(r)
    both_zero = (t == 0) & (r == 0)
    planes = [_tile_planes(_nchw(m, layout), layout) for m in (new_zero, non_finite, both_zero)]
    tiles = []
    for nz, nf, bz in zip(*planes):
        tile = np.zeros(nz.shape[:2] + (3,), dtype=np.uint8)
        tile[:] = OTHER
        tile[_reduce(bz, np.all)] = BOTH_ZERO
        tile[_reduce(nz, np.any)] = NEW_ZERO
        tile[_reduce(nf, np.any)] = NON_FINITE
        tiles.append(tile)
    return _assemble(tiles, layout)


def error_histogram(target: np.ndarray, reference: np.ndarray, tolerance_abs: float | None = None,
                    size: tuple[int, int] = (480, 200)) -> Image.Image:
    """Counts of |target - reference| per quarter decade, exact and NaN/Inf errors counted apart.

    A red line marks ``tolerance_abs`` (atol x reference scale), the error
    every element is allowed before rtol adds to it.
    """
    from PIL import Image, ImageDraw
    err, bad = abs_error(target, reference)
    err, bad = err.ravel(), bad.ravel()
    exact = int(np.count_nonzero(err == 0))
    finite = err[(~bad) & (err > 0)]
    w, h = size
    left, bottom, top_margin = 40, 34, 22
    out = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(out)
    font = _font()
    draw.text((4, 4), f"|target - reference| of {err.size} elements: {exact} exact, {int(bad.sum())} NaN/Inf",
              fill=(0, 0, 0), font=font)
    draw.line([(left, h - bottom), (w - 8, h - bottom)], fill=(0, 0, 0))
    if finite.size == 0:
        draw.text((left + 8, h // 2), "no finite non-zero errors", fill=(90, 90, 90), font=font)
        return out
    logs = np.log10(finite)
    lo = max(math.floor(float(logs.min())), -12)
    hi = max(math.ceil(float(logs.max())), lo + 1)
    bins = (hi - lo) * 4
    counts, edges = np.histogram(np.clip(logs, lo, hi), bins=bins, range=(lo, hi))
    plot_w, plot_h = w - 8 - left, h - bottom - top_margin
    bar_w = plot_w / bins
    peak = max(int(counts.max()), 1)
    for i, count in enumerate(counts):
        if count:
            bar_h = max(1, round(count / peak * plot_h))
            x0 = left + i * bar_w
            draw.rectangle([x0 + 1, h - bottom - bar_h, x0 + bar_w - 1, h - bottom], fill=(70, 110, 170))
    for decade in range(lo, hi + 1):
        x = left + (decade - lo) * 4 * bar_w
        draw.line([(x, h - bottom), (x, h - bottom + 4)], fill=(0, 0, 0))
        if (decade - lo) % max(1, (hi - lo) // 6) == 0:
            label = f"1e{decade}"
            draw.text((min(x - 10, w - 2 - draw.textlength(label, font=font)), h - bottom + 6), label,
                      fill=(0, 0, 0), font=font)
    # The count axis: the peak count level with the tallest bar's top, 0 at the baseline (a count written at the
    # baseline reads as the axis minimum).
    draw.line([(left, top_margin), (left, h - bottom)], fill=(0, 0, 0))
    for y, label in ((top_margin, str(peak)), (h - bottom, "0")):
        draw.line([(left - 4, y), (left, y)], fill=(0, 0, 0))
        box = draw.textbbox((0, 0), label, font=font)
        draw.text((left - 6 - (box[2] - box[0]) - box[0], y - (box[1] + box[3]) / 2), label, fill=(0, 0, 0), font=font)
    if tolerance_abs is not None and tolerance_abs > 0 and lo <= math.log10(tolerance_abs) <= hi:
        x = left + (math.log10(tolerance_abs) - lo) * 4 * bar_w
        for y in range(top_margin, h - bottom, 6):
            draw.line([(x, y), (x, y + 3)], fill=(220, 0, 0))
        # Left of the line where the right edge would cut the word off.
        at = x + 3 if x + 3 + draw.textlength("atol", font=font) <= w else x - 3 - draw.textlength("atol", font=font)
        draw.text((at, top_margin), "atol", fill=(220, 0, 0), font=font)
    draw.text((left, h - 14), "log10 |error|", fill=(0, 0, 0), font=font)
    return out


# zlib level 1: most of the size saving at a fraction of the default level's encoding time.
PNG_LEVEL = 1


def write_pictures(folder: Path, stem: str, target: np.ndarray, reference: np.ndarray,
                   tolerance_abs: float | None = None) -> dict:
    """Write every picture of one tensor pair into ``folder``; returns what was written (file names).

    Nothing is kept in memory: each picture is saved as soon as it is drawn.
    """
    folder.mkdir(parents=True, exist_ok=True)
    target, reference = np.asarray(target), np.asarray(reference)
    info: dict = {"shape": list(target.shape), "image_like": False}
    if target.shape != reference.shape:
        info["note"] = f"not drawn: shape {target.shape} differs from the reference's {reference.shape}"
        return info
    if target.size == 0:
        info["note"] = "not drawn: empty tensor"
        return info
    layout = image_layout(target.shape)
    if layout is not None:
        ranges = value_ranges(reference, layout)
        info.update(image_like=True, layout=layout.describe())
        for kind, image in (("reference", picture(reference, layout, ranges)),
                            ("target", picture(target, layout, ranges))):
            image.save(folder / f"{stem}.{kind}.png", compress_level=PNG_LEVEL)
            info[kind] = f"{stem}.{kind}.png"
        heat, top = error_heatmap(target, reference, layout)
        heat.save(folder / f"{stem}.error.png", compress_level=PNG_LEVEL)
        info.update(error=f"{stem}.error.png", error_max=top)
        zero_nan_mask(target, reference, layout).save(folder / f"{stem}.mask.png", compress_level=PNG_LEVEL)
        info["mask"] = f"{stem}.mask.png"
    error_histogram(target, reference, tolerance_abs).save(folder / f"{stem}.histogram.png",
                                                          compress_level=PNG_LEVEL)
    info["histogram"] = f"{stem}.histogram.png"
    return info
