"""Run configurations in worker processes, so a crash or a hang costs one item, not the run.

``IsolatedEngine`` has the engine's interface (``check``, ``release``) and
works without pytest.  Each model gets a worker process (``worker.py``) that
stays alive across that model's configurations, so the model is loaded and its
reference computed once, as in-process.  A spare worker is started ahead of
need (on machines with cores to spare) so the next model does not wait for
Python and MNN to import.  The process itself is ``worker_process.Worker``.

* A worker that dies (by a signal or an exit) yields category ``crashed`` with
  the signal's name and the tail of the worker's stderr (where ``faulthandler``
  wrote the Python stack); the model's next configuration gets a fresh worker.
* A configuration that runs longer than the timeout yields ``timeout``: the
  worker is asked to dump its stack (SIGUSR1), then killed (SIGKILL).

Backend probes of isolated backends run in a worker too: probing is where a
broken GPU driver usually crashes first.
"""
from __future__ import annotations

import atexit
import dataclasses
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from ..core.tolerances import resolve
from ..core.categories import Category
from ..engine.request import Checker, CheckRequest
from ..engine.results import ParityResult, ParitySettings
from ..mnn import backends
from ..mnn import arithmetic as mnn_arithmetic
from ..mnn.model import model_key
from . import protocol
from .launch import WorkerCommand
from .process import Worker, WorkerDied, WorkerTimedOut

if TYPE_CHECKING:  # pragma: no cover
    from ..engine.engine import ParityEngine  # annotations: a run whose checks all run in workers never imports it (issue 22)

PROBE_TIMEOUT = 60.0  # GPU session creation can take seconds (kernel compilation)
SPARE_MIN_CORES = 4  # below this, a worker importing next to running checks costs more than it saves


class WorkerError(RuntimeError):
    """A Python exception inside the worker (not a crash): re-raised in the parent like an in-process one."""


