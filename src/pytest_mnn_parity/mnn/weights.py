"""Find the constant weights of an fp32 ``.mnn`` that ``--fp16`` conversion would destroy.

MNN's converter (``CastParamsToHalf``, tools/converter/source/common/SaveHalfFloat.cpp,
MNN 3.6.1) stores convolution weights and float ``Const`` blobs as IEEE half: values are
clamped to +-65504 and otherwise truncated toward zero, so every |w| < 2**-24 becomes 0.
Convolution *bias* stays float32.  A model can therefore collapse silently in its fp16
build; this scan says which tensors will, before the model ships.

pymnn hides convolution weights inside op parameters, so the file is read directly as
FlatBuffers, read-only and bounds-checked, without the ``flatbuffers`` package.  Field ids
are declaration order in MNN's ``schema/default/*.fbs`` (a union takes two ids:
``<name>_type`` then ``<name>``); they were checked against MNN 3.6.1's generated headers.
"""
from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

FP16_MAX = 65504.0
FP16_MIN_NORMAL = 2.0 ** -14
FP16_MIN_SUBNORMAL = 2.0 ** -24

# Net (MNN.fbs): bizCode 0, extraTensorDescribe 1, extraInfo 2, oplists 3, outputName 4,
# preferForwardType 5, sourceType 6, tensorName 7, tensorNumber 8, usage 9, subgraphs 10.
_NET_BIZCODE, _NET_OPLISTS, _NET_OUTPUTNAME, _NET_TENSORNAME, _NET_SUBGRAPHS = 0, 3, 4, 7, 10
_SUBGRAPH_NODES = 4  # SubGraphProto: name, inputs, outputs, tensors, nodes
# Op: inputIndexes 0, main_type 1, main 2, name 3, outputIndexes 4, type 5.
_OP_MAIN_TYPE, _OP_MAIN, _OP_NAME, _OP_TYPE = 1, 2, 3, 5
_OP_INPUTS, _OP_OUTPUTS = 0, 4
# Convolution2D (CaffeOp.fbs): common 0, weight 1, bias 2, quanParameter 3,
# symmetricQuan 4, sparseParameter 5, external 6.
_CONV_WEIGHT, _CONV_BIAS, _CONV_QUAN, _CONV_SYMQUAN, _CONV_EXTERNAL = 1, 2, 3, 4, 6
# Blob (Tensor.fbs): dims 0, dataFormat 1, dataType 2 (default DT_FLOAT), uint8s 3,
# int8s 4, int32s 5, int64s 6, float32s 7, strings 8, external 9.
_BLOB_DATATYPE, _BLOB_FLOAT32S, _BLOB_EXTERNAL = 2, 7, 9
_PARAM_BLOB, _PARAM_CONV2D = 7, 9  # OpParameter union ids (0 = NONE)
_DT_FLOAT, _DT_BFLOAT16, _DT_HALF = 1, 14, 19
# Exactly the op types CastParamsToHalf rewrites; everything else keeps float32.
_CONV_TYPES = {12: "Convolution", 13: "ConvolutionDepthwise",
               17: "Deconvolution", 18: "DeconvolutionDepthwise"}
_CONST = 11


@dataclass(frozen=True, eq=False)  # eq on arrays is ambiguous; compare fields explicitly
class WeightTensor:
    """One stored tensor; ``values`` is None when it is already compressed (fp16 or quantized)."""

    op_name: str
    op_type: str
    role: str  # "weight", "bias" or "const"
    values: np.ndarray | None
    compressed: bool


@dataclass(frozen=True)
class WeightRisk:
    """``count`` of ``total`` elements would lose their value (kind "flush", "subnormal",
    "overflow"); ``worst`` is the smallest non-zero |w| (flush, subnormal) or the largest."""

    op_name: str
    op_type: str
    role: str
    count: int
    total: int
    kind: str
    worst: float

    def describe(self) -> str:
        what = {"flush": "flush to 0 under --fp16", "subnormal": "fall below fp16's normal range",
                "overflow": "exceed 65504 and would be clamped under --fp16"}.get(self.kind, self.kind)
        return (f"{self.op_name} ({self.op_type} {self.role}): {self.count} of {self.total} values would {what} "
                f"(worst |w| {self.worst:.3g})")

    def as_dict(self) -> dict:
        return {"op": self.op_name, "type": self.op_type, "role": self.role, "kind": self.kind,
                "count": self.count, "total": self.total, "worst": self.worst}


