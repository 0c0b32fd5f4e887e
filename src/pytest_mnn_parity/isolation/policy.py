"""Which configurations run isolated, and the timeout: the policy between the plugin and the engines.

``--mnn-isolate`` modes:

* ``auto`` (default): every configuration runs in a worker process.  CPU ones
  share one warm worker for the whole run (replaced after a crash, so the next
  model gets a fresh one), where the other backends' probes run too, before
  any model; every other backend gets workers of its own, a worker per model
  (or per run, ``--mnn-worker-scope``): each imports Python, numpy and MNN
  side by side with the others', and a backend's driver state never meets
  another backend's in one process.
* ``always``: everything runs in workers, CPU included, by ``--mnn-worker-scope``
  (by default a fresh process per model: no state carried from one model to the
  next).
* ``never``: everything runs in-process; ``--mnn-timeout`` can then only judge
  a configuration after it returns.

Why this default: GPU and NPU backends go through drivers and young backend
code, where segfaults and hangs happen (and where discovery itself can crash).
The CPU backend crashes too: MNN 3.6.1 aborts while creating a CPU session for
a SequenceConstruct + ConcatFromSequence graph, and one such model in a folder
of many used to end the run (exit 134) with every later model untested.  One
warm worker serves all CPU work cheaply: Python and MNN import once per run,
the model loads and the reference is computed once in the worker, and the
measured cost is about a second per run (docs/reliability.md).  A crash costs
the item that ran, names MNN's last words and the model's op types, and the
run goes on.
"""
from __future__ import annotations

import os
import tempfile
import time
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from ..core.categories import Category
from ..engine.request import Checker, CheckRequest
from ..engine.results import ParityResult, ParitySettings
from ..mnn import backends, native_output
from ..onnx.ops import op_types
from .engine import SPARE_MIN_CORES, IsolatedEngine, close_all, release_all, unavailable_result

if TYPE_CHECKING:  # pragma: no cover
    from ..engine.engine import ParityEngine  # annotations: a run whose checks all run in workers never imports it (issue 22)

# Isolated configurations without --mnn-timeout still get this bound, so a hung
# GPU driver cannot stall CI until its job limit.
DEFAULT_ISOLATED_TIMEOUT = 600.0


def isolated_backends(mode: str, names: Sequence[str], timeout: float | None) -> frozenset[str]:
    if mode == "never":
        return frozenset()
    return frozenset(names)


# The backend whose configurations auto gives to one warm run-scoped worker.
SHARED_WORKER_BACKEND = "CPU"


