"""The per-layer error curve: each traced op's error along execution order, as inline SVG.

No JavaScript and no library: points, a polyline, the tolerance line and a
``<title>`` per point (the browser shows it on hover).
"""
from __future__ import annotations

import math
from html import escape
from typing import Any


def number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def fmt(value: Any, spec: str = ".4g") -> str:
    x = number(value)
    if x is None:
        return "-" if value is None else escape(str(value))
    if math.isnan(x) or math.isinf(x):
        return escape(str(x))
    return format(x, spec)


def layer_curve_svg(layers: list[dict[str, Any]], atol: float | None = None, first: int | None = None) -> str:
    """Each traced op's largest error relative to its reference's range, in execution order (log scale)."""
    points = []
    for layer in layers:
        outs = layer.get("outputs") or [{}]
        max_abs, scale = number(layer.get("max_abs")), number(outs[0].get("ref_scale")) or 1.0
        if max_abs is None:
            continue
        rel = max_abs / scale if scale else max_abs
        points.append((layer, rel))
    if not points:
        return ""
    finite = [math.log10(rel) for _, rel in points if math.isfinite(rel) and rel > 0]
    y_lo = min(-8, math.floor(min(finite))) if finite else -8
    y_hi = max(0, math.ceil(max(finite))) if finite else 0
    width, height, left, right, top, bottom = 720, 220, 52, 12, 14, 34
    plot_w, plot_h = width - left - right, height - top - bottom
    n = len(layers)

    def x(index: int) -> float:
        return left + (index + 0.5) * plot_w / max(n, 1)

    def y(rel: float) -> float:
        if not math.isfinite(rel):
            return top
        value = max(math.log10(rel), y_lo) if rel > 0 else y_lo
        return top + (y_hi - value) / (y_hi - y_lo) * plot_h

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" class="curve" role="img" '
             f'aria-label="per-layer error">',
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fafafa" stroke="#999"/>']
    for decade in range(y_lo, y_hi + 1, max(1, (y_hi - y_lo) // 5)):
        yy = y(10.0 ** decade)
        parts.append(f'<line x1="{left - 4}" y1="{yy:.1f}" x2="{left + plot_w}" y2="{yy:.1f}" stroke="#e0e0e0"/>'
                     f'<text x="{left - 6}" y="{yy + 4:.1f}" text-anchor="end">1e{decade}</text>')
    if atol:
        yy = y(atol)
        parts.append(f'<line x1="{left}" y1="{yy:.1f}" x2="{left + plot_w}" y2="{yy:.1f}" stroke="#d32f2f" '
                     f'stroke-dasharray="4 3"/><text x="{left + plot_w - 2}" y="{yy - 3:.1f}" text-anchor="end" '
                     f'fill="#d32f2f">atol</text>')
    path = " ".join(f"{x(layer['index']):.1f},{y(rel):.1f}" for layer, rel in points)
    parts.append(f'<polyline points="{path}" fill="none" stroke="#1e88e5" stroke-width="1.5"/>')
    for layer, rel in points:
        is_first = first is not None and layer["index"] == first
        colour = "#d32f2f" if layer.get("failed") else "#2e7d32"
        tip = (f"#{layer['index']} {layer['name']} ({layer['type']}): max|d| {fmt(layer.get('max_abs'))}, "
               f"relative {fmt(rel)}, cosine {fmt(layer.get('cosine'), '.6f')}"
               + (f", {', '.join(layer['health'])}" if layer.get("health") else ""))
        parts.append(f'<circle cx="{x(layer["index"]):.1f}" cy="{y(rel):.1f}" r="{5 if is_first else 3}" '
                     f'fill="{colour}" class="{"first" if is_first else "layer"}">'
                     f"<title>{escape(tip)}</title></circle>")
        if is_first:
            parts.append(f'<text x="{x(layer["index"]) + 7:.1f}" y="{y(rel) + 4:.1f}">{escape(layer["name"])} '
                         f'(first divergent)</text>')
    parts.append(f'<text x="{left + plot_w / 2:.0f}" y="{height - 6}" text-anchor="middle">op, in execution order '
                 f'({n} compared); y: max |target - reference| / max |reference|</text></svg>')
    return "".join(parts)