# Compiled once: parsing a model calls unpack thousands of times.
_STRUCTS: dict[str, struct.Struct] = {}
_U32, _I32, _U16 = (struct.Struct(f).unpack_from for f in ("<I", "<i", "<H"))


class _Reader:
    """Bounds-checked FlatBuffers access: any bad offset becomes a ValueError, never a crash."""

    def __init__(self, data: bytes, name: str):
        self.data, self.name = data, name
        self.size = len(data)

    def fail(self, why: str):
        raise ValueError(f"{self.name}: not a valid .mnn file: {why}")

    def outside(self, pos: int):
        self.fail(f"offset {pos} is outside the file ({self.size} bytes)")

    def unpack(self, fmt: str, pos: int):
        compiled = _STRUCTS.get(fmt) or _STRUCTS.setdefault(fmt, struct.Struct(fmt))
        if pos < 0 or pos + compiled.size > self.size:
            self.outside(pos)
        return compiled.unpack_from(self.data, pos)[0]

    # deref and field run thousands of times per model (they were most of the engine's
    # per-model scan cost on small models): same checks as ``unpack``, without its lookups.
    def deref(self, pos: int) -> int:
        if pos < 0 or pos + 4 > self.size:
            self.outside(pos)
        return pos + _U32(self.data, pos)[0]

    def field(self, table: int, fid: int) -> int | None:
        data, n = self.data, self.size
        if table < 0 or table + 4 > n:
            self.outside(table)
        vtable = table - _I32(data, table)[0]
        if vtable < 0 or vtable + 2 > n:
            self.outside(vtable)
        size = _U16(data, vtable)[0]
        if size < 4 or size % 2 or vtable + size > n:
            self.fail(f"bad vtable at {vtable} for the table at {table}")
        slot = 4 + 2 * fid
        off = _U16(data, vtable + slot)[0] if slot < size else 0  # inside the checked vtable
        return table + off if off else None

    def scalar(self, table: int, fid: int, fmt: str, default):
        pos = self.field(table, fid)
        return default if pos is None else self.unpack(fmt, pos)

    def table(self, table: int, fid: int) -> int | None:
        pos = self.field(table, fid)
        return None if pos is None else self.deref(pos)

    def vector(self, table: int, fid: int, item: int) -> tuple[int, int]:
        pos = self.table(table, fid)
        if pos is None:
            return 0, 0
        count = self.unpack("<I", pos)
        if pos + 4 + count * item > len(self.data):
            self.fail(f"vector at {pos} of {count} items runs past the end of the file")
        return pos + 4, count

    def tables(self, table: int, fid: int) -> list[int]:
        start, count = self.vector(table, fid, 4)
        return [self.deref(start + 4 * i) for i in range(count)]

    def text(self, pos: int) -> str:
        if pos < 0 or pos + 4 > self.size:
            self.outside(pos)
        count = _U32(self.data, pos)[0]
        if pos + 4 + count > len(self.data):
            self.fail(f"string at {pos} runs past the end of the file")
        return self.data[pos + 4:pos + 4 + count].decode("utf-8", "replace")

    def string(self, table: int, fid: int) -> str:
        pos = self.table(table, fid)
        return "" if pos is None else self.text(pos)

    def array(self, table: int, fid: int, dtype: str) -> np.ndarray:
        start, count = self.vector(table, fid, np.dtype(dtype).itemsize)
        return np.frombuffer(self.data, dtype, count, start) if count else np.empty(0, dtype)


def _read_only(values: np.ndarray) -> np.ndarray:
    out = values.astype(np.float32)  # always a copy, so it does not pin the file's bytes
    out.flags.writeable = False
    return out


class _External:
    """``<model>.weight``, where the converter moves data of large models (RemoveParams.cpp);
    read per tensor because it can be many GB."""

    def __init__(self, path: Path):
        self.path = path.with_name(path.name + ".weight")

    def floats(self, op_name: str, offset: int, nbytes: int) -> np.ndarray:
        if not self.path.is_file():
            raise ValueError(f"{self.path.name}: missing, but op {op_name!r} keeps its data there")
        if offset < 0 or nbytes < 0 or nbytes % 4 or offset + nbytes > self.path.stat().st_size:
            raise ValueError(f"{self.path.name}: op {op_name!r} points at bytes "
                             f"{offset}..{offset + nbytes}, outside the file or not float32")
        with self.path.open("rb") as f:
            f.seek(offset)
            return np.frombuffer(f.read(nbytes), "<f4")


