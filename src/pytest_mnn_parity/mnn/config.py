"""One point of the matrix (``RunConfig``) and the reference's configuration, without numpy or MNN.

Apart from ``runner`` (the session API, which needs numpy) because the plugin names configurations at every pytest
start-up (its markers and fixtures for users' own tests), most of which check no model (issue 22).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .backends import (
    CHEAPEST_TUNING,
    canonical_backend,
    canonical_precision,
    gpu_mode_applies,
    gpu_mode_backends,
    gpu_mode_number,
    parse_gpu_mode,
)

# pymnn ignores precision strings it does not know (``"normal"`` among them),
# so pass BackendConfig::PrecisionMode numbers.
PRECISION_CODES = {"normal": 0, "high": 1, "low": 2, "Low_BF16": 3}

@dataclass(frozen=True)
class RunConfig:
    """One point of the matrix: where and how precisely MNN computes.

    ``gpu_mode`` (``backends.GPU_MODE_BITS``, e.g. ``buffer`` or ``image+record-batch``) is for the backends
    it applies to; those backends read the session config's ``numThread`` as mode flags, not as threads, so
    without a mode they get the cheapest tuning (``backends.CHEAPEST_TUNING``) rather than ``threads``.
    """

    backend: str
    precision: str
    threads: int = 4
    gpu_mode: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "backend", canonical_backend(self.backend))
        object.__setattr__(self, "precision", canonical_precision(self.precision))
        if self.gpu_mode is not None:
            mode = parse_gpu_mode(self.gpu_mode)
            if not gpu_mode_applies(mode, self.backend):
                raise ValueError(f"GPU mode {mode!r} does not apply to {self.backend} (see docs/gpu.md)")
            object.__setattr__(self, "gpu_mode", mode)

    @property
    def id(self) -> str:
        return f"{self.backend}-{self.precision}" + (f"-{self.gpu_mode}" if self.gpu_mode else "")

    @property
    def reads_gpu_mode(self) -> bool:
        return self.backend in gpu_mode_backends()

    def num_thread(self) -> int:
        """What goes into the session config's ``numThread``: threads, or a GPU backend's mode flags."""
        return gpu_mode_number(self.gpu_mode) if self.reads_gpu_mode else int(self.threads)

    def session_config(self) -> dict[str, Any]:
        return {"backend": self.backend, "precision": PRECISION_CODES[self.precision], "numThread": self.num_thread()}

    def how(self) -> str:
        """The threads, or on a backend that reads GPU modes the mode that ran: what a message says."""
        if self.reads_gpu_mode:
            return f"GPU mode {self.gpu_mode or CHEAPEST_TUNING} (numThread {self.num_thread()})"
        return f"{self.threads} thread{'s' if self.threads != 1 else ''}"

    def describe(self) -> str:
        return f"{self.backend} {self.precision}, {self.how()}"


# The session that describes a model (its inputs and outputs) before any configuration runs.  One thread:
# the engine's noise measurement runs it again (``engine.noise_floors``).
DESCRIBE_CONFIG = RunConfig("CPU", "high", 1)


def reference_config(threads: int) -> RunConfig:
    """Where the reference runs: CPU, high precision, at the items' own thread count.

    MNN's multi-threaded CPU kernels split sums by thread, so 1 and 4 threads
    differ by up to ~5e-3 on real models while equal counts are bit-identical:
    a reference at another thread count would make every CPU item differ from
    it by noise that is no finding.
    """
    return RunConfig("CPU", "high", threads)