class IsolatedEngine(Checker):
    """``ParityEngine.check`` in worker processes; one worker per model (``worker_per_model``).

    ``timeout`` (seconds, per configuration) bounds each check, including, for
    a model's first configuration in a fresh worker, loading the model and
    computing its reference.  Worker start-up is not counted.

    ``prespawn`` starts a worker at once, and (on machines with cores to spare)
    the next one whenever one is taken, so a model rarely waits for Python and
    MNN to import.  On fewer cores the next worker's import would compete with
    the running checks (MNN's CPU threads spin while they wait, and suffer from
    any competition), so it is started when needed.  ``expected_models``, when
    known (the plugin sets it), stops the spare once no model is left to use it.

    ``declarations``: an in-process engine whose per-model declarations (a
    sidecar's ``[shapes]`` and ``[stream]``, see ``protocol.declarations``)
    the workers get with each check of that model.
    """

    def __init__(self, settings: ParitySettings | None = None, *, timeout: float | None = None,
                 worker_per_model: bool = True, prespawn: bool = True, declarations: ParityEngine | None = None,
                 python: os.PathLike | str | None = None, command: WorkerCommand | None = None):
        # Another MNN release's environment (``envs.MnnEnv.python``), or another place (``launch.py``: an
        # emulated CPU, another machine): its workers run that MNN on that CPU, so what they find about backends
        # and arithmetic is theirs, kept here instead of in this process's shared caches.
        self.python = python
        self.command = command
        foreign = python is not None or command is not None
        self._statuses: dict[str, backends.BackendStatus] | None = {} if foreign else None
        self._arithmetic: dict | None = {} if foreign else None
        # What MNN said about the CPU when the first worker imported it ("The device supports: fp16:1, ...").
        self.device_features: dict[str, int] | None = None
        self.worker_mnn_version: str | None = None  # the MNN release the workers imported
        self._prepared = self._banner_read = False
        self.settings = settings or ParitySettings()
        protocol.settings_to_wire(self.settings)  # a setting no worker can take fails here, not in the first check
        self.declarations = declarations
        self._files = protocol.PickleFiles()
        self.timeout = timeout
        self.worker_per_model = worker_per_model
        self.prespawn = prespawn
        self._workers: dict[Path, Worker] = {}
        self._shared: Worker | None = None
        self._spare: Worker | None = None
        self._retired: list[Worker] = []
        self._taken = 0
        self.expected_models: int | None = None
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self._closed = False
        atexit.register(self.close)
        if prespawn:
            self._spare = self._new_worker()

    # -- workers ----------------------------------------------------------------
    def _new_worker(self) -> Worker:
        if self.command is not None and not self._prepared:
            self.command.prepare()  # launch.LaunchError: the caller says why the place cannot run
            self._prepared = True
        return Worker(self.settings, python=self.python, command=self.command)

    def _read_banner(self, worker: Worker) -> None:
        if not self._banner_read:
            self._banner_read = True
            self.device_features = device_features(worker.hello.get("device", ""))
            self.worker_mnn_version = worker.hello.get("mnn")

    def _take(self) -> Worker:
        spare, self._spare = self._spare, None
        worker = spare if spare is not None and spare.alive() else self._new_worker()
        if spare is not None and spare is not worker:
            spare.close(kill=True)
        self._taken += 1
        # A run-scoped worker serves every model: a spare is only wanted after a crash, so none waits.
        more = self.worker_per_model and (self.expected_models is None or self._taken < self.expected_models)
        if self.prespawn and more and self.cores >= SPARE_MIN_CORES:
            self._spare = self._new_worker()
        return worker

    def _worker_for(self, key: Path) -> Worker:
        if not self.worker_per_model:
            if self._shared is None or not self._shared.alive():
                self._shared = self._take()
            return self._shared
        worker = self._workers.get(key)
        if worker is None or not worker.alive():
            worker = self._workers[key] = self._take()
        return worker

    def _forget(self, key: Path, worker: Worker) -> None:
        if self._workers.get(key) is worker:
            del self._workers[key]
        if self._shared is worker:
            self._shared = None
        worker.close()

    def worker_pid(self, model_path: os.PathLike | str) -> int | None:
        worker = self._shared if not self.worker_per_model else self._workers.get(model_key(model_path))
        return worker.pid if worker is not None else None

    # -- engine interface -------------------------------------------------------
    def check_request(self, request: CheckRequest, bundle: Mapping[str, Any] | None = None,
                      sidecar: Any = None, reference: Any = None) -> ParityResult:
        """``ParityEngine.check_request`` in a worker; the request travels whole (``protocol.request_to_wire``).

        ``sidecar`` (``sidecar.Sidecar``): checked against the model in the worker first; a mismatch is
        the ``model_error`` the plugin gives in-process.

        ``bundle`` (with ``settings.keep_outputs``): {"folder", "layers", "label", "case_id", "set_name"};
        the worker saves the outputs there itself (``bundle_saver``).  Results never carry ``computed``.

        ``reference`` (``results.Reference``): the reference outputs the worker judges against instead of
        computing its own (another MNN release judged against the same reference as every other).
        """
        model_path, config = request.model, request.config
        declared = protocol.declarations(self.declarations, model_path)
        labels = protocol.fault_labels(self.settings, model_path, request.input_set, request.api, declared)
        status = self.backend_status(config.backend)
        if status.fault:
            return self._fault_result(request, status.fault, labels)
        if not status.available:
            return unavailable_result(request, status)
        key = model_key(model_path)
        worker = self._worker_for(key)
        message = {"op": "check", "request": protocol.request_to_wire(request, self._files),
                   "backend_status": status.as_dict(), "arithmetic": self._known_arithmetic(),
                   "reference": self._files.to_wire(reference),
                   "release": self.python is not None or self.command is not None,
                   "declarations": declared, "artifact_label": getattr(self.settings.output_sink, "label", None),
                   "bundle": dict(bundle) if bundle and self.settings.keep_outputs else None,
                   "sidecar": self._files.to_wire(sidecar)}
        started = time.monotonic()
        try:
            worker.checks += 1
            worker.wait_ready()
            self._read_banner(worker)
            if worker.command.remote:
                for put in protocol.put_messages(message, worker.sent):
                    worker.send(put)
            started = time.monotonic()
            reply = worker.request(message, self.timeout)
        except WorkerTimedOut:
            returncode = worker.kill(dump_stack=True)
            fault = self._fault(worker, "timeout", returncode, time.monotonic() - started)
            self._forget(key, worker)
            return self._fault_result(request, fault, labels)
        except WorkerDied as died:
            fault = self._fault(worker, "crashed", died.returncode, time.monotonic() - started)
            fault["detail"] = died.detail
            self._forget(key, worker)
            return self._fault_result(request, fault, labels)
        if not reply.get("ok"):
            raise WorkerError(f"the isolated worker (pid {worker.pid}) raised:\n{reply.get('error')}")
        result = protocol.result_from_wire(reply["result"])
        result.model = str(model_path)  # a remote worker names its copy
        result.worker = {"pid": worker.pid, "index": worker.checks, "peak_rss_mb": reply.get("peak_rss_mb")}
        if result.arithmetic is not None:  # measured once per run, not once per worker (seconds on a GPU)
            if self._arithmetic is not None:
                self._arithmetic[(config.backend, config.precision)] = result.arithmetic
            else:
                mnn_arithmetic.remember_arithmetic(config.backend, config.precision, result.arithmetic)
        return result

    def release(self, model_path: os.PathLike | str) -> None:
        key = model_key(model_path)
        if self.worker_per_model:
            worker = self._workers.pop(key, None)
            if worker is not None:
                worker.retire()
                self._retired.append(worker)
            self._reap_retired()
        elif self._shared is not None and self._shared.alive():
            try:
                self._shared.request({"op": "release", "model": os.fspath(model_path)}, self.timeout)
            except (WorkerDied, WorkerTimedOut):
                self._shared.kill()
                self._shared.close()
                self._shared = None

    def retire_workers(self) -> None:
        """Ask every worker to exit now, without waiting: several engines' workers then end side by side (a
        GPU process's driver teardown takes a fraction of a second), and ``close`` reaps them."""
        for worker in list(self._workers.values()) + [w for w in (self._shared,) if w is not None]:
            worker.retire()

    def close(self, wait: bool = True) -> None:
        """End every worker; ``wait=False`` (the end of a run) does not wait for them to exit
        (``process.Worker.close``)."""
        if self._closed:
            return
        self._closed = True
        self.retire_workers()
        workers = list(self._workers.values()) + [w for w in (self._shared,) if w is not None] + self._retired
        spare = self._spare
        self._workers.clear()
        self._retired = []
        self._shared = self._spare = None
        if spare is not None:
            spare.close(kill=True, wait=wait)  # probably still importing: nothing to finish
        for worker in workers:
            worker.close(wait=wait)
        self._files.close()
        atexit.unregister(self.close)

    def _reap_retired(self) -> None:
        still = []
        for worker in self._retired:
            if worker.alive():
                still.append(worker)
            else:
                worker.close()
        self._retired = still

    # -- backends ---------------------------------------------------------------
    def backend_status(self, name: str) -> backends.BackendStatus:
        """Discovery of ``name`` in a worker, once per process (shared with in-process discovery)."""
        name = backends.canonical_backend(name)
        if self._statuses is not None:  # another release: probed in its own worker, once per engine
            if name not in self._statuses:
                self._statuses[name] = (backends.BackendStatus(name, False, None, f"{name}: disabled by "
                                                               "MNN_PARITY_DISABLE_BACKENDS")
                                        if name in backends.forced_unavailable() else self.probe(name))
            return self._statuses[name]
        known = backends.known_status(name)
        if known is not None:
            return known
        if name in backends.forced_unavailable():
            return backends.discover([name])[name]
        status = self.probe(name)
        backends.remember_status(status)
        return status

    def probe(self, name: str) -> backends.BackendStatus:
        worker = self._spare if self._spare is not None and self._spare.alive() else None
        if worker is None:
            worker = self._spare = self._new_worker()
        timeout = max(self.timeout or 0.0, PROBE_TIMEOUT)
        started = time.monotonic()
        try:
            worker.wait_ready()
            self._read_banner(worker)
            started = time.monotonic()
            reply = worker.request({"op": "probe", "backend": name}, timeout)
        except (WorkerTimedOut, WorkerDied) as exc:
            if isinstance(exc, WorkerTimedOut):
                kind, returncode = "timeout", worker.kill(dump_stack=True)
                reason = f"{name}: its probe did not finish within {timeout:g} s; the isolated worker was killed"
            else:
                kind, returncode = "crashed", exc.returncode
                reason = f"{name}: its probe crashed the isolated worker ({describe_exit(returncode)})"
            fault = self._fault(worker, kind, returncode, time.monotonic() - started)
            fault.update(backend=name, timeout=timeout)
            self._drop_spare(worker)
            return backends.BackendStatus(name, False, None, reason, fault["stderr_tail"], fault)
        if not reply.get("ok"):
            return backends.BackendStatus(name, False, None, f"{name}: probe failed: {reply.get('error')}")
        return backends.BackendStatus(**reply["status"])

    def _known_arithmetic(self) -> list[list[Any]]:
        """What is known of each configuration's arithmetic (in this MNN release), for a worker to reuse instead
        of probing."""
        return _arithmetic_wire(mnn_arithmetic.known_arithmetic() if self._arithmetic is None else self._arithmetic)

    def _drop_spare(self, worker: Worker) -> None:
        if self._spare is worker:
            self._spare = None
        worker.close()

    # -- faults -----------------------------------------------------------------
    def _fault(self, worker: Worker, kind: str, returncode: int | None, seconds: float) -> dict[str, Any]:
        signame = None
        if returncode is not None and returncode < 0:
            try:
                signame = signal.Signals(-returncode).name
            except ValueError:
                signame = f"signal {-returncode}"
        return {"kind": kind, "pid": worker.pid, "index": worker.checks, "returncode": returncode,
                "signal": signame, "seconds": round(seconds, 3), "timeout": self.timeout,
                "stderr_tail": worker.stderr_tail(), "where": worker.command.label,
                "remote": worker.command.remote}

    def _fault_result(self, request: CheckRequest, fault: dict[str, Any],
                      labels: Mapping[str, Any] | None = None) -> ParityResult:
        model_path, config = request.model, request.config
        category = Category.TIMEOUT if fault["kind"] == "timeout" else Category.CRASHED
        labels = dict(labels or {"input_set": f"seeded:{self.settings.seed}"})
        result = ParityResult(str(model_path), config, category, "", tolerance=resolve(
            config.backend, config.precision, *request.tolerance_layers), seconds=fault["seconds"],
            log=fault["stderr_tail"], fault=fault, worker={"pid": fault["pid"], "index": fault["index"]},
            variant=request.variant, **labels)
        result.message = fault_message(result, model_path, request.reproduce)
        return result


