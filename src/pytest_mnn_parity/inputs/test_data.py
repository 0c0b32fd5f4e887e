"""ONNX test-data sets as named input sets with expected outputs.

The layout of the ONNX backend tests and the ONNX Model Zoo::

    model.onnx
    test_data_set_0/input_0.pb  input_1.pb ...  output_0.pb ...
    test_data_set_1/...

Each ``input_N.pb`` / ``output_N.pb`` is a serialised ``TensorProto`` (read
with ``onnx.numpy_helper``).  A tensor that carries no name (most of the ONNX
wheel's own test data) is matched by position to the graph's inputs (those
that are not initializers) or outputs, which is what the ONNX backend test
runner does.  Every set becomes an ``InputSet`` named after its folder, whose
``expected`` outputs are the reference its items are judged against.

A set that cannot be read becomes an input set carrying its error, so that
set's items fail with it and the model's other sets still run.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np

from .sets import InputSet
from .sources import SidecarError, ValueSource, Where

SET_PATTERN = "test_data_set_*"
_INDEX = re.compile(r"_(\d+)\.pb$")
# The description an item's reference gets, and the reference label of the matrix and the JSON report.
REFERENCE_LABEL = "test-data"


def beside(model_path: Path) -> list[Path]:
    """The ``test_data_set_N`` folders next to ``model_path``, in N order (none: [])."""
    return set_folders(Path(model_path).parent)


def set_folders(folder: Path) -> list[Path]:
    """``folder`` itself when it is one test-data set, else the ``test_data_set_*`` folders inside it."""
    folder = Path(folder)
    if _is_set(folder):
        return [folder]
    return sorted((p for p in folder.glob(SET_PATTERN) if _is_set(p)), key=_order)


def read_sets(folders: Sequence[Path], model_path: Path, label: str = "") -> list[InputSet]:
    """One ``InputSet`` per folder, for the model at ``model_path`` (its ONNX graph names unnamed tensors)."""
    names = graph_names(model_path)
    return [read_set(folder, names, label) for folder in folders]


def read_set(folder: Path, names: tuple[list[str], list[str]] | None = None, label: str = "") -> InputSet:
    folder = Path(folder)
    where = Where(folder, f"input_sets.{folder.name}")
    origin = label or str(folder)
    try:
        inputs = _tensors(folder, "input", names[0] if names else None)
        outputs = _tensors(folder, "output", names[1] if names else None)
        if not inputs:
            raise SidecarError(folder, "no input_*.pb in this test-data set",
                               "a test-data set holds input_0.pb, input_1.pb, ... and output_0.pb, ...")
    except SidecarError as exc:
        return InputSet(folder.name, {}, where, error=exc, origin=origin)
    sources = {name: ValueSource(where.at(name), array, f"{folder.name}/{file}")
               for name, (file, array) in inputs.items()}
    expected = {name: array for name, (_, array) in outputs.items()}
    return InputSet(folder.name, sources, where, origin=origin, expected=expected or None,
                    expected_from=f"{folder}/output_*.pb")


def shapes_of(input_set: InputSet) -> dict[str, tuple[int, ...]]:
    """The input shapes a test-data set was made for (the model is loaded with them: ONNX graphs are often
    dynamic, and the stored outputs are for exactly these shapes)."""
    return {name: tuple(int(d) for d in np.shape(source.array)) for name, source in input_set.sources.items()
            if isinstance(source, ValueSource) and np.ndim(source.array) > 0}


def graph_names(model_path: Path) -> tuple[list[str], list[str]] | None:
    """The ONNX graph's real inputs (initializers left out) and outputs, in order; None for a non-ONNX model
    or a graph that cannot be read (then every tensor must carry its name)."""
    model_path = Path(model_path)
    if model_path.suffix.lower() != ".onnx":
        return None
    try:
        import onnx  # noqa: PLC0415 - only for models that have test data

        graph = onnx.load(str(model_path), load_external_data=False).graph
    except Exception:  # noqa: BLE001 - an unreadable graph is the conversion's error to report, not ours
        return None
    initializers = {t.name for t in graph.initializer}
    return ([i.name for i in graph.input if i.name not in initializers], [o.name for o in graph.output])


def _tensors(folder: Path, kind: str, names: list[str] | None) -> dict[str, tuple[str, np.ndarray]]:
    from onnx import TensorProto, numpy_helper  # noqa: PLC0415

    files = sorted(folder.glob(f"{kind}_*.pb"), key=_order)
    found: dict[str, tuple[str, np.ndarray]] = {}
    for position, file in enumerate(files):
        tensor = TensorProto()
        try:
            tensor.ParseFromString(file.read_bytes())
            if not tensor.data_type:
                raise ValueError("not a TensorProto (a sequence, map or optional?)")
            array = numpy_helper.to_array(tensor)
        except Exception as exc:  # noqa: BLE001 - protobuf and numpy_helper raise their own types
            raise SidecarError(file, f"cannot read it as an ONNX tensor ({exc})",
                               "write it with onnx.numpy_helper.from_array(array, name).SerializeToString()"
                               ) from None
        name = tensor.name
        if not name:
            if names is None or position >= len(names):
                known = f"the graph has {len(names)} {kind}(s)" if names is not None else "no ONNX graph beside it"
                raise SidecarError(file, f"the tensor has no name and cannot be matched by position ({known})",
                                   f"store it with its {kind}'s name: numpy_helper.from_array(array, NAME)")
            name = names[position]
        found[name] = (file.name, array)
    return found


def _is_set(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("input_*.pb"))


def _order(path: Path) -> tuple[int, str]:
    match = _INDEX.search(path.name) or re.search(r"(\d+)$", path.name)
    return (int(match.group(1)) if match else 1 << 30, path.name)
