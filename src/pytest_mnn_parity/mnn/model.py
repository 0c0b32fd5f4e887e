"""Open an ``.mnn`` file and describe its inputs and outputs.

Errors are ``ModelError``: they name the file, say what is wrong with it and
what to do, so one bad model is reported without stopping the others.
"""
from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .library import mnn
from .native_output import capture_native_output

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np


class ModelError(Exception):
    """A model that cannot be tested, with the file, the reason and the fix."""

    def __init__(self, path: os.PathLike | str, reason: str, fix: str = "", log: str = ""):
        self.path = Path(path)
        self.reason = reason
        self.fix = fix
        self.log = log
        text = f"{self.path}: {reason}"
        if fix:
            text += f"\n  fix: {fix}"
        if log.strip():
            text += "\n  MNN said: " + said(log)
        super().__init__(text)


def said(log: str, limit: int = 600) -> str:
    """A log's lines joined with " | ", whole lines only, up to about ``limit`` characters: a line cut mid-word
    reads as another error, so the rest is counted instead of cut."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    shown: list[str] = []
    for line in lines:
        if shown and sum(len(s) + 3 for s in shown) + len(line) > limit:
            break
        shown.append(line)
    rest = len(lines) - len(shown)
    return " | ".join(shown) + (f" ... ({rest} more line{'s' if rest > 1 else ''})" if rest else "")


@functools.lru_cache(maxsize=1024)
def _resolved(path: str) -> Path:
    return Path(path).resolve()


def model_key(path: os.PathLike | str) -> Path:
    """The one cache key of a model file: its resolved path, so ``a.mnn``, ``./a.mnn`` and a link to it are
    one model.  Resolving costs a syscall per path part, so it is memoised."""
    return _resolved(os.fspath(path))


MODEL_SUFFIXES = (".mnn", ".onnx")


def is_model_file(path: os.PathLike | str) -> bool:
    """A file the plugin tests as a model (what ``--mnn-model DIR`` finds in a folder)."""
    return Path(path).suffix in MODEL_SUFFIXES and Path(path).is_file()


def remembered(cache: dict, key: Any, build: Callable[[], Any], errors: tuple = (ModelError,)) -> Any:
    """``cache[key]``, built once; a build that raised one of ``errors`` is remembered and raised again.

    A model that cannot be loaded (converted, referenced...) fails every item
    that needs it with the same message, without trying again each time.
    """
    if key not in cache:
        try:
            cache[key] = build()
        except errors as exc:
            cache[key] = exc
    cached = cache[key]
    if isinstance(cached, BaseException):
        raise cached
    return cached


# numpy is imported by the first function here that needs it: the plugin reads this module's names (``ModelError``,
# ``is_model_file``) at every pytest start-up, most of which check no model (issue 22).
@functools.lru_cache(maxsize=1)
def _float32():
    import numpy as np  # noqa: PLC0415

    return np.dtype(np.float32)


def tensor_dtype(tensor: Any) -> np.dtype | None:
    """The numpy dtype of an MNN tensor, or None for types pymnn cannot express.

    ``getDataType()`` returns the very capsule objects exposed as
    ``MNN.Halide_Type_*`` (``None`` for int8/int16/bf16), and ``getNumpyData()``
    fails on tensors whose shape is still dynamic, so identity is the reliable test.
    Sessions store int64 as int32 and double as float32.
    """
    m = mnn()
    capsule = tensor.getDataType()
    if capsule is m.Halide_Type_Float:  # nearly every tensor; called per op in risk scans
        return _float32()
    import numpy as np  # noqa: PLC0415

    for constant, dtype in ((m.Halide_Type_Float, np.float32), (m.Halide_Type_Int, np.int32),
                            (m.Halide_Type_Uint8, np.uint8), (m.Halide_Type_Int64, np.int64),
                            (m.Halide_Type_Double, np.float64)):
        if capsule is constant:
            return np.dtype(dtype)
    return None


def halide_type(dtype: np.dtype) -> Any:
    """The pymnn type constant to build a host tensor of ``dtype``."""
    import numpy as np  # noqa: PLC0415

    m = mnn()
    dtype = np.dtype(dtype)
    table = {
        np.dtype(np.float32): m.Halide_Type_Float, np.dtype(np.float64): m.Halide_Type_Double,
        np.dtype(np.int32): m.Halide_Type_Int, np.dtype(np.int64): m.Halide_Type_Int64,
        np.dtype(np.uint8): m.Halide_Type_Uint8,
    }
    if dtype not in table:
        raise TypeError(f"pymnn cannot build host tensors of dtype {dtype}")
    return table[dtype]


LAYOUTS = {0: "NHWC", 1: "NCHW", 2: "NC4HW4"}


@dataclass(frozen=True)
class TensorSpec:
    """One model input as MNN declares it; ``-1`` marks a dynamic dimension."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    layout: str

    @property
    def is_dynamic(self) -> bool:
        return any(d < 0 for d in self.shape)

    def describe(self) -> str:
        dims = "x".join("?" if d < 0 else str(d) for d in self.shape)
        return f"{self.name}: {dims} {self.dtype} {self.layout}"


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    sha256: str
    inputs: tuple[TensorSpec, ...]
    output_names: tuple[str, ...]

    def input(self, name: str) -> TensorSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise KeyError(name)