def release_all(engines: Iterable[IsolatedEngine], model_path: os.PathLike | str) -> None:
    """``model_path`` is done: each engine lets it go (a per-model worker retires)."""
    for engine in engines:
        engine.release(model_path)


def close_all(engines: Iterable[IsolatedEngine], wait: bool = True) -> None:
    """Close several engines: every worker is told to exit before any is waited for, so they end side by side
    (a GPU process's driver teardown takes a fraction of a second); ``wait=False``: none is waited for."""
    engines = list(engines)
    for engine in engines:
        engine.retire_workers()
    for engine in engines:
        engine.close(wait=wait)


def unavailable_result(request: CheckRequest, status: backends.BackendStatus) -> ParityResult:
    """A configuration of a backend discovery found missing: skipped with the reason, no worker involved."""
    return ParityResult(str(request.model), request.config, Category.BACKEND_UNAVAILABLE, status.reason,
                        forward_type=status.forward_type, variant=request.variant)


def device_features(text: str) -> dict[str, int] | None:
    """MNN's start-up banner, ``The device supports: i8sdot:1, fp16:1, i8mm: 0, sve2: 0, sme2: 0``, as
    {feature: 0/1}; None when the text has no banner (x86 builds print none)."""
    for line in (text or "").splitlines():
        _, found, rest = line.partition("The device supports:")
        if found:
            features = {}
            for part in rest.split(","):
                name, _, value = part.partition(":")
                if name.strip() and value.strip().isdigit():
                    features[name.strip()] = int(value.strip())
            return features
    return None


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "it stopped answering and could not be killed"
    if returncode < 0:
        try:
            sig = signal.Signals(-returncode)
            return f"{sig.name}, {signal.strsignal(sig) or 'signal'}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


