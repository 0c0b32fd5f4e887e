#!/usr/bin/env python
"""How much does pytest-mnn-parity cost on top of the bare MNN work it drives?

Three comparisons, all measured in one process, interleaved and repeated
(median of ``--rounds``); see benchmarks/README.md for what each one counts.

1. **raw**: the MNN calls the default matrix needs, written against the MNN
   Python API with no plugin code (load, 5 sessions, 2 reference runs + 2 runs
   per CPU precision, inputs copied in before every run, outputs copied out).
2. **engine**: ``ParityEngine(ParitySettings()).check(...)`` over the default
   matrix (7 backends x 4 precisions; the 6 unavailable backends are skipped
   after a warm, once-per-process discovery), a fresh engine per sample.
3. **end to end**: ``python -m pytest -p no:cacheprovider --mnn-only
   --mnn-model MODEL -q`` in a subprocess against a ``python -c`` subprocess
   doing the raw work, so interpreter start-up and imports count on both sides;
   peak RSS of each child comes from ``os.wait4``.

Ratios are reported, never asserted.  Usage::

    python benchmarks/bench_parity.py [--rounds 5] [--json out.json] [--profile]
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO = "fixtures/demo/lama_like.mnn"
DEEP = "fixtures/deep/deep_fp32.mnn"
GOAL = 1.15

# The raw work.  Kept as source text so that the very same code runs in this
# process (exec) and in a bare ``python -c`` child (end to end), where it
# imports nothing but numpy, MNN and - for the silenced variants - the
# plugin's fd-capture module.  Inputs are assumed float32 NCHW (true for the
# shipped fixtures).
RAW_SRC = r'''
import contextlib

import numpy as np

PRECISION_CODES = {"normal": 0, "high": 1, "low": 2, "Low_BF16": 3}  # pymnn ignores the string "normal"


def _capture_fn():
    """The plugin's fd-level capture, without importing the plugin's package (its __init__ loads the engine)."""
    import sys
    module = sys.modules.get("pytest_mnn_parity.mnn.native_output")
    if module is None:
        module = sys.modules.get("_bench_native_output")
    if module is None:
        import importlib.util
        import os
        where = importlib.util.find_spec("pytest_mnn_parity").submodule_search_locations[0]
        spec = importlib.util.spec_from_file_location(
            "_bench_native_output", os.path.join(where, "mnn", "native_output.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules["_bench_native_output"] = module
        spec.loader.exec_module(module)
    return module.capture_native_output


def raw_matrix(MNN, path, capture="once", threads=4, seed=0):
    """capture: "none" | "once" (one capture around everything) | "per-call" (like the plugin:
    one around the load, each createSession and each run)."""
    if capture == "none":
        whole = call = contextlib.nullcontext
    else:
        capture_native_output = _capture_fn()
        if capture == "once":
            whole, call = capture_native_output, contextlib.nullcontext
        else:
            whole, call = contextlib.nullcontext, capture_native_output
    with whole():
        with call():
            interp = MNN.Interpreter(str(path))
        with call():
            # At the items' thread count, as the engine's reference (a 1-thread reference is noise, not a finding).
            ref = interp.createSession({"backend": "CPU", "precision": PRECISION_CODES["high"], "numThread": threads})
        shapes = {name: tuple(t.getShape()) for name, t in interp.getSessionInputAll(ref).items()}
        out_names = list(interp.getSessionOutputAll(ref))
        sets = []
        for s in (seed, seed + 1):
            rng = np.random.default_rng(s)
            sets.append({name: rng.random(shape, dtype=np.float32) for name, shape in shapes.items()})

        def run(session, inputs):
            with call():
                for name, arr in inputs.items():
                    tmp = MNN.Tensor(arr.shape, MNN.Halide_Type_Float, arr, MNN.Tensor_DimensionType_Caffe)
                    interp.getSessionInput(session, name).copyFrom(tmp)
                rc = interp.runSession(session)
                outs = {}
                for name in out_names:
                    out = interp.getSessionOutput(session, name)
                    host = MNN.Tensor(out, out.getDimensionType())
                    out.copyToHostTensor(host)
                    outs[name] = np.array(host.getNumpyData(), copy=True)
            return rc, outs

        results = [run(ref, sets[0]), run(ref, sets[1])]
        for code in (0, 1, 2, 3):  # normal, high, low, Low_BF16
            with call():
                session = interp.createSession({"backend": "CPU", "precision": code, "numThread": threads})
            results.append(run(session, sets[0]))
            results.append(run(session, sets[1]))
        del interp  # MNN frees sessions with their interpreter (the engine's release() does the same)
    return results


def child_main(argv):
    import sys
    path, capture = argv[1], argv[2]
    if capture == "none":
        import MNN
    else:
        with _capture_fn()():
            import MNN
    results = raw_matrix(MNN, path, capture)
    bad = [rc for rc, _ in results if rc != 0]
    sys.exit(1 if bad or len(results) != 10 else 0)
'''

_RAW: dict = {}


def raw_ns() -> dict:
    if not _RAW:
        exec(compile(RAW_SRC, "<bench_parity raw>", "exec"), _RAW)
    return _RAW


# ---------------------------------------------------------------------------- helpers

def median(xs):
    return statistics.median(xs) if xs else float("nan")


@contextlib.contextmanager
def quiet_fds():
    """Send fds 1/2 to /dev/null *outside* the timed region (for the uncaptured raw variant)."""
    import ctypes

    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved + [devnull]:
            os.close(fd)


def timed(fn, inner: int, quiet: bool = False) -> float:
    """Mean seconds of ``inner`` calls of ``fn``."""
    gc.collect()
    ctx = quiet_fds() if quiet else contextlib.nullcontext()
    with ctx:
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        end = time.perf_counter()
    return (end - start) / inner


# Peak RSS of a child: read from the child itself (VmHWM of its post-exec address
# space, written by an atexit hook).  getrusage/wait4's ru_maxrss cannot be used:
# subprocess starts children with vfork, and Linux folds the *parent's* high-water
# mark into the child's ru_maxrss at exec, so every child would report >= this
# (large) benchmark process.
HWM_PRELUDE = r"""
import atexit as _bench_atexit, os as _bench_os
def _bench_hwm():
    path = _bench_os.environ.get("BENCH_HWM_FILE")
    if path:
        with open("/proc/self/status") as f:
            kib = [line.split()[1] for line in f if line.startswith("VmHWM:")]
        with open(path, "w") as out:
            out.write(kib[0] if kib else "")