def check_model_path(path: os.PathLike | str) -> Path:
    """Cheap checks that need no MNN: exists, is a readable non-empty file."""
    p = Path(path)
    if not p.exists():
        raise ModelError(p, "no such file", "check the path given to --mnn-model (relative paths start at the "
                                            "directory pytest was started in)")
    if p.is_dir():
        raise ModelError(p, "is a directory, not an MNN model file",
                         "name the .mnn file inside it, or pass a directory that contains .mnn files")
    if not os.access(p, os.R_OK):
        raise ModelError(p, "is not readable (permission denied)", "fix the file's permissions")
    if p.stat().st_size == 0:
        raise ModelError(p, "is empty (0 bytes)", "re-export or re-convert the model; the file was not written")
    return p


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def open_interpreter(path: os.PathLike | str) -> Any:
    """An ``MNN.Interpreter`` for ``path`` or a ``ModelError`` saying why not."""
    p = check_model_path(path)
    with capture_native_output() as out:
        try:
            interpreter = mnn().Interpreter(str(p))
        except Exception as exc:  # pymnn raises a bare Exception
            error: Exception | None = exc
        else:
            error = None
    if error is not None:
        raise ModelError(p, f"MNN cannot load it ({load_reason(out.text)})",
                         "the file is not a valid .mnn model: is it truncated or another format (ONNX, TFLite)? "
                         "Re-convert it with MNNConvert", out.text)
    return interpreter


def load_reason(log: str) -> str:
    """Why MNN refused to load a file, in a few words read from its log."""
    if "is empty" in log:
        return "empty file"
    if "Invalidate buffer" in log:
        return "flatbuffer verification failed: corrupt, truncated or not an MNN file"
    if "Can't open" in log:
        return "cannot open the file"
    return "invalid model file"


@dataclass(frozen=True)
class ModelTarget:
    """A model named on the command line, or the reason the name led to no model."""

    path: Path
    error: ModelError | None = None


def expand_model_args(args, base: Path) -> list[ModelTarget]:
    """Turn ``--mnn-model`` values (files, directories, globs) into model targets.

    A directory means every ``*.mnn`` and ``*.onnx`` below it (ONNX models are
    converted and tested per variant).  Anything that does not lead to
    a model becomes a target carrying its error, so it is reported instead of
    silently dropped.  Order is stable and duplicates are removed.
    """
    import glob as _glob

    targets: list[ModelTarget] = []
    seen: set[Path] = set()

    def add(path: Path, error: ModelError | None = None) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            targets.append(ModelTarget(path, error))

    for raw in args:
        text = str(raw)
        path = Path(text) if Path(text).is_absolute() else base / text
        if any(ch in text for ch in "*?["):
            matches = sorted(_glob.glob(str(path), recursive=True))
            if not matches:
                add(path, ModelError(text, "the pattern matches no file", "check the glob given to --mnn-model"))
            for match in matches:
                m = Path(match)
                add(m, _dir_error(m) if m.is_dir() else None)
            continue
        if path.is_dir() and path.suffix not in MODEL_SUFFIXES:
            found = sorted(p for suffix in MODEL_SUFFIXES for p in path.rglob(f"*{suffix}"))
            if not found:
                add(path, ModelError(path, "the directory contains no .mnn or .onnx file",
                                     "point --mnn-model at a model file or a directory holding some"))
            for m in found:
                add(m, _dir_error(m) if m.is_dir() else None)
            continue
        add(path, _dir_error(path) if path.is_dir() else None)
    return targets


def _dir_error(path: Path) -> ModelError:
    return ModelError(path, "is a directory, not an MNN model file",
                      "rename it, or name the .mnn file inside it")
