"""The isolated worker: ``python -m pytest_mnn_parity.isolation.worker``.

It runs parity checks (and backend probes) for the parent (``isolation.py``)
in a process of its own, so that a segfault in MNN or a GPU driver, or a hang,
costs one configuration instead of the whole pytest run.

Protocol: JSON lines.  The parent writes requests to stdin; the worker answers
on a private copy of its original stdout.  fd 1 itself is pointed at stderr,
because MNN's C++ code prints to fd 1 and must never corrupt the protocol.  The
parent keeps stderr in a file: when the worker dies, its tail (with the Python
stack that ``faulthandler`` writes on SIGSEGV/SIGFPE/SIGABRT/SIGBUS/SIGILL, and
on SIGUSR1, which the parent sends before killing a worker that timed out) goes
into the failure message.
"""
from __future__ import annotations

import faulthandler
import os
import signal
import sys
import traceback

from ..core.timeline import mark

# Test fault injection, inert unless this variable is set.  "SIGSEGV:CPU-low"
# makes the worker send itself that signal right before each session run of
# configuration CPU-low (of any model); "SIGSEGV:probe-OPENCL" right before
# probing backend OPENCL; "GARBAGE:CPU-low" writes bytes that are not a reply
# on the protocol channel instead; several are separated by commas.  The tests use it to
# kill a worker by a real signal at a known point.
FAULT_INJECTION_ENV = "MNN_PARITY_TEST_FAULT_INJECTION"
# Set by the parent to its pid: the worker ends itself when the parent dies (Linux).
PARENT_PID_ENV = "MNN_PARITY_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def main() -> int:
    mark("worker main")
    proto = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    # Kept on fds of their own: capture_native_output swaps fds 1 and 2 during
    # every MNN call, and a crash happens precisely during those calls.
    crash_log = os.fdopen(os.dup(2), "w", buffering=1)
    faulthandler.enable(file=crash_log, all_threads=True)
    faulthandler.register(signal.SIGUSR1, file=crash_log, all_threads=True)
    _die_with_parent()
    stdin = sys.stdin.buffer

    mark("worker imports")
    from ..engine.engine import ParityEngine  # noqa: PLC0415
    from ..mnn import backends  # noqa: PLC0415 - after the fds are safe
    from ..mnn.library import mnn  # noqa: PLC0415
    from . import protocol

    from ..mnn.native_output import SINK_DIR_ENV, keep_in_file  # noqa: PLC0415

    # MNN's words during the call that kills this worker stay in a file the parent reads (policy.explain_fault),
    # in the folder the parent cleans up; a worker without one (an IsolatedEngine used alone) leaves no file.
    sink = keep_in_file() if os.environ.get(SINK_DIR_ENV) else None
    mark("worker imported engine")
    mnn()  # import MNN (and pay for it) before saying ready
    mark("worker imported MNN")
    init = protocol.loads(stdin.readline() or b'{"op": "exit"}')
    if init.get("op") != "init":
        return 2
    os.chdir(init.get("cwd") or os.getcwd())
    if sink is None and init.get("native_dir"):
        # Started early (``early.start_early``), before the parent made that folder: the parent names it here.
        os.environ[SINK_DIR_ENV] = init["native_dir"]
        sink = keep_in_file()
    engine = ParityEngine(protocol.settings_from_wire(init["settings"]))
    _install_fault_injection(crash_log, proto)
    from ..mnn.library import device_support_line, mnn_version  # noqa: PLC0415

    # MNN's start-up banner ("The device supports: i8sdot:1, fp16:1, ..."): what this CPU computes with.
    proto.write(protocol.dumps({"ready": True, "pid": os.getpid(), "device": device_support_line(),
                                "mnn": mnn_version()}))
    mark("worker ready")
    done = 0
    input_sets: dict = {}  # the parent's pickled input sets and sidecars, read once each
    savers: dict = {}  # one bundle_saver.BundleSaver per bundle folder: each reference is saved once per worker
    # A worker on another machine gets the parent's files as ``put`` lines: parent path -> the copy here.
    copies: dict[str, str] = {}
    copies_dir = None
    for line in stdin:
        request = protocol.loads(line)
        op = request.get("op")
        if op == "exit":
            break
        if op == "put":  # no reply: the check that follows answers (one round trip per check on a slow link)
            if copies_dir is None:
                import tempfile  # noqa: PLC0415

                copies_dir = tempfile.mkdtemp(prefix="mnn-parity-files-")
            from pathlib import Path  # noqa: PLC0415

            protocol.store_put(request, Path(copies_dir), copies)
            continue
        try:
            if op == "check":
                protocol.localise(request, copies)
                _seed_backend(backends, request.get("backend_status"))
                _seed_arithmetic(backends, request.get("arithmetic"))
                check = protocol.request_from_wire(request["request"], input_sets)
                done += 1
                crash_log.write(f"[mnn-parity worker {os.getpid()}] configuration #{done}: {check.config.id} of "
                                f"{check.model}\n")
                mark(f"worker check {check.config.id}")
                result = _check(engine, check, request, input_sets, savers)
                mark(f"worker checked {check.config.id}")
                reply = {"ok": True, "result": protocol.result_to_wire(result), "peak_rss_mb": peak_rss_mb()}
            elif op == "release":
                engine.release(copies.get(request["model"], request["model"]))
                reply = {"ok": True}
            elif op == "probe":
                crash_log.write(f"[mnn-parity worker {os.getpid()}] probing backend {request['backend']}\n")
                status = backends.probe_backend(request["backend"])
                backends.remember_status(status)
                reply = {"ok": True, "status": status.as_dict()}
            else:
                reply = {"ok": False, "error": f"unknown request {op!r}"}
        except Exception:  # noqa: BLE001 - a Python error goes back to the parent as text
            reply = {"ok": False, "error": traceback.format_exc()}
        proto.write(protocol.dumps(reply))
    proto.flush()
    mark("worker exit")
    if copies_dir is not None:
        import shutil  # noqa: PLC0415

        shutil.rmtree(copies_dir, ignore_errors=True)
    if sink is not None:
        try:
            os.remove(sink)
        except OSError:
            pass
    # Skip interpreter teardown: destroying MNN objects at exit is one more
    # chance to crash, and nothing is left to save.
    os._exit(0)