_bench_atexit.register(_bench_hwm)
"""


CHILD_TMPDIR: str | None = None
MODEL_OUTSIDE = False  # --e2e-model-outside: name the model where it lies (the method before 2026-12-04's third round)


# Children compile and keep bytecode (into a folder of the run's, never the tree), as an installed wheel has it:
# with PYTHONDONTWRITEBYTECODE=1 (this VM's and the device's default) each child recompiled the package from
# the editable tree, about 50 ms per process.  --no-bytecode keeps the environment's setting.
BYTECODE = True


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    if CHILD_TMPDIR:
        env["TMPDIR"] = CHILD_TMPDIR
        if BYTECODE:
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            env["PYTHONPYCACHEPREFIX"] = os.path.join(CHILD_TMPDIR, "pycache")
    return env


def run_child(cmd, cwd, cpu: list | None = None) -> tuple[float, float, int]:
    """(wall seconds, peak RSS MiB, exit code) of one child process; appends its CPU seconds (user + system, its
    own reaped children included: the isolated worker) to ``cpu`` when given."""
    fd, hwm_file = tempfile.mkstemp(prefix="bench-hwm-")
    os.close(fd)
    env = dict(child_env(), BENCH_HWM_FILE=hwm_file)
    try:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        if cpu is not None:
            cpu.append(usage.ru_utime + usage.ru_stime)
        proc.returncode = os.waitstatus_to_exitcode(status)
        text = Path(hwm_file).read_text().strip()
    finally:
        os.unlink(hwm_file)
    return wall, (int(text) / 1024.0 if text else float("nan")), proc.returncode


# ---------------------------------------------------------------------------- in-process

# --layers: the engine's --mnn-layers; "off" also drops the fp16 weight and activation scans (the per-model cost
# that "on-failure", the plugin's default, pays on every model).
ENGINE_LAYERS = "on-failure"


def engine_matrix(model: str):
    from pytest_mnn_parity.mnn.backends import DEFAULT_BACKENDS, PRECISIONS
    from pytest_mnn_parity.engine.engine import ParityEngine
    from pytest_mnn_parity.engine.results import ParitySettings
    from pytest_mnn_parity.mnn.runner import RunConfig

    engine = ParityEngine(ParitySettings(layers=ENGINE_LAYERS))
    results = [engine.check(model, RunConfig(b, p, 4)) for b in DEFAULT_BACKENDS for p in PRECISIONS]
    engine.release(model)  # what the plugin does after a model's last item
    return results


def warm_sides(model: str, package: str = "pytest_mnn_parity"):
    """The per-configuration work alone, with the model loaded and its reference computed: the engine's 28 checks
    on an engine that has checked the model once already, and raw's 8 runs (4 CPU precisions x input sets A and
    B, copied in and out as ``raw_matrix`` does) on sessions created beforehand, under one capture.  Their
    difference over the 4 run configurations is the engine's fixed cost per configuration; what the whole
    matrices differ by beyond it is the per-model cost (load, reference, fp16 scans).  Returns the two functions
    and a closer.  ``package``: the name the tree under test is imported as (``bench_ab.py`` imports two)."""
    import importlib

    ParityEngine = importlib.import_module(f"{package}.engine.engine").ParityEngine
    ParitySettings = importlib.import_module(f"{package}.engine.results").ParitySettings
    backends = importlib.import_module(f"{package}.mnn.backends")
    DEFAULT_BACKENDS, PRECISIONS = backends.DEFAULT_BACKENDS, backends.PRECISIONS
    mnn = importlib.import_module(f"{package}.mnn.library").mnn
    RunConfig = importlib.import_module(f"{package}.mnn.runner").RunConfig

    np = raw_ns()["np"]
    MNN = mnn()
    engine = ParityEngine(ParitySettings(layers=ENGINE_LAYERS))
    configs = [RunConfig(b, p, 4) for b in DEFAULT_BACKENDS for p in PRECISIONS]
    for config in configs:
        engine.check(model, config)
    capture = raw_ns()["_capture_fn"]()
    with capture():
        interp = MNN.Interpreter(str(model))
        sessions = [interp.createSession({"backend": "CPU", "precision": code, "numThread": 4}) for code in (0, 1, 2, 3)]
    shapes = {name: tuple(t.getShape()) for name, t in interp.getSessionInputAll(sessions[0]).items()}
    out_names = list(interp.getSessionOutputAll(sessions[0]))
    sets = [{name: np.random.default_rng(s).random(shape, dtype=np.float32) for name, shape in shapes.items()}
            for s in (0, 1)]

    def raw():
        with capture():
            for session in sessions:
                for inputs in sets:
                    for name, arr in inputs.items():
                        tmp = MNN.Tensor(arr.shape, MNN.Halide_Type_Float, arr, MNN.Tensor_DimensionType_Caffe)
                        interp.getSessionInput(session, name).copyFrom(tmp)
                    interp.runSession(session)
                    for name in out_names:
                        out = interp.getSessionOutput(session, name)
                        host = MNN.Tensor(out, out.getDimensionType())
                        out.copyToHostTensor(host)
                        np.array(host.getNumpyData(), copy=True)

    def close():
        nonlocal interp
        engine.release(model)
        sessions.clear()
        interp = None

    return (lambda: [engine.check(model, c) for c in configs]), raw, close


def cold_discovery() -> float:
    """Seconds for backends.discover(DEFAULT_BACKENDS) with the per-process caches emptied."""
    from pytest_mnn_parity import backends

    old_probe = backends._probe_model() if backends._probe_model.cache_info().currsize else None
    backends._CACHE.clear()
    backends._probe_model.cache_clear()
    if old_probe is not None:
        shutil.rmtree(old_probe.parent, ignore_errors=True)  # the plugin never removes it (see README)
    start = time.perf_counter()
    backends.discover(backends.DEFAULT_BACKENDS)
    return time.perf_counter() - start


def bench_in_process(model: str, rounds: int, inner: int, log) -> dict:
    from pytest_mnn_parity.mnn.library import mnn

    MNN = mnn()
    raw_matrix = raw_ns()["raw_matrix"]

    # Sanity, untimed: both sides do what they claim.
    results = engine_matrix(model)
    outcome = {"passed": sum(r.passed for r in results), "skipped": sum(r.skipped for r in results),
               "other": sorted({r.category.value for r in results if not (r.passed or r.skipped)})}
    with quiet_fds():
        raw = raw_matrix(MNN, model, "none")
    raw_runs, raw_bad = len(raw), [rc for rc, _ in raw if rc != 0]

    variants = {
        "raw_nocapture": (lambda: raw_matrix(MNN, model, "none"), True),
        "raw_capture_once": (lambda: raw_matrix(MNN, model, "once"), False),
        "raw_capture_per_call": (lambda: raw_matrix(MNN, model, "per-call"), False),
        "engine": (lambda: engine_matrix(model), False),
    }
    engine_warm, raw_warm, close_warm = warm_sides(model)
    variants["engine_warm"] = (engine_warm, False)
    variants["raw_warm"] = (raw_warm, False)
    names = list(variants)
    for name in names:  # warm-up, not counted
        fn, quiet = variants[name]
        timed(fn, 1, quiet)
    samples = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate so no variant always goes first
        for name in order:
            fn, quiet = variants[name]
            samples[name].append(timed(fn, inner, quiet))
        log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {samples[n][-1] * 1e3:.1f} ms" for n in names))
    close_warm()
    med = {n: median(s) for n, s in samples.items()}
    per_config = (med["engine_warm"] - med["raw_warm"]) / 4
    return {
        "fixed_cost_per_configuration_s": per_config,
        "fixed_cost_per_model_s": (med["engine"] - med["raw_capture_once"]) - 4 * per_config,
        "extra_per_configuration_whole_matrix_s": (med["engine"] - med["raw_capture_once"]) / 4,
        "engine_outcome": outcome, "raw_runs": raw_runs, "raw_failed_rc": raw_bad,
        "samples_s": samples, "median_s": med, "min_s": {n: min(s) for n, s in samples.items()},
        "ratio_engine_over_raw_min": min(samples["engine"]) / min(samples["raw_capture_once"]),
        "ratio_engine_over_raw": med["engine"] / med["raw_capture_once"],
        "ratio_engine_over_raw_nocapture": med["engine"] / med["raw_nocapture"],
        "ratio_engine_over_raw_capture_per_call": med["engine"] / med["raw_capture_per_call"],
        "capture_cost_once_s": med["raw_capture_once"] - med["raw_nocapture"],
        "capture_cost_per_call_s": med["raw_capture_per_call"] - med["raw_nocapture"],
    }


# ---------------------------------------------------------------------------- end to end

def e2e_commands(model: str) -> dict[str, list[str]]:
    """The children of the end-to-end comparison.  They run in an empty folder of their own (``bench_e2e``), as a
    user's run in a model repository would: from this repository, pytest would also load tests/conftest.py (which
    imports MNN, ONNX and ONNX Runtime for the test suite).  pytest's cache is on, as in a user's run: the warm
    runs reuse the backend discovery kept there, ``pytest_plugin_cold`` starts with ``--cache-clear``."""
    py = sys.executable
    model = str(Path(model).resolve())
    raw_code = RAW_SRC + "\nimport sys\nchild_main(sys.argv)\n"
    # Same as ``python -m pytest ...`` (runpy with alter_sys), plus the RSS hook.
    bare = [py, "-c", HWM_PRELUDE + "import runpy; runpy.run_module('pytest', run_name='__main__', alter_sys=True)",
            "-q"]
    pytest = bare + ["--mnn-only"]
    # "solo": every other installed pytest11 plugin (hypothesis, xdist, benchmark, ...) switched off.
    solo = [arg for name in other_pytest_plugins() for arg in ("-p", f"no:{name}")]
    return {
        "python_startup": [py, "-c", HWM_PRELUDE],
        "import_numpy_mnn": [py, "-c", HWM_PRELUDE + "import numpy, MNN"],
        "raw_child": [py, "-c", HWM_PRELUDE + raw_code, model, "once"],
        # pytest itself, with this plugin switched off (it collects nothing in the empty folder): the baseline
        # the marginal cost is measured from.
        "pytest_bare": bare + ["-p", "no:mnn_parity"],
        "pytest_no_model": pytest,
        "pytest_plugin": pytest + ["--mnn-model", model],
        "pytest_plugin_cold": pytest + ["--mnn-model", model, "--cache-clear"],
        "pytest_solo_bare": bare + solo + ["-p", "no:mnn_parity"],
        "pytest_solo_no_model": pytest + solo,
        "pytest_solo_plugin": pytest + solo + ["--mnn-model", model],
    }


def other_pytest_plugins() -> list[str]:
    from importlib.metadata import entry_points

    return sorted({ep.name for ep in entry_points(group="pytest11") if ep.value.split(".")[0] != "pytest_mnn_parity"})


def bench_e2e(model: str, rounds: int, log) -> dict:
    folder = tempfile.mkdtemp(prefix="bench-e2e-", dir=CHILD_TMPDIR)
    if not MODEL_OUTSIDE:
        # The model lies in the children's folder, as in a user's model repository.  Named where it lies (in this
        # repository, or the LaMa graph's temporary folder), it would move pytest's rootdir for the plugin's runs
        # only (pytest counts option values that are paths): this repository's pyproject.toml then applies
        # (addopts "-p pytester") and pytest lists every directory from the rootdir's common ancestor down to the
        # folder (/tmp holds about 10,000 entries on the shared VM), none of which the bare run pays.
        model = shutil.copy(model, folder)
    cmds = e2e_commands(model)
    names = list(cmds)
    for name in names:  # warm the page cache and .pyc files
        run_child(cmds[name], folder)
    wall = {n: [] for n in names}
    rss = {n: [] for n in names}
    cpu = {n: [] for n in names}
    codes = {n: set() for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            w, m, rc = run_child(cmds[name], folder, cpu[name])
            wall[name].append(w)
            rss[name].append(m)
            codes[name].add(rc)
        log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {wall[n][-1] * 1e3:.0f} ms" for n in names))
    med = {n: median(v) for n, v in wall.items()}
    med_rss = {n: median(v) for n, v in rss.items()}
    return {
        "commands": {n: " ".join("<RAW_SRC>" if "\n" in c else c for c in cmd) for n, cmd in cmds.items()},
        "exit_codes": {n: sorted(c) for n, c in codes.items()},
        "samples_s": wall, "median_s": med, "min_s": {n: min(v) for n, v in wall.items()}, "peak_rss_mib": med_rss,
        # CPU seconds of the run and its reaped children (the isolated worker): the work, which a loaded machine
        # stretches far less than the wall time.
        "cpu_samples_s": cpu, "cpu_median_s": {n: median(v) for n, v in cpu.items()},
        "other_pytest_plugins_disabled_in_solo": other_pytest_plugins(),
        "ratio_solo_pytest_over_raw": med["pytest_solo_plugin"] / med["raw_child"],
        "ratio_pytest_over_raw": med["pytest_plugin"] / med["raw_child"],
        "ratio_rss_pytest_over_raw": med_rss["pytest_plugin"] / med_rss["raw_child"],
        # The headline (issue 22): what the plugin and the model add to a pytest run that was going to happen
        # anyway, over what the same MNN work costs as a script of its own (interpreter start-up included).
        "marginal_s": med["pytest_plugin"] - med["pytest_bare"],
        "ratio_marginal_over_raw": (med["pytest_plugin"] - med["pytest_bare"]) / med["raw_child"],
        "ratio_marginal_cold_over_raw": (med["pytest_plugin_cold"] - med["pytest_bare"]) / med["raw_child"],
        "ratio_solo_marginal_over_raw": (med["pytest_solo_plugin"] - med["pytest_solo_bare"]) / med["raw_child"],
        # Solo: with the other plugins on, the bare run collects the (empty) folder and hypothesis's plugin then
        # imports hypothesis (~0.6 s), which --mnn-only's runs never do: the difference would read negative.
        "plugin_startup_s": med["pytest_solo_no_model"] - med["pytest_solo_bare"],
        "peak_rss_over_raw_mib": med_rss["pytest_plugin"] - med_rss["raw_child"],
    }


def e2e_timeline(model: str) -> list[dict]:
    """One ``pytest_solo_plugin`` run with ``MNN_PARITY_TIMELINE`` set: every mark of the pytest process and its
    workers (``core/timeline.py``), in ms from the spawn.  Where the time goes, and what is on the critical path."""
    folder = tempfile.mkdtemp(prefix="bench-timeline-", dir=CHILD_TMPDIR)
    if not MODEL_OUTSIDE:
        model = shutil.copy(model, folder)
    cmd = e2e_commands(model)["pytest_solo_plugin"]
    run_child(cmd, folder)  # pytest's cache warm, as in the timed runs
    log_path = Path(folder) / "timeline.txt"
    env = dict(child_env(), MNN_PARITY_TIMELINE=str(log_path))
    start = time.time()
    proc = subprocess.run(cmd, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    end = time.time()
    rows = []
    for line in log_path.read_text().splitlines() if log_path.exists() else []:
        at, pid, label = line.split(" ", 2)
        rows.append({"ms": (float(at) - start) * 1e3, "pid": int(pid), "label": label})
    rows.append({"ms": (end - start) * 1e3, "pid": proc.returncode, "label": "reaped (pid column: exit code)"})
    return rows


def build_lama(size: int, folder: Path) -> Path:
    """fixtures/build_fixtures.py's LaMa-like graph at ``size``, converted by the project's converter call."""
    import importlib.util

    import onnx

    from pytest_mnn_parity.onnx.convert import convert_onnx

    spec = importlib.util.spec_from_file_location("build_fixtures", REPO / "fixtures" / "build_fixtures.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    onnx_path = folder / f"lama_like_{size}.onnx"
    onnx.save(builder.lama_like(size), str(onnx_path))
    return convert_onnx(onnx_path, folder / f"lama_like_{size}.mnn").target


# ---------------------------------------------------------------------------- profiling

def _top(stats, n: int, reps: int, key: str, only_repo: bool = False) -> list[dict]:
    rows = []
    for (file, line, func), (cc, nc, tt, ct, _) in stats.stats.items():
        if only_repo and "pytest_mnn_parity" not in file:
            continue
        short = file
        for marker in ("site-packages/", "src/", "lib/python"):
            if marker in file:
                short = file.split(marker, 1)[1]
                break
        rows.append({"where": f"{short}:{line}:{func}", "calls_per_matrix": nc / reps,
                     "tottime_ms": tt / reps * 1e3, "cumtime_ms": ct / reps * 1e3})
    rows.sort(key=lambda r: r[key], reverse=True)
    return rows[:n]


def profile_in_process(model: str, reps: int) -> dict:
    import cProfile
    import pstats

    from pytest_mnn_parity.mnn.library import mnn

    MNN = mnn()
    raw_matrix = raw_ns()["raw_matrix"]
    out = {}
    for name, fn in (("engine", lambda: engine_matrix(model)),
                     ("raw_capture_once", lambda: raw_matrix(MNN, model, "once"))):
        fn()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(reps):
            fn()
        prof.disable()
        stats = pstats.Stats(prof)
        out[name] = {"total_ms_per_matrix": stats.total_tt / reps * 1e3,
                     "top_tottime": _top(stats, 15, reps, "tottime_ms"),
                     "top_plugin_cumtime": _top(stats, 15, reps, "cumtime_ms", only_repo=True)}
    return out


class _Timers:
    """Accumulated seconds and call counts per label."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def add(self, label: str, dt: float) -> None:
        self.seconds[label] = self.seconds.get(label, 0.0) + dt
        self.calls[label] = self.calls.get(label, 0) + 1

    def wrap(self, label: str, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(label, time.perf_counter() - start)
        return wrapper


class _InterpreterProxy:
    """Times every MNN.Interpreter method call (createSession, runSession, getSessionInput, ...)."""

    def __init__(self, obj, timers: _Timers):
        self._obj, self._timers = obj, timers

    def __getattr__(self, name):
        attr = getattr(self._obj, name)
        return self._timers.wrap(f"MNN Interpreter.{name}", attr) if callable(attr) else attr


def attribute(model: str, rounds: int, inner: int) -> dict:
    """Where the engine's extra time goes, without cProfile's distortion.

    Plugin functions are wrapped with timers *in this process only* (module
    attributes are swapped and restored; src/ is not edited).  Every
    MNN.Interpreter call goes through a timing proxy on both sides, so "MNN
    interpreter calls" can be compared engine vs raw.  Wrapped regions do not
    overlap; "unattributed" is the rest (Python glue, MNN tensor copies in raw).
    The wrappers add about 1 us per call.
    """
    import pathlib
    import types

    from pytest_mnn_parity.mnn import model as model_mod
    from pytest_mnn_parity.mnn import native_output
    from pytest_mnn_parity.engine import engine as parity
    from pytest_mnn_parity.mnn import runner
    from pytest_mnn_parity.mnn.library import mnn

    MNN = mnn()
    raw_matrix = raw_ns()["raw_matrix"]
    timers = _Timers()
    orig_capture = native_output.capture_native_output

    @contextlib.contextmanager
    def timed_capture():
        start = time.perf_counter()
        cm = orig_capture()
        value = cm.__enter__()
        timers.add("native_output.capture_native_output (enter+exit)", time.perf_counter() - start)
        try:
            yield value
        finally:
            start = time.perf_counter()
            cm.__exit__(None, None, None)
            timers.seconds["native_output.capture_native_output (enter+exit)"] += time.perf_counter() - start

    def wrapped(obj, name, label):
        fn = getattr(obj, name, None)
        return (obj, name, None if fn is None else timers.wrap(label, fn))

    orig_open = getattr(runner, "open_interpreter", None)
    patches = [
        (runner, "open_interpreter",
         None if orig_open is None else (lambda path: _InterpreterProxy(orig_open(path), timers))),
        (native_output, "capture_native_output", timed_capture),
        (runner, "capture_native_output", timed_capture),
        (model_mod, "capture_native_output", timed_capture),
        wrapped(runner, "file_sha256", "model.file_sha256"),
        wrapped(runner, "to_numpy", "runner.to_numpy (copy out)"),
        wrapped(parity, "generate_inputs", "inputs.generate_inputs"),
        wrapped(parity, "fingerprint", "inputs.fingerprint"),
        wrapped(parity, "judge_outputs", "verdict.judge_outputs (metrics)"),
        wrapped(parity, "fp16_weight_risks", "weights.fp16_weight_risks (scan)"),
        wrapped(pathlib.Path, "resolve", "pathlib.Path.resolve"),
    ]
    # src/ is being edited: a name that moved is skipped (and reported), not an error.
    missing = [f"{getattr(obj, '__name__', obj)}.{name}" for obj, name, value in patches
               if value is None or not hasattr(obj, name)]
    patches = [(obj, name, value) for obj, name, value in patches if value is not None and hasattr(obj, name)]
    fake_mnn = types.SimpleNamespace(
        Interpreter=lambda path: _InterpreterProxy(MNN.Interpreter(path), timers), Tensor=MNN.Tensor,
        Halide_Type_Float=MNN.Halide_Type_Float, Tensor_DimensionType_Caffe=MNN.Tensor_DimensionType_Caffe)
    sides = {"engine": lambda: engine_matrix(model), "raw_capture_once": lambda: raw_matrix(fake_mnn, model, "once")}
    saved = [(obj, name, obj.__dict__[name] if isinstance(obj, type) else getattr(obj, name))
             for obj, name, _ in patches]
    per_side: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
    calls: dict[str, dict[str, float]] = {}
    try:
        for obj, name, value in patches:
            setattr(obj, name, value)
        for side, fn in sides.items():
            fn()  # warm-up
        for r in range(rounds):
            for side, fn in (list(sides.items()) if r % 2 == 0 else list(sides.items())[::-1]):
                timers.seconds.clear()
                timers.calls.clear()
                gc.collect()
                start = time.perf_counter()
                for _ in range(inner):
                    fn()
                total = (time.perf_counter() - start) / inner
                row = {k: v / inner for k, v in timers.seconds.items()}
                row["MNN interpreter calls (all)"] = sum(v for k, v in row.items() if k.startswith("MNN "))
                row["total"] = total
                row["unattributed"] = total - sum(v for k, v in row.items()
                                                  if k not in ("total", "MNN interpreter calls (all)"))
                per_side[side].append(row)
                calls[side] = {k: v / inner for k, v in timers.calls.items()}
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)
    labels = sorted({k for rows in per_side.values() for row in rows for k in row})
    table = {}
    for label in labels:
        e = median([row.get(label, 0.0) for row in per_side["engine"]])
        w = median([row.get(label, 0.0) for row in per_side["raw_capture_once"]])
        table[label] = {"engine_ms": e * 1e3, "raw_ms": w * 1e3, "extra_ms": (e - w) * 1e3,
                        "engine_calls": calls["engine"].get(label), "raw_calls": calls["raw_capture_once"].get(label)}
    if missing:
        table["(not instrumented: " + ", ".join(missing) + ")"] = {"engine_ms": 0.0, "raw_ms": 0.0, "extra_ms": 0.0,
                                                                  "engine_calls": None, "raw_calls": None}
    return table


