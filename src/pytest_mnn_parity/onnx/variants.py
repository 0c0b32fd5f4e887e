"""Conversion variants of an ONNX model, and a content-addressed cache of their ``.mnn`` builds.

A variant is a named set of MNNConvert flags.  The cache key is a hash of the
ONNX bytes (and any external-data files it references), the flags and the MNN
version, so a changed model, flag or MNN release converts again and nothing
else does.  Works without pytest: give it any folder.
"""
from __future__ import annotations

import hashlib
import os
import shlex
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from ..mnn.backends import did_you_mean
from ..mnn.library import mnn_version
from .convert import ConversionError, convert_onnx


@dataclass(frozen=True)
class Variant:
    name: str
    flags: tuple[str, ...]  # its tolerance tier: tolerances.VARIANT_TIERS


VARIANTS: dict[str, Variant] = {
    "fp32": Variant("fp32", ()),
    "fp16": Variant("fp16", ("--fp16",)),
    # MNN's weight-only quantisation (tools/converter/source/common/cli.cpp):
    # conv/matmul weights as 8-bit integers, symmetric, one scale per channel.
    "int8": Variant("int8", ("--weightQuantBits", "8")),
}
DEFAULT_VARIANTS = ("fp32", "fp16")
# Flags the plugin sets itself; extra flags must not fight them.
_OWNED_FLAGS = {"-f", "--framework", "--modelFile", "--MNNModel", "--fp16", "--weightQuantBits", "--bizCode",
                "--saveExternalData", "--JsonFile", "--testdir", "--info", "--OP", "-h", "--help", "-v", "--version"}


def parse_variants(items: Iterable[str]) -> list[str]:
    """``["fp32,fp16", "int8"]`` -> ``["fp32", "fp16", "int8"]``; ValueError names the bad one."""
    names: list[str] = []
    for item in items:
        for part in str(item).split(","):
            name = part.strip().lower()
            if not name:
                continue
            if name not in VARIANTS:
                raise ValueError(f"unknown conversion variant {part.strip()!r}{did_you_mean(name, VARIANTS)}; known: "
                                 f"{', '.join(VARIANTS)}")
            if name not in names:
                names.append(name)
    if not names:
        raise ValueError(f"no conversion variant given; known: {', '.join(VARIANTS)}")
    return names


def parse_converter_flags(text: str | Sequence[str]) -> tuple[str, ...]:
    """Extra MNNConvert flags from the ini key; ValueError for flags the variants own."""
    parts = shlex.split(text) if isinstance(text, str) else [str(p) for p in text]
    for part in parts:
        if part.split("=", 1)[0] in _OWNED_FLAGS:
            raise ValueError(f"{part!r} is set by pytest-mnn-parity itself (model paths, variants, output): "
                             "remove it; choose variants with --mnn-convert")
    return tuple(parts)


def is_onnx(path: os.PathLike | str) -> bool:
    # Asked for every check: a path without ".onnx" anywhere is answered without building a Path.
    if ".onnx" not in os.fspath(path).lower():
        return False
    return Path(path).suffix.lower() == ".onnx"


class ConversionCache:
    """``convert(source, variant)`` -> path of the cached ``.mnn``; failures raise ``ConversionError``.

    Several processes (pytest-xdist workers) may share the folder: each writes
    a private temporary file and renames it into place, so a reader sees a
    whole model or none.  Failures are remembered for this process only.
    """

    def __init__(self, folder: os.PathLike | str | None = None, extra_flags: Sequence[str] = ()):
        if folder is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="mnn-parity-convert-")
            folder = self._tmp.name
        self.folder = Path(folder)
        self.extra_flags = tuple(extra_flags)
        self._failures: dict[str, ConversionError] = {}
        self._keys: dict[tuple, str] = {}
        self._lock = threading.Lock()
        self.converted: list[Path] = []  # conversions this process really ran (not cache hits)

    def flags(self, variant: str) -> tuple[str, ...]:
        return VARIANTS[variant].flags + self.extra_flags

    def key(self, source: Path, flags: Sequence[str]) -> str:
        stat = source.stat()
        # Hashing a large model per test item would dominate the run: remember
        # the key while the file's size and mtime stay the same.
        memo = (str(source.resolve()), stat.st_size, stat.st_mtime_ns, tuple(flags))
        if memo not in self._keys:
            self._keys[memo] = self._hash(source, flags)
        return self._keys[memo]

    @staticmethod
    def _hash(source: Path, flags: Sequence[str]) -> str:
        h = hashlib.sha256()
        for path in [source, *external_data_files(source)]:
            h.update(path.name.encode() + b"\0")
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        h.update(("\0".join(flags) + "\0mnn " + mnn_version()).encode())
        return h.hexdigest()[:32]

    def path_for(self, source: os.PathLike | str, flags: Sequence[str], label: str) -> Path:
        source = Path(source)
        return self.folder / f"{source.stem}.{label}.{self.key(source, flags)}.mnn"

    def convert(self, source: os.PathLike | str, variant: str = "fp32") -> Path:
        return self.convert_with(source, self.flags(variant), variant)

    def convert_with(self, source: os.PathLike | str, flags: Sequence[str], label: str) -> Path:
        """Convert ``source`` with exactly ``flags`` (cached); ``label`` only names the file."""
        source = Path(source)
        if not source.is_file():
            raise ConversionError(source, "no such file", "")
        target = self.path_for(source, flags, label)
        with self._lock:
            if target.is_file():
                return target
            known = self._failures.get(target.name)
            if known is not None:
                raise known
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp.mnn", dir=self.folder)
            os.close(fd)
            tmp = Path(tmp_name)
            try:
                convert_onnx(source, tmp, extra_flags=flags, isolated=True)
            except ConversionError as exc:
                self._failures[target.name] = exc
                raise
            finally:
                if not tmp.is_file() or tmp.stat().st_size == 0:
                    tmp.unlink(missing_ok=True)
            weight = tmp.with_name(tmp.name + ".weight")
            if weight.is_file():
                os.replace(weight, target.with_name(target.name + ".weight"))
            os.replace(tmp, target)
            self.converted.append(target)
            return target


def external_data_files(source: Path) -> list[Path]:
    """Files next to an ONNX model that hold its external tensor data (part of its content)."""
    try:
        import onnx  # noqa: PLC0415
        from onnx.external_data_helper import uses_external_data  # noqa: PLC0415
    except ImportError:  # pragma: no cover - onnx is a dependency; hash the .onnx alone without it
        return []
    try:
        model = onnx.load(str(source), load_external_data=False)
    except Exception:  # noqa: BLE001 - not parseable: the converter will say so
        return []
    files: list[Path] = []
    for tensor in _all_tensors(model.graph):
        if uses_external_data(tensor):
            location = next((e.value for e in tensor.external_data if e.key == "location"), None)
            path = source.parent / location if location else None
            if path is not None and path.is_file() and path not in files:
                files.append(path)
    return files


def _all_tensors(graph):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for sub in attr.graphs:
                yield from _all_tensors(sub)