def _open(path: Path) -> tuple[_Reader, int]:
    """A reader of the file and its net table; ValueError when it cannot even hold a FlatBuffers header."""
    data = path.read_bytes()
    r = _Reader(data, path.name)
    if len(data) < 8:
        r.fail("shorter than a FlatBuffers header")
    return r, r.deref(0)


def _with_subgraphs(r: _Reader, net: int, ops: list[int]) -> list[int]:
    """``ops`` followed by every subgraph's ops (the order MNN's file lists them)."""
    for graph in r.tables(net, _NET_SUBGRAPHS):
        ops += r.tables(graph, _SUBGRAPH_NODES)
        if len(ops) > r.size // 8:  # more ops than bytes allow: shared vectors, would loop on
            r.fail("its subgraphs reference more ops than the file can hold")
    return ops


def iter_weights(path) -> Iterator[WeightTensor]:
    """Yield the tensors ``--fp16`` rewrites (conv weights, float Consts) plus conv biases,
    in op order (main graph, then subgraphs).  Raise ValueError on a malformed file."""
    path = Path(path)
    r, net = _open(path)
    external = _External(path)
    ops = r.tables(net, _NET_OPLISTS)
    if not ops:
        r.fail("the net has no ops")
    ops = _with_subgraphs(r, net, ops)
    # Data we do not need, read anyway so that truncation past the weights is caught.
    r.string(net, _NET_BIZCODE)
    for pos in r.tables(net, _NET_OUTPUTNAME) + r.tables(net, _NET_TENSORNAME):
        r.text(pos)
    for op in ops:
        op_type = r.scalar(op, _OP_TYPE, "<i", 0)
        param_type = r.scalar(op, _OP_MAIN_TYPE, "<B", 0)
        name, params = r.string(op, _OP_NAME), r.table(op, _OP_MAIN)
        if params is None:
            if param_type:
                r.fail(f"op {name!r} declares parameters but has none")
            continue
        r.field(params, 0)  # validates the parameter table's vtable
        if op_type in _CONV_TYPES and param_type == _PARAM_CONV2D:
            yield from _conv(r, external, name, params, _CONV_TYPES[op_type])
        elif op_type == _CONST and param_type == _PARAM_BLOB:
            yield from _const(r, external, name, params)


def op_names(path) -> list[str]:
    """Every op's name in file order (main graph, then subgraphs): the names a per-layer tolerance
    (``[tolerance.layers.NAME]``) can match.  Raise ValueError on a malformed file."""
    r, net = _open(Path(path))
    ops = _with_subgraphs(r, net, r.tables(net, _NET_OPLISTS))
    return list(dict.fromkeys(r.string(op, _OP_NAME) for op in ops))


def op_tensors(path) -> dict[str, tuple[list[str], list[str]]]:
    """Each main-graph op's input and output tensor names, by op name (the first op of a repeated name):
    how a per-op callback's op is found among the file's tensors.  Raise ValueError on a malformed file."""
    r, net = _open(Path(path))
    names = [r.text(pos) for pos in r.tables(net, _NET_TENSORNAME)]

    def tensor_names(op: int, fid: int) -> list[str]:
        return [names[i] if 0 <= i < len(names) else f"#{i}" for i in r.array(op, fid, "<i4").tolist()]

    found: dict[str, tuple[list[str], list[str]]] = {}
    for op in r.tables(net, _NET_OPLISTS):
        found.setdefault(r.string(op, _OP_NAME), (tensor_names(op, _OP_INPUTS), tensor_names(op, _OP_OUTPUTS)))
    return found


# MNN's OpType numbers (schema/default/MNN.fbs) for the ops the plugin decides by: the convolutions whose kernels
# the arithmetic probes measure (arithmetic.KERNEL_PROBES).  Others are named by number.
OP_TYPE_NAMES = {11: "Const", 34: "Input", 129: "ConvertTensor", **_CONV_TYPES}