def profile_pytest(model: str) -> dict:
    import pstats

    with tempfile.TemporaryDirectory() as tmp:
        prof_path = os.path.join(tmp, "pytest.prof")
        cmd = [sys.executable, "-m", "cProfile", "-o", prof_path, "-m", "pytest", "-p", "no:cacheprovider",
               "--mnn-only", "--mnn-model", model, "-q"]
        subprocess.run(cmd, cwd=REPO, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       check=False)
        stats = pstats.Stats(prof_path)
        # pytest's own machinery (pluggy, importlib) tops any cumtime list; what can be acted on is
        # the plugins' share, pytest_mnn_parity's and the other installed ones'.
        plugins = ("pytest_mnn_parity", "hypothesis", "xdist", "pytest_benchmark", "assertion/rewrite.py")
        everything = _top(stats, 100000, 1, "cumtime_ms")
        return {"total_ms": stats.total_tt * 1e3,
                "top_tottime": _top(stats, 15, 1, "tottime_ms"),
                "top_cumtime": everything[:25],
                "plugins_cumtime": [r for r in everything if any(p in r["where"] for p in plugins)][:20]}


# ---------------------------------------------------------------------------- report

def print_table(report: dict) -> None:
    ms = lambda s: f"{s * 1e3:9.1f}"  # noqa: E731
    for model, res in report["models"].items():
        ip = res.get("in_process")
        print(f"\n== {res.get('label', model)}")
        if ip:
            m = ip["median_s"]
            lo = ip["min_s"]
            print(f"  in process (ms per matrix; median [min] of {report['rounds']} rounds x {report['inner']} matrices)")
            print(f"    raw, no capture          {ms(m['raw_nocapture'])} [{lo['raw_nocapture'] * 1e3:.1f}]")
            print(f"    raw, one capture         {ms(m['raw_capture_once'])} [{lo['raw_capture_once'] * 1e3:.1f}]"
                  "   <- baseline")
            print(f"    raw, capture per call    {ms(m['raw_capture_per_call'])} [{lo['raw_capture_per_call'] * 1e3:.1f}]")
            print(f"    engine (28 checks)       {ms(m['engine'])} [{lo['engine'] * 1e3:.1f}]"
                  f"   {ip['engine_outcome']['passed']} passed, {ip['engine_outcome']['skipped']} skipped")
            print(f"    engine / raw             {ip['ratio_engine_over_raw']:9.2f}x   (goal <= {GOAL}x; "
                  f"min/min {ip['ratio_engine_over_raw_min']:.2f}x)")
            print(f"    engine / raw no capture  {ip['ratio_engine_over_raw_nocapture']:9.2f}x")
            print(f"    engine / raw per-call    {ip['ratio_engine_over_raw_capture_per_call']:9.2f}x")
            if "engine_warm" in m:
                print(f"    warm: engine 28 checks   {ms(m['engine_warm'])} [{lo['engine_warm'] * 1e3:.1f}]   (model and "
                      "reference ready)")
                print(f"    warm: raw 8 runs         {ms(m['raw_warm'])} [{lo['raw_warm'] * 1e3:.1f}]   (sessions ready)")
                print(f"    fixed cost per config    {ip['fixed_cost_per_configuration_s'] * 1e3:9.3f} ms   ((engine_warm - raw_warm)"
                      " / 4 run configurations)")
                print(f"    fixed cost per model     {ip['fixed_cost_per_model_s'] * 1e3:9.2f} ms   (engine - raw - 4 x the above: "
                      "load, reference, fp16 scans)")
                print(f"    (engine - raw) / 4       {ms(ip['extra_per_configuration_whole_matrix_s'])} ms   (both, spread "
                      "over the 4 run configurations)")
        e2e = res.get("e2e")
        if e2e:
            m, r = e2e["median_s"], e2e["peak_rss_mib"]
            print(f"  end to end (median of {report['e2e_rounds']} runs; wall ms, peak RSS MiB, exit codes, CPU ms)")
            for name in m:
                print(f"    {name:24s} {ms(m[name])}  {r[name]:7.1f}  {e2e['exit_codes'][name]}"
                      f"  {e2e['cpu_median_s'][name] * 1e3:7.0f}")
            print(f"    pytest / raw child       {e2e['ratio_pytest_over_raw']:9.2f}x wall, "
                  f"{e2e['ratio_rss_pytest_over_raw']:.2f}x RSS")
            print(f"    solo pytest / raw child  {e2e['ratio_solo_pytest_over_raw']:9.2f}x wall "
                  f"(solo: -p no: {', '.join(e2e['other_pytest_plugins_disabled_in_solo'])})")
            print(f"    marginal / raw child     {e2e['ratio_marginal_over_raw']:9.2f}x   ((pytest_plugin - pytest_bare) "
                  f"/ raw_child = {e2e['marginal_s'] * 1e3:.0f} ms / {m['raw_child'] * 1e3:.0f} ms)")
            print(f"    marginal, cold discovery {e2e['ratio_marginal_cold_over_raw']:9.2f}x   (--cache-clear)")
            print(f"    marginal, solo           {e2e['ratio_solo_marginal_over_raw']:9.2f}x")
            if "timeline" in res:
                print("  timeline of one solo plugin run (ms from spawn, pid, mark):")
                rows = res["timeline"]
                for row in rows if len(rows) <= 40 else rows[:30] + rows[-10:]:
                    print(f"    {row['ms']:8.1f}  {row['pid']:>7}  {row['label']}")
            cpu = e2e["cpu_median_s"]
            print(f"    marginal, solo, CPU      {(cpu['pytest_solo_plugin'] - cpu['pytest_solo_bare']) / cpu['raw_child']:9.2f}x"
                  f"   (CPU time of the run and its worker, over the raw child's)")
            print(f"    plugin start-up          {e2e['plugin_startup_s'] * 1e3:9.1f} ms (solo: pytest_solo_no_model - pytest_solo_bare)")
    d = report["discovery"]
    print(f"\n  backend discovery (7 backends): first in process {d['first_s'] * 1e3:.1f} ms, "
          f"cold median {d['cold_median_s'] * 1e3:.1f} ms, warm {d['warm_s'] * 1e6:.1f} us")
    prof = report.get("profile")
    if prof:
        for model, p in prof.items():
            for side in ("engine", "raw_capture_once"):
                q = p["in_process"][side]
                print(f"\n  cProfile {model} {side}: {q['total_ms_per_matrix']:.1f} ms/matrix (profiled); top tottime:")
                for row in q["top_tottime"][:10]:
                    print(f"    {row['tottime_ms']:7.2f} ms  x{row['calls_per_matrix']:<6.0f} {row['where']}")
            print(f"\n  attribution {model} (timers, ms/matrix; median of rounds):")
            print(f"    {'where':52s} {'engine':>8s} {'raw':>8s} {'extra':>8s}  calls e/r")
            rows = sorted(p["attribution"].items(), key=lambda kv: -abs(kv[1]["extra_ms"]))
            for label, row in rows:
                if label.startswith("MNN Interpreter.") and abs(row["extra_ms"]) < 0.1:
                    continue
                print(f"    {label:52s} {row['engine_ms']:8.2f} {row['raw_ms']:8.2f} {row['extra_ms']:+8.2f}  "
                      f"{row['engine_calls'] or 0:g}/{row['raw_calls'] or 0:g}")
            q = p["in_process"]["engine"]
            print("  engine, plugin functions by cumtime (cProfile):")
            for row in q["top_plugin_cumtime"][:12]:
                print(f"    {row['cumtime_ms']:7.2f} ms  x{row['calls_per_matrix']:<6.0f} {row['where']}")
            if "pytest" in p:
                print(f"  cProfile pytest run: {p['pytest']['total_ms']:.0f} ms (profiled); plugins by cumtime:")
                for row in p["pytest"]["plugins_cumtime"][:15]:
                    print(f"    {row['cumtime_ms']:7.1f} ms  x{row['calls_per_matrix']:<6.0f} {row['where']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", help=f"model(s) to bench (default: {DEMO} and {DEEP})")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per measurement (median reported)")
    ap.add_argument("--inner", type=int, default=5, help="in-process matrices per sample (their mean is the sample)")
    ap.add_argument("--e2e-rounds", type=int, default=None, help="end-to-end rounds (default: --rounds)")
    ap.add_argument("--no-e2e", action="store_true", help="skip the subprocess comparison")
    ap.add_argument("--e2e-models", choices=("demo", "all"), default="demo",
                    help="which models get the end-to-end comparison (default: the demo model only)")
    ap.add_argument("--e2e-lama", type=int, action="append", metavar="SIZE",
                    help="also compare end to end on a LaMa-like graph of SIZE x SIZE, built from "
                         "fixtures/build_fixtures.py into a temporary folder (default: 128; 0: none)")
    ap.add_argument("--e2e-model-outside", action="store_true",
                    help="end to end: name the model where it lies instead of copying it into the children's "
                         "folder (moves pytest's rootdir for the plugin's runs only; how it was measured before)")
    ap.add_argument("--timeline", action="store_true",
                    help="end to end: also one plugin run's timeline (MNN_PARITY_TIMELINE marks of pytest and its "
                         "workers, ms from the spawn)")
    ap.add_argument("--profile", action="store_true", help="cProfile the engine, the raw work and a pytest run")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    ap.add_argument("--quiet", action="store_true", help="no per-round progress lines")
    ap.add_argument("--no-bytecode", action="store_true",
                    help="children keep this environment's PYTHONDONTWRITEBYTECODE (default: they compile and keep "
                         "bytecode in a folder of the run's, as an installed wheel has it)")
    ap.add_argument("--layers", choices=("on-failure", "off"), default="on-failure",
                    help="the in-process engine's --mnn-layers (off: no trace and no fp16 risk scans)")
    args = ap.parse_args(argv)
    global ENGINE_LAYERS, BYTECODE
    ENGINE_LAYERS = args.layers
    BYTECODE = not args.no_bytecode
    models = args.model or [DEMO, DEEP]
    e2e_rounds = args.e2e_rounds or args.rounds
    log = (lambda *_: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    json_path = Path(args.json).resolve() if args.json else None  # relative to where we were started
    os.chdir(REPO)

    # MNN's import, then the very first discovery of this process (probe model built, 7 sessions).
    t0 = time.perf_counter()
    from pytest_mnn_parity.mnn.library import mnn, mnn_version

    mnn()
    import_s = time.perf_counter() - t0
    from pytest_mnn_parity import backends

    t0 = time.perf_counter()
    statuses = backends.discover(backends.DEFAULT_BACKENDS)
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    backends.discover(backends.DEFAULT_BACKENDS)
    warm_s = time.perf_counter() - t0

    report = {
        "meta": {"python": sys.version.split()[0], "mnn": mnn_version(), "platform": platform.platform(),
                 "cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
                 "available_backends": [n for n, s in statuses.items() if s.available],
                 "PYTHONDONTWRITEBYTECODE": os.environ.get("PYTHONDONTWRITEBYTECODE"),
                 "children_bytecode": BYTECODE,
                 "loadavg_at_start": os.getloadavg()},
        "rounds": args.rounds, "inner": args.inner, "e2e_rounds": e2e_rounds, "goal_ratio": GOAL,
        "import_mnn_s": import_s, "models": {},
    }
    for model in models:
        log(f"in process: {model}")
        report["models"][model] = {"in_process": bench_in_process(model, args.rounds, args.inner, log)}
    log("cold discovery")
    cold = [cold_discovery() for _ in range(args.rounds)]
    report["discovery"] = {"first_s": first_s, "cold_samples_s": cold, "cold_median_s": median(cold),
                           "warm_s": warm_s}
    # The plugin leaves a probe-model folder in TMPDIR per process (nothing removes it): children get a
    # private TMPDIR, removed at the end, and this process's own probe folder goes too.
    global CHILD_TMPDIR, MODEL_OUTSIDE
    MODEL_OUTSIDE = args.e2e_model_outside
    CHILD_TMPDIR = tempfile.mkdtemp(prefix="bench-parity-tmp-")
    try:
        if not args.no_e2e:
            e2e_models = models if args.e2e_models == "all" else [m for m in models if m == DEMO] or models[:1]
            for size in [s for s in (args.e2e_lama or [128]) if s]:
                built = build_lama(size, Path(CHILD_TMPDIR))
                e2e_models.append(str(built))
                report["models"].setdefault(str(built), {})["label"] = f"LaMa-like {size}x{size}"
            for model in e2e_models:
                log(f"end to end: {model}")
                report["models"].setdefault(model, {})["e2e"] = bench_e2e(model, e2e_rounds, log)
                if args.timeline:
                    report["models"][model]["timeline"] = e2e_timeline(model)
        if args.profile:
            report["profile"] = {}
            for model in models:
                log(f"profiling: {model}")
                entry = {"in_process": profile_in_process(model, reps=10),
                         "attribution": attribute(model, max(args.rounds, 7), args.inner)}
                if not args.no_e2e and model == DEMO:
                    entry["pytest"] = profile_pytest(model)
                report["profile"][model] = entry
    finally:
        shutil.rmtree(CHILD_TMPDIR, ignore_errors=True)
        CHILD_TMPDIR = None
        if backends._probe_model.cache_info().currsize:
            shutil.rmtree(backends._probe_model().parent, ignore_errors=True)

    print(f"pytest-mnn-parity overhead benchmark - MNN {report['meta']['mnn']}, Python {report['meta']['python']}, "
          f"{report['meta']['affinity']} CPUs usable, MNN import {import_s * 1e3:.0f} ms")
    print_table(report)
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"\nJSON written to {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