def fault_message(result: ParityResult, model_path, reproduce: str) -> str:
    fault, config = result.fault or {}, result.config
    if fault.get("backend"):
        what = ("did not finish within {:g} s; the worker was killed".format(fault["timeout"])
                if result.category is Category.TIMEOUT else f"killed it ({describe_exit(fault['returncode'])})")
        head = (f"{result.category.value} on {config.id}: probing backend {fault['backend']} in an isolated worker "
                f"(pid {fault['pid']}) {what}")
        lines = [head, f"model:     {model_path} (never loaded: the backend failed before any model ran on it)",
                 f"next:      every configuration of {fault['backend']} fails the same way; other backends are "
                 "unaffected. Exclude it with --mnn-backends, or MNN_PARITY_DISABLE_BACKENDS="
                 f"{fault['backend']} to skip it"]
        return "\n".join(lines + _tail_lines(fault) + (["", f"reproduce: {reproduce}"] if reproduce else []))
    if result.category is Category.TIMEOUT:
        head = (f"timeout on {config.id}: the configuration did not finish within {fault['timeout']:g} s "
                f"(--mnn-timeout); its isolated worker (pid {fault['pid']}) was killed")
    elif fault.get("detail"):
        head = f"crashed on {config.id}: the isolated worker (pid {fault['pid']}) running this configuration: " \
               f"{fault['detail']}"
    else:
        head = (f"crashed on {config.id}: the isolated worker (pid {fault['pid']}) running this configuration "
                f"died ({describe_exit(fault['returncode'])}) after {fault['seconds']:.2f} s")
    order = ("the first configuration in this worker, so it also loaded the model and computed the reference"
             if fault["index"] == 1 else f"configuration #{fault['index']} in this worker")
    lines = [head,
             f"model:     {model_path}",
             f"ran on:    requested {config.backend}, precision {config.precision}, {config.how()}; "
             f"{order}",
             f"inputs:    {result.input_set}" + (f" ({result.api} API)" if result.api else ""),
             "next:      this model's remaining configurations run in a fresh worker; other models are unaffected"]
    if fault.get("remote") and fault.get("returncode") == 255:
        lines.append(f"worker:    {fault.get('where')}: exit code 255 is ssh's own: the connection was lost or "
                     "refused (ssh's last words below); the worker on the other side ended with it")
    elif fault.get("where") and fault.get("where") != "this Python":
        lines.append(f"worker:    {fault['where']}")
    lines += _tail_lines(fault)
    if reproduce:
        lines += ["", f"reproduce: {reproduce}"]
    return "\n".join(lines)


def _tail_lines(fault: Mapping[str, Any]) -> list[str]:
    tail = fault.get("stderr_tail") or ""
    if not tail:
        return []
    return (["", "worker stderr (last lines; the Python stack is faulthandler's):"]
            + ["  " + line for line in tail.splitlines()])


def _arithmetic_wire(known: Mapping) -> list[list[Any]]:
    return [[backend, precision, dataclasses.asdict(arith)] for (backend, precision), arith in known.items()]
