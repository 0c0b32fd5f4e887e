"""Picture files per checked configuration (``--mnn-artifacts DIR``).

The engine hands an ``ArtifactWriter`` the arrays of each configuration while
they exist (``ParitySettings.output_sink``); the writer draws them at once and
keeps nothing but file names, which go into the result (``result.artifacts``)
and from there into the JSON report.

Layout, one folder per item, named after its node id::

    DIR/<model path>/<item name>/<output>.{reference,target,error,mask,histogram}.png
    DIR/<model path>/<item name>/layer-<op>-<i>.{...}.png   (first divergent layer / first health flip)
"""
from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np

from ..core.choices import ARTIFACT_MODES
from ..trace.capture import LayerArrays
from .pictures import write_pictures

if TYPE_CHECKING:  # pragma: no cover
    from ..engine.results import ParityResult

_UNSAFE = re.compile(r"[^A-Za-z0-9._\-\[\]@=+,]+")


def safe_name(part: str) -> str:
    """One path segment: no separators, no ``..``, nothing a shell or Windows chokes on."""
    cleaned = _UNSAFE.sub("_", part).strip()
    return "_" * len(cleaned) if cleaned in (".", "..") else (cleaned or "_")


def item_folder(nodeid: str) -> PurePosixPath:
    """``a/b.mnn::parity[CPU-low]`` -> ``a/b.mnn/parity[CPU-low]``: the node id as folders."""
    path, _, rest = nodeid.partition("::")
    parts = [safe_name(p) for p in path.split("/") if p] + [safe_name(p) for p in rest.split("::") if p]
    return PurePosixPath(*parts)


# (role, layer, target tensors, reference tensors) for each layer to draw.
class ArtifactWriter:
    """Writes pictures of failing (or, with ``when="always"``, all) outputs under ``root``.

    ``label`` names the next result's folder (the pytest layer sets it to the
    item's node id); without it the folder is ``<model>::parity[<config>]``.
    """

    def __init__(self, root: os.PathLike | str, when: str = "on-failure"):
        if when not in ARTIFACT_MODES:
            raise ValueError(f"artifacts mode must be one of {', '.join(ARTIFACT_MODES)}, got {when!r}")
        self.root = Path(root)
        self.when = when
        self.label: str | None = None

    def __call__(self, result: "ParityResult", targets: Mapping[str, np.ndarray],
                 references: Mapping[str, np.ndarray], layer_arrays: Callable[[], LayerArrays]) -> None:
        if self.when == "on-failure" and result.passed:
            return
        label = self.label or f"{result.model}::parity[{result.config.id}]"
        rel = item_folder(label)
        folder = self.root / rel
        try:
            self._write(result, targets, references, layer_arrays, rel, folder)
        except OSError as exc:
            # A full disk or a read-only folder costs the pictures, never the verdict.
            result.artifacts = {"dir": rel.as_posix(), "folder": _shown(folder), "outputs": {}, "layers": {},
                                "error": f"pictures not written: {exc}"}

    def _write(self, result: "ParityResult", targets: Mapping[str, np.ndarray], references: Mapping[str, np.ndarray],
               layer_arrays: Callable[[], LayerArrays], rel: PurePosixPath, folder: Path) -> None:
        scale_tol = result.tolerance.atol if result.tolerance is not None else None
        outputs: dict[str, Any] = {}
        for verdict in result.verdict.outputs if result.verdict is not None else []:
            if self.when == "on-failure" and verdict.passed:
                continue
            if verdict.name not in targets or verdict.name not in references:
                continue  # a missing output has nothing to draw; its verdict says so
            ref_scale = verdict.metrics.ref_scale if verdict.metrics is not None else None
            info = write_pictures(folder, safe_name(verdict.name), targets[verdict.name], references[verdict.name],
                                  None if scale_tol is None or ref_scale is None else scale_tol * ref_scale)
            outputs[verdict.name] = _relative(info, rel)
        layers: dict[str, Any] = {}
        for role, layer, layer_targets, layer_refs in layer_arrays():
            for i, (t, r) in enumerate(zip(layer_targets, layer_refs)):
                key = f"{layer.name}#{layer.occurrence}:{i}"
                if key in layers:
                    continue
                scale = _finite_scale(r)
                info = write_pictures(folder, safe_name(f"layer-{layer.name}-{layer.occurrence}-{i}"), t, r,
                                      None if scale_tol is None else scale_tol * scale)
                info.update(role=role, layer=layer.name, type=layer.type, index=layer.index, output=i)
                layers[key] = _relative(info, rel)
        result.artifacts = {"dir": rel.as_posix(), "folder": _shown(folder), "outputs": outputs, "layers": layers}


def _shown(folder: Path) -> str:
    """The folder as a failure message shows it: relative to the working directory when below it."""
    try:
        return folder.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(folder)


def _relative(info: dict[str, Any], rel: PurePosixPath) -> dict[str, Any]:
    """File names become paths relative to the artifacts root, as the JSON report links them."""
    for kind in ("reference", "target", "error", "mask", "histogram"):
        if kind in info:
            info[kind] = (rel / info[kind]).as_posix()
    return info


def _finite_scale(reference: np.ndarray) -> float:
    finite = np.abs(np.asarray(reference, dtype=np.float64))
    finite = finite[np.isfinite(finite)]
    top = float(finite.max()) if finite.size else 0.0
    return top if top > 0 else 1.0


