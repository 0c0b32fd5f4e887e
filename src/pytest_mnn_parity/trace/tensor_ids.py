"""Which earlier op produced a tensor, told by its memory before copying anything.

An op's input is nearly always an earlier op's output, already copied and
judged.  On CPU sessions a tensor's memory address (``getHost``) says which
one: MNN reuses memory, so an address maps to the op that wrote it last.  A
small sample of the raw bytes, taken when the producer finished, guards
against memory written by something the callbacks never see (commands run
without callbacks): if the sample changed, the tensor is copied as before.
"""
from __future__ import annotations

import ctypes
import zlib
from dataclasses import dataclass
from typing import Any, Hashable

import numpy as np

from ..mnn.model import tensor_dtype
from ..mnn.runner import to_numpy

_GET_POINTER = ctypes.pythonapi.PyCapsule_GetPointer
_GET_POINTER.restype = ctypes.c_void_p
_GET_POINTER.argtypes = [ctypes.py_object, ctypes.c_char_p]
# Bytes sampled per tensor: spread over the whole buffer, a few microseconds.
_SAMPLE = 4096


@dataclass(frozen=True)
class TensorInfo:
    """What a callback tensor is, read once: shape, dtype, host address (None off the CPU)."""

    shape: tuple[int, ...]
    dtype: np.dtype | None
    address: int | None

    @property
    def nbytes(self) -> int:
        if self.dtype is None or any(d <= 0 for d in self.shape):
            return 0
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def describe(tensor: Any, with_address: bool) -> TensorInfo:
    shape = tuple(int(d) for d in tensor.getShape())
    address = None
    if with_address:
        try:
            address = _GET_POINTER(tensor.getHost(), None) or None
        except (ValueError, TypeError):
            address = None
    return TensorInfo(shape, tensor_dtype(tensor), address)


def _sample(info: TensorInfo) -> int | None:
    size = info.nbytes
    if info.address is None or size == 0:
        return None
    raw = memoryview((ctypes.c_char * size).from_address(info.address)).cast("B")
    # memoryview's strided copy keeps the GIL (numpy's lets go of it above 500 elements): inside a callback, giving
    # the GIL away meant waiting to get it back from the trace's comparison thread (``stream``), about 80 us a sample.
    return zlib.crc32(raw[::max(1, size // _SAMPLE)].tobytes())


class Producers:
    """Address -> the (op, output) that wrote it last, with a sample to verify it is unchanged."""

    def __init__(self):
        self._by_address: dict[tuple, tuple[Hashable, int | None]] = {}

    def wrote(self, info: TensorInfo, tag: Hashable) -> None:
        if info.address is not None:
            self._by_address[(info.address, info.shape, info.dtype)] = (tag, _sample(info))

    def find(self, info: TensorInfo) -> Hashable | None:
        if info.address is None:
            return None
        entry = self._by_address.get((info.address, info.shape, info.dtype))
        if entry is None or entry[1] is None or _sample(info) != entry[1]:
            return None
        return entry[0]


class HostCopies:
    """``to_numpy`` views into host tensors reused across ops of the same shape.

    A fresh host tensor per op costs an allocation and page faults on every
    copy; one kept for the last shape does not (consecutive ops often share a
    shape).  One only, freed before another is made: peak memory grows by one
    intermediate, never two.
    """

    def __init__(self, keep: int = 1):
        self.keep = keep
        self._hosts: dict[tuple, Any] = {}

    def view(self, tensor: Any, info: TensorInfo) -> np.ndarray:
        from ..mnn.library import mnn

        if info.nbytes == 0:
            return to_numpy(tensor)
        key = (info.shape, info.dtype, tensor.getDimensionType())
        host = self._hosts.pop(key, None)
        if host is None:
            # Free before allocating: two intermediates at once would be a new memory peak.
            while self._hosts and len(self._hosts) >= self.keep:
                self._hosts.pop(next(iter(self._hosts)))
            host = mnn().Tensor(tensor, key[2])
        self._hosts[key] = host
        if not tensor.copyToHostTensor(host):
            return np.zeros((0,) * len(info.shape), dtype=info.dtype)
        return np.asarray(host.getNumpyData())