class Isolation(Checker):
    """Sends each configuration to the in-process engine or to an isolated one."""

    def __init__(self, engine: ParityEngine | Callable[[], ParityEngine], mode: str, timeout: float | None,
                 names: Sequence[str], worker_scope: str = "model", *, settings: ParitySettings | None = None,
                 declarations: Any = None):
        """``engine``: the in-process engine, or a function that makes it when a configuration first runs
        in-process; with a function, ``settings`` and ``declarations`` (``engine.declarations.Declarations``)
        are what the workers get.  A run whose configurations all run isolated then never imports or builds the
        in-process engine (60-80 ms of the pytest process's critical path, issue 22)."""
        if isinstance(engine, Checker):
            self._engine: ParityEngine | None = engine
            self.settings = engine.settings
            self.declarations = engine
        else:
            self._engine = None
            self._make_engine = engine
            self.settings = settings
            self.declarations = declarations
        self.mode = mode
        self.timeout = timeout
        self.worker_scope = worker_scope
        self.isolated_set = isolated_backends(mode, [backends.canonical_backend(n) for n in names], timeout)
        self._isolated: IsolatedEngine | None = None
        self._shared: IsolatedEngine | None = None
        # auto: one engine per non-CPU backend, each with workers of its own.
        self._by_backend: dict[str, IsolatedEngine] = {}
        self._expected_models: int | None = None
        # Other MNN releases' engines (``versions.ReleaseEngines``), when the run asks for them.
        self.releases = None
        # Emulated CPUs and other machines (``places.PlaceEngines``), when the run asks for them.
        self.places = None
        self._sinks: tempfile.TemporaryDirectory | None = None

    @property
    def engine(self) -> ParityEngine:
        """The in-process engine, made on first use."""
        if self._engine is None:
            self._engine = self._make_engine()
        return self._engine

    def _keep_last_words(self) -> None:
        """Workers keep what MNN says during each call in a folder of this run's (native_output.keep_in_file),
        so a worker that dies mid-call leaves its last words; the folder goes when the run closes."""
        if self._sinks is None:
            self._sinks = tempfile.TemporaryDirectory(prefix="mnn-parity-native-")
            os.environ[native_output.SINK_DIR_ENV] = self._sinks.name

    @property
    def isolated(self) -> IsolatedEngine:
        """The engine of isolated configurations by --mnn-worker-scope (auto's CPU ones: ``shared``)."""
        if self._isolated is None:
            self._keep_last_words()
            self._isolated = IsolatedEngine(self.settings, timeout=self._timeout(),
                                            worker_per_model=self.worker_scope == "model", declarations=self.declarations)
        return self._isolated

    @property
    def shared(self) -> IsolatedEngine:
        """auto's CPU engine: one warm worker for every model of the run."""
        if self._shared is None:
            self._keep_last_words()
            self._shared = IsolatedEngine(self.settings, timeout=self._timeout(), worker_per_model=False,
                                          declarations=self.declarations)
        return self._shared

    def backend_engine(self, backend: str) -> IsolatedEngine:
        """auto's engine for one non-CPU backend: workers of its own."""
        engine = self._by_backend.get(backend)
        if engine is None:
            self._keep_last_words()
            engine = self._by_backend[backend] = IsolatedEngine(
                self.settings, timeout=self._timeout(), worker_per_model=self.worker_scope == "model",
                declarations=self.declarations)
            engine.expected_models = self._expected_models
        return engine

    def _timeout(self) -> float:
        return self.timeout if self.timeout is not None else DEFAULT_ISOLATED_TIMEOUT

    def _engine_for(self, backend: str) -> IsolatedEngine:
        if self.mode == "auto":
            return self.shared if backend == SHARED_WORKER_BACKEND else self.backend_engine(backend)
        return self.isolated

    def _engines(self) -> list[IsolatedEngine]:
        return [e for e in (self._isolated, self._shared, *self._by_backend.values()) if e is not None]

    def start(self) -> None:
        """Start the first worker now, so its imports overlap pytest's collection.

        In ``auto``, each other isolated backend that discovery kept from an earlier run (pytest's cache) says
        is available gets its worker now too, beside the CPU one: otherwise each backend's first item waits for
        Python, numpy and MNN to import in a fresh process (about half a second on the H200 machine).  Only on
        machines with cores to spare (``engine.SPARE_MIN_CORES``), as for any spare worker.

        Not done: creating each backend's runtimes ahead in these workers.  Measured on the H200 (demo, full
        matrix), it made the isolated matrix slower, 5.4 s against 4.4 s without it, even when it stopped at
        the first check: the drivers serialise the backends' context set-up, so making Vulkan's runtimes ahead
        delayed OpenCL's and CUDA's checks more than it saved Vulkan's.
        """
        if not self.isolated_set:
            return
        if self.mode != "auto":
            self.isolated  # noqa: B018 - starts a worker
            return
        self.shared  # noqa: B018 - starts a worker
        if self.shared.cores >= SPARE_MIN_CORES:
            for name in sorted(self.isolated_set):
                if name != SHARED_WORKER_BACKEND and getattr(backends.known_status(name), "available", False):
                    self.backend_engine(name)  # starts its first worker

    def isolates(self, backend: str) -> bool:
        return backend in self.isolated_set

    def per_model(self, backend: str) -> bool:
        """Whether ``backend``'s configurations run in workers started per model (what ``expect_models`` counts)."""
        return self.isolates(backend) and not (self.mode == "auto" and backend == SHARED_WORKER_BACKEND)

    def expect_models(self, count: int) -> None:
        """How many models will run in per-model workers: no spare worker is started for a model that will not
        come."""
        self._expected_models = count
        if self.mode == "auto":
            for engine in self._by_backend.values():
                engine.expected_models = count
        elif count or self._isolated is not None:
            self.isolated.expected_models = count

    def backend_status(self, name: str) -> backends.BackendStatus:
        name = backends.canonical_backend(name)
        if not self.isolates(name):
            return backends.discover([name])[name]
        if self.mode == "auto":
            # The CPU is discovered in-process (discovery opens no model of yours); other backends are probed in
            # the run's warm worker, before any model runs there: a CPU-only machine starts one worker, not two.
            return backends.discover([name])[name] if name == SHARED_WORKER_BACKEND else \
                self.shared.backend_status(name)
        return self.isolated.backend_status(name)

    def check_request(self, request: CheckRequest, bundle: Mapping[str, Any] | None = None,
                      sidecar: Any = None) -> ParityResult:
        """``request`` in a worker or in-process, as the policy says.  ``bundle`` and ``sidecar`` are for an
        isolated worker (``IsolatedEngine.check_request``); in-process, the caller saves ``result.computed``
        and has checked the sidecar itself."""
        backend = backends.canonical_backend(request.config.backend)
        if self.isolates(backend):
            if self.mode == "auto" and backend != SHARED_WORKER_BACKEND and backend not in self._by_backend:
                # Making the per-model engine starts a worker ahead of need: on a machine without the backend
                # (a CPU-only one: every GPU item is skipped) that worker would import MNN for nothing, beside
                # the run's CPU work.  The status is the one the engine would read (probed in the warm worker).
                status = self.backend_status(backend)
                if not status.available and status.fault is None:
                    return unavailable_result(request, status)
            result = self._engine_for(backend).check_request(request, bundle=bundle, sidecar=sidecar)
            if result.category in (Category.CRASHED, Category.TIMEOUT) and result.fault:
                explain_fault(result, request.model)
            return result
        if self.timeout is None:
            return self.engine.check_request(request)
        started = time.perf_counter()
        result = self.engine.check_request(request)
        elapsed = time.perf_counter() - started
        if elapsed > self.timeout and result.category is not Category.BACKEND_UNAVAILABLE:
            late_timeout(result, elapsed, self.timeout, request.reproduce)
        return result

    def release(self, model_path: os.PathLike | str) -> None:
        if self._engine is not None:
            self._engine.release(model_path)
        release_all(self._engines(), model_path)
        if self.releases is not None:
            self.releases.release(model_path)
        if self.places is not None:
            self.places.release(model_path)

    def close(self, wait: bool = True) -> None:
        """End every worker.  ``wait=False`` (the plugin, at the end of the run): workers are told to exit and
        not waited for; on the H200 waiting for GPU workers' driver teardown took 0.4-0.6 s of every run."""
        close_all(self._engines(), wait=wait)
        if self.releases is not None:
            self.releases.close()
        if self.places is not None:
            self.places.close()
        if self._sinks is not None:
            if os.environ.get(native_output.SINK_DIR_ENV) == self._sinks.name:
                del os.environ[native_output.SINK_DIR_ENV]
            self._sinks.cleanup()
            self._sinks = None


