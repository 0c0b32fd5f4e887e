"""ONNX Runtime as the reference: the ONNX model on ORT's CPU provider, fed MNN's inputs.

Outputs are matched by name (MNN lists them alphabetically, ONNX in graph
order) and brought to the dtypes an MNN session gives: int64 becomes int32
(MNN sessions store int64 as int32) when the values fit, float64 and float16
become float32, bool becomes int32.  A value that does not fit stays as it is,
so the comparison shows it instead of hiding it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..mnn.model import ModelError

ORT_DTYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


def ort_version() -> str:
    import onnxruntime  # noqa: PLC0415 - slow import, only when ONNX is involved

    return onnxruntime.__version__


def session_options(threads: int = 1) -> Any:
    import onnxruntime as ort  # noqa: PLC0415

    options = ort.SessionOptions()
    # One thread: the reference must not move in the last bits from run to run.
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return options


class RuntimeLoadError(ModelError):
    """ONNX Runtime refused the model itself (an old opset it has no kernel for, an op it lacks): the model may
    still be fine for MNN, so the engine falls back to another reference instead of failing the model."""


class OnnxRuntimeModel:
    """An ORT CPU session on one ONNX file (or on the bytes of an edited copy)."""

    def __init__(self, path: os.PathLike | str, model_bytes: bytes | None = None):
        import onnxruntime as ort  # noqa: PLC0415

        self.path = Path(path)
        try:
            self.session = ort.InferenceSession(model_bytes if model_bytes is not None else str(self.path),
                                                session_options(), providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types per failure
            raise RuntimeLoadError(self.path, f"ONNX Runtime cannot load it ({_first_line(exc)})",
                             "check the file with onnx.checker.check_model and re-export it") from None
        self.input_types = {i.name: i.type for i in self.session.get_inputs()}
        self.input_shapes = {i.name: list(i.shape) for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.description = f"ONNX Runtime {ort.__version__} CPU, 1 thread, on {self.path}"

    def check_interface(self, model) -> None:
        """The MNN model (a ``LoadedModel``) must have the same inputs and outputs, by name."""
        mine = {s.name: model.shapes[s.name] for s in model.info.inputs}
        if set(mine) != set(self.input_shapes):
            raise ModelError(model.path, f"its inputs {sorted(mine)} differ from the ONNX reference {self.path}'s "
                                         f"{sorted(self.input_shapes)}",
                             "--mnn-reference must name the ONNX model this .mnn was converted from")
        for name, dims in self.input_shapes.items():
            shape = mine[name]
            static_clash = [i for i, d in enumerate(dims) if isinstance(d, int) and i < len(shape) and d != shape[i]]
            if len(dims) != len(shape) or static_clash:
                raise ModelError(model.path, f"input {name!r} is {'x'.join(map(str, shape))} in MNN but "
                                             f"{_dims(dims)} in the ONNX reference {self.path}",
                                 "give the ONNX model's shape with --mnn-input-shape, or reference the ONNX file "
                                 "this .mnn was converted from")
        if set(model.info.output_names) != set(self.output_names):
            raise ModelError(model.path, f"its outputs {sorted(model.info.output_names)} differ from the ONNX "
                                         f"reference {self.path}'s {sorted(self.output_names)}",
                             "--mnn-reference must name the ONNX model this .mnn was converted from")

    def feeds(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """MNN's inputs cast to what ORT declares (MNN feeds int32 where ONNX says int64)."""
        out = {}
        for name, kind in self.input_types.items():
            if name not in inputs:
                raise ModelError(self.path, f"ONNX input {name!r} has no data (the MNN model has no such input)",
                                 "reference the ONNX model this .mnn was converted from")
            dtype = ORT_DTYPES.get(kind)
            array = np.asarray(inputs[name])
            out[name] = array.astype(dtype) if dtype is not None and array.dtype != dtype else array
        return out

    def run(self, inputs: Mapping[str, np.ndarray], names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        wanted = list(names) if names is not None else self.output_names
        try:
            values = self.session.run(wanted, self.feeds(inputs))
        except ModelError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ModelError(self.path, f"ONNX Runtime could not run it ({_first_line(exc)})",
                             "check the input shapes (--mnn-input-shape) and the model with ONNX Runtime") from None
        return {name: as_mnn_dtype(np.asarray(value)) for name, value in zip(wanted, values)}


def declared_dims(onnx_path: os.PathLike | str) -> dict[str, tuple[int | str | None, ...]]:
    """Per graph input, the dimensions the ONNX file declares: a size, the name of a symbolic dimension, or None."""
    import onnx  # noqa: PLC0415

    model = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    dims = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims[value.name] = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else
                                 (d.dim_param or None) for d in value.type.tensor_type.shape.dim)
    return dims


def as_mnn_dtype(array: np.ndarray) -> np.ndarray:
    """An ORT output in the dtype an MNN session reports for the same tensor."""
    if array.dtype in (np.float64, np.float16):
        return array.astype(np.float32)
    if array.dtype == np.bool_:
        return array.astype(np.int32)
    if array.dtype == np.int64:
        info = np.iinfo(np.int32)
        if array.size == 0 or (array.min() >= info.min and array.max() <= info.max):
            return array.astype(np.int32)
    return array


def _dims(dims: list) -> str:
    return "x".join(str(d) if isinstance(d, int) else "?" for d in dims)


def _first_line(exc: BaseException) -> str:
    """ONNX Runtime's words, whole (they were cut mid-word at 300 characters): further lines indented."""
    text = [line.rstrip() for line in str(exc).strip().splitlines() if line.strip()]
    if not text:
        return type(exc).__name__
    return "\n    ".join(text)
