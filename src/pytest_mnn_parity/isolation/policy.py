"""Which configurations run isolated, and the timeout: the policy between the plugin and the engines.

``--mnn-isolate`` modes:

* ``auto`` (default): configurations and backend probes of every backend but
  the CPU run in worker processes; CPU ones run in-process, exactly as without
  isolation.  An explicit ``--mnn-timeout`` isolates every backend, since only
  a separate process can be stopped mid-inference.
* ``always``: everything runs in workers.
* ``never``: everything runs in-process; ``--mnn-timeout`` can then only judge
  a configuration after it returns.

Why this default: GPU and NPU backends go through drivers and young backend
code, where segfaults and hangs happen (and where discovery itself can crash);
the CPU backend is MNN's most exercised path, and keeping it in-process keeps
the common CI case (CPU-only) at its in-process speed.  See docs/reliability.md.
"""
from __future__ import annotations

import os
import time
from typing import Any, Mapping, Sequence

from ..core.verdict import Category
from ..engine.engine import ParityEngine
from ..engine.request import Checker, CheckRequest
from ..engine.results import ParityResult
from ..mnn import backends
from .engine import IsolatedEngine

ISOLATE_MODES = ("auto", "always", "never")
# --mnn-worker-scope: "model" gives every model a fresh worker process, "run" keeps one for all models.
WORKER_SCOPES = ("model", "run")
# Isolated configurations without --mnn-timeout still get this bound, so a hung
# GPU driver cannot stall CI until its job limit.
DEFAULT_ISOLATED_TIMEOUT = 600.0


def isolated_backends(mode: str, names: Sequence[str], timeout: float | None) -> frozenset[str]:
    if mode == "never":
        return frozenset()
    if mode == "always" or timeout is not None:
        return frozenset(names)
    return frozenset(name for name in names if name != "CPU")


class Isolation(Checker):
    """Sends each configuration to the in-process engine or to the isolated one."""

    def __init__(self, engine: ParityEngine, mode: str, timeout: float | None, names: Sequence[str],
                 worker_scope: str = "model"):
        self.engine = engine
        self.mode = mode
        self.timeout = timeout
        self.worker_scope = worker_scope
        self.isolated_set = isolated_backends(mode, [backends.canonical_backend(n) for n in names], timeout)
        self._isolated: IsolatedEngine | None = None
        # Other MNN releases' engines (``versions.ReleaseEngines``), when the run asks for them.
        self.releases = None

    @property
    def isolated(self) -> IsolatedEngine:
        if self._isolated is None:
            timeout = self.timeout if self.timeout is not None else DEFAULT_ISOLATED_TIMEOUT
            self._isolated = IsolatedEngine(self.engine.settings, timeout=timeout,
                                            worker_per_model=self.worker_scope == "model", declarations=self.engine)
        return self._isolated

    def start(self) -> None:
        """Start the first worker now, so its imports overlap pytest's collection."""
        if self.isolated_set:
            self.isolated  # noqa: B018 - starts the spare worker

    def isolates(self, backend: str) -> bool:
        return backend in self.isolated_set

    def expect_models(self, count: int) -> None:
        """How many models will run isolated: no spare worker is started for a model that will not come."""
        if count or self._isolated is not None:
            self.isolated.expected_models = count

    def backend_status(self, name: str) -> backends.BackendStatus:
        name = backends.canonical_backend(name)
        if self.isolates(name):
            return self.isolated.backend_status(name)
        return backends.discover([name])[name]

    def check_request(self, request: CheckRequest, bundle: Mapping[str, Any] | None = None,
                      sidecar: Any = None) -> ParityResult:
        """``request`` in a worker or in-process, as the policy says.  ``bundle`` and ``sidecar`` are for an
        isolated worker (``IsolatedEngine.check_request``); in-process, the caller saves ``result.computed``
        and has checked the sidecar itself."""
        if self.isolates(request.config.backend):
            return self.isolated.check_request(request, bundle=bundle, sidecar=sidecar)
        if self.timeout is None:
            return self.engine.check_request(request)
        started = time.perf_counter()
        result = self.engine.check_request(request)
        elapsed = time.perf_counter() - started
        if elapsed > self.timeout and result.category is not Category.BACKEND_UNAVAILABLE:
            late_timeout(result, elapsed, self.timeout, request.reproduce)
        return result

    def release(self, model_path: os.PathLike | str) -> None:
        self.engine.release(model_path)
        if self._isolated is not None:
            self._isolated.release(model_path)
        if self.releases is not None:
            self.releases.release(model_path)

    def close(self) -> None:
        if self._isolated is not None:
            self._isolated.close()
        if self.releases is not None:
            self.releases.close()


def late_timeout(result: ParityResult, elapsed: float, timeout: float, reproduce: str) -> None:
    """An in-process configuration that finished, but later than the timeout: judged after the fact."""
    verdict = result.category.value
    result.fault = {"kind": "timeout", "in_process": True, "seconds": round(elapsed, 3), "timeout": timeout,
                    "verdict": verdict}
    result.category = Category.TIMEOUT
    head = (f"timeout on {result.config.id}: the configuration took {elapsed:.2f} s, more than --mnn-timeout "
            f"{timeout:g} s. It ran in-process (--mnn-isolate=never), so it could not be stopped, only judged "
            f"when it returned; its own verdict was {verdict}")
    rest = result.message if result.message else (f"\nreproduce: {reproduce}" if reproduce else "")
    result.message = head + ("\n" + rest if rest else "")