def explain_fault(result: ParityResult, model_path: os.PathLike | str) -> None:
    """A worker that died or hung on a model: add MNN's last words and the model's ONNX op types (where to
    look, and what the conformance scoreboard counts the crash against) under the message's first line."""
    fault = result.fault or {}
    native = native_output.last_words_of(fault["pid"]) if fault.get("pid") else ""
    fault["mnn_said"] = native.strip()
    lines = result.message.splitlines() or [""]
    extra = []
    said = last_words(native) or last_words(result.log)
    if said:
        extra.append(f"MNN said:  {said}")
    ops = op_types(model_path)
    if ops:
        extra.append(f"op types:  {', '.join(ops)} (the model's ONNX ops; one of them is where MNN fails)")
    result.message = "\n".join(lines[:1] + extra + lines[1:])


def last_words(text: str) -> str:
    """What MNN printed last before the process died: the worker's own progress lines, MNN's greeting and the
    Python stack that faulthandler wrote after the fault are no words of MNN's."""
    said = []
    for line in (text or "").splitlines():
        line = line.strip()
        if line.startswith(("Fatal Python error", "Current thread", "Thread 0x", "File \"", "Extension modules")):
            break
        if line and not line.startswith(("The device supports", "MNN use ", "[mnn-parity worker")):
            said.append(line)
    return " | ".join(said[-3:])[:300]


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