def _check(engine, check, message: dict, input_sets: dict, savers: dict):
    """``engine.check_request(check)`` with what the parent sent beside it; saves the outputs if asked."""
    from ..core.verdict import Category  # noqa: PLC0415
    from ..engine.results import ParityResult  # noqa: PLC0415
    from . import protocol  # noqa: PLC0415

    model = os.fspath(check.model)
    protocol.apply_declarations(engine, model, message.get("declarations"))
    sidecar = protocol.from_wire(message.get("sidecar"), input_sets)
    problem = None if sidecar is None else protocol.sidecar_problem(engine, model, check.variant, sidecar)
    if problem is not None:
        return ParityResult(model, check.config, Category.MODEL_ERROR, str(problem), log=problem.log)
    reference = protocol.from_wire(message.get("reference"), input_sets)
    if reference is not None:  # the parent's reference (another MNN release's, or its own): judged against it
        engine.provide_reference(model, reference, check.input_set)
    sink = engine.settings.output_sink
    if sink is not None:
        sink.label = message.get("artifact_label")
    result = engine.check_request(check)
    if message.get("release"):  # another MNN release than the parent's: say which one really ran
        from ..mnn.library import mnn_version  # noqa: PLC0415

        result.mnn_version = mnn_version()
    computed, result.computed = result.computed, None
    bundle = message.get("bundle")
    if bundle and computed is not None:
        from ..engine.bundle import BundleWriter  # noqa: PLC0415
        from ..regression.bundle_saver import BundleSaver  # noqa: PLC0415

        saver = savers.get(bundle["folder"])
        if saver is None:
            saver = savers[bundle["folder"]] = BundleSaver(engine, BundleWriter(bundle["folder"]), bundle["layers"])
        shown, result.model = result.model, bundle["label"]  # the bundle names the model as the report does
        saver.save(result, computed, variant=check.variant, config=check.config, case_id=bundle["case_id"],
                   set_name=bundle["set_name"])
        result.model = shown
    return result


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, MiB (Linux reports KiB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _seed_backend(backends, status) -> None:
    """Use the parent's discovery result instead of probing again (GPU probes take seconds)."""
    if status:
        backends.remember_status(backends.BackendStatus(**status), keep_known=True)


def _seed_arithmetic(backends, known) -> None:
    """Reuse the arithmetic an earlier worker measured: each probe creates GPU sessions (seconds per worker)."""
    from ..mnn import arithmetic as mnn_arithmetic  # noqa: PLC0415 - after the fds are safe, as in main()

    for backend, precision, arith in known or ():
        mnn_arithmetic.remember_arithmetic(backend, precision, mnn_arithmetic.Arithmetic(**arith))


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    expected = os.environ.get(PARENT_PID_ENV)
    if expected and os.getppid() != int(expected):  # the parent died before prctl took effect
        os._exit(3)


def _install_fault_injection(log, proto) -> None:
    specs = [part.strip() for part in os.environ.get(FAULT_INJECTION_ENV, "").split(",") if part.strip()]
    if not specs:
        return
    from ..mnn import (
        backends,  # noqa: PLC0415
        runner,
    )

    faults = {}
    for spec in specs:
        signame, _, where = spec.partition(":")
        faults[where] = (signame.upper(), None if signame.upper() == "GARBAGE" else getattr(signal, signame.upper()))

    def inject(where: str, what: str) -> None:
        if where in faults:
            signame, signum = faults[where]
            log.write(f"[mnn-parity worker {os.getpid()}] TEST FAULT INJECTION: {signame} before {what}\n")
            if signum is None:  # GARBAGE: bytes on the protocol channel, as a stray native write would leave
                proto.write(b"\xff\xfe not a protocol line\n")
            else:
                os.kill(os.getpid(), signum)

    original_probe, original_run = backends.probe_backend, runner.LoadedModel.run

    def probe(name):
        inject(f"probe-{name.upper()}", f"probing {name}")
        return original_probe(name)

    def run(self, config, inputs, observer=None):
        inject(config.id, f"running {config.id}")
        return original_run(self, config, inputs, observer)

    backends.probe_backend = probe
    runner.LoadedModel.run = run


if __name__ == "__main__":
    sys.exit(main())