def op_types(path) -> tuple[str, ...]:
    """The distinct MNN op types of a ``.mnn`` file in first-use order (main graph, then subgraphs), by name where
    ``OP_TYPE_NAMES`` has one (``op type 39`` otherwise); () for a file this reader cannot read (MNN reports why
    when it loads it).  Cached per file version: it is asked once per checked configuration."""
    try:
        stat = Path(path).stat()
    except OSError:
        return ()
    return _op_types(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _op_types(path: str, size: int, mtime_ns: int) -> tuple[str, ...]:
    try:
        r, net = _open(Path(path))
        ops = _with_subgraphs(r, net, r.tables(net, _NET_OPLISTS))
        numbers = dict.fromkeys(r.scalar(op, _OP_TYPE, "<i", 0) for op in ops)
    except (OSError, ValueError, struct.error):
        return ()
    return tuple(OP_TYPE_NAMES.get(n, f"op type {n}") for n in numbers)


def _conv(r: _Reader, external: _External, name: str, conv: int, op_type: str) -> Iterator[WeightTensor]:
    compressed = r.field(conv, _CONV_QUAN) is not None or r.field(conv, _CONV_SYMQUAN) is not None
    weight = r.array(conv, _CONV_WEIGHT, "<f4")
    bias = r.array(conv, _CONV_BIAS, "<f4")
    ext = r.array(conv, _CONV_EXTERNAL, "<i8").tolist()
    # External layout is [offset, sizes...]: weight, bias for float convs;
    # buffer, alpha, bias, index for compressed ones (RemoveParams.cpp).
    bias_at = 3 if compressed else 2
    if len(ext) > bias_at and not bias.size:
        bias = external.floats(name, ext[0] + sum(ext[1:bias_at]), ext[bias_at])
    if compressed:
        yield WeightTensor(name, op_type, "weight", None, True)
    else:
        if not weight.size and len(ext) > 1:
            weight = external.floats(name, ext[0], ext[1])
        if weight.size:  # empty: the weight arrives as an input tensor (a Const op)
            yield WeightTensor(name, op_type, "weight", _read_only(weight), False)
    if bias.size:
        yield WeightTensor(name, op_type, "bias", _read_only(bias), False)


def _const(r: _Reader, external: _External, name: str, blob: int) -> Iterator[WeightTensor]:
    dtype = r.scalar(blob, _BLOB_DATATYPE, "<i", _DT_FLOAT)
    if dtype in (_DT_HALF, _DT_BFLOAT16):
        yield WeightTensor(name, "Const", "const", None, True)
    elif dtype == _DT_FLOAT:
        values = r.array(blob, _BLOB_FLOAT32S, "<f4")
        ext = r.array(blob, _BLOB_EXTERNAL, "<i8").tolist()
        if not values.size and len(ext) > 1:
            values = external.floats(name, ext[0], ext[1])
        yield WeightTensor(name, "Const", "const", _read_only(values), False)


def classify_fp16(op_name: str, op_type: str, role: str, values: np.ndarray,
                  min_fraction: float = 0.0) -> list[WeightRisk]:
    """The fp16 risks of one tensor (cast to float32 first, as MNN stores it).  A kind is
    reported only when it hits at least ``min_fraction`` of the elements, so that harmless
    outliers (e.g. 1e-17 rounding noise in a DFT matrix) can be tolerated."""
    a = np.abs(np.asarray(values, dtype=np.float32).ravel())
    total = a.size
    risks = []
    # Most tensors hold nothing below fp16's normal range but zeros, and nothing above its
    # max: then every mask below is empty.  Two counts and a max decide that.
    if not (a > FP16_MAX).any() and np.count_nonzero(a < FP16_MIN_NORMAL) == np.count_nonzero(a == 0):
        return risks
    nonzero = a > 0  # NaN compares False everywhere: neither a flush nor an overflow

    def add(kind: str, mask: np.ndarray, worst) -> None:
        count = int(mask.sum())
        if count and count / total >= min_fraction:
            risks.append(WeightRisk(op_name, op_type, role, count, total, kind, float(worst(a[mask]))))

    add("flush", nonzero & (a < FP16_MIN_SUBNORMAL), np.min)
    below_normal = nonzero & (a < FP16_MIN_NORMAL)
    if 2 * int(below_normal.sum()) > int(nonzero.sum()):  # precision of most of the tensor is gone
        add("subnormal", below_normal, np.min)
    add("overflow", a > FP16_MAX, np.max)
    return risks


def fp16_weight_risks(path, *, min_fraction: float = 0.0) -> list[WeightRisk]:
    """What ``--fp16`` would flush or clamp, in op order.  Conv biases are skipped because the
    converter keeps them float32; already-compressed tensors have nothing left to lose."""
    if not 0.0 <= min_fraction <= 1.0:
        raise ValueError(f"min_fraction must be in [0, 1], got {min_fraction!r}")
    risks: list[WeightRisk] = []
    for t in iter_weights(path):
        if t.values is not None and t.role != "bias":
            risks += classify_fp16(t.op_name, t.op_type, t.role, t.values, min_fraction)
    return risks
