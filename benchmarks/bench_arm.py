"""What emulating an ARM CPU costs: time per item emulated vs native, and the environment's build, cold and warm.

    python benchmarks/bench_arm.py                         # demo model, table on stdout
    python benchmarks/bench_arm.py --model fixtures/risk/overflow_activation.mnn --rounds 5
    python benchmarks/bench_arm.py --cold                  # also build the environment from nothing (downloads)

Each place (this machine, ``arm64:cortex-a76``, ``arm64:cortex-a53``) gets one warm worker
(``IsolatedEngine``, as the plugin gives a place); its start-up (Python and MNN importing, under qemu for the
emulated ones) is timed apart.  A first check (``normal``) loads the model and computes the worker's own
reference; then ``high`` and ``low`` are timed ``--rounds`` times each, interleaved, and the median is
reported with the ratio to native.  Nothing is asserted.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pytest_mnn_parity.engine.request import CheckRequest
from pytest_mnn_parity.engine.results import ParitySettings
from pytest_mnn_parity.isolation.arm_env import ArmEnvBuilder
from pytest_mnn_parity.isolation.engine import IsolatedEngine
from pytest_mnn_parity.isolation.launch import LocalPython
from pytest_mnn_parity.mnn.runner import RunConfig

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "fixtures" / "demo" / "lama_like.mnn"))
    parser.add_argument("--cache", default=str(REPO / ".pytest_cache" / "d" / "mnn-parity-envs"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cold", action="store_true", help="also time a build into an empty cache (downloads)")
    args = parser.parse_args()

    if args.cold:
        with tempfile.TemporaryDirectory() as empty:
            started = time.perf_counter()
            env = ArmEnvBuilder(empty, progress=lambda line: print(line, file=sys.stderr)).ensure()
            print(f"environment, cold (downloads, unpack, check): {time.perf_counter() - started:.1f} s"
                  + ("" if env.ok else f" FAILED: {env.reason}"))
    started = time.perf_counter()
    env = ArmEnvBuilder(args.cache, progress=lambda line: print(line, file=sys.stderr)).ensure()
    print(f"environment, {'built now' if env.created else 'warm'}: {time.perf_counter() - started:.2f} s")
    if not env.ok:
        print(env.reason)
        return 1

    settings = ParitySettings(threads=args.threads, layers="off")
    places = {"native x86": LocalPython(), "arm64.a76": env.command("cortex-a76"),
              "arm64.a53": env.command("cortex-a53")}
    engines, startup = {}, {}
    for name, command in places.items():
        engine = IsolatedEngine(settings, timeout=900, worker_per_model=False, prespawn=False, command=command)
        started = time.perf_counter()
        engine.check_request(CheckRequest(args.model, RunConfig("CPU", "normal", args.threads)))
        startup[name] = time.perf_counter() - started
        engines[name] = engine
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for precision in ("high", "low"):
            for name, engine in engines.items():
                started = time.perf_counter()
                result = engine.check_request(CheckRequest(args.model, RunConfig("CPU", precision, args.threads)))
                times.setdefault((name, precision), []).append(time.perf_counter() - started)
                assert result.category.value in ("ok", "mismatch", "non_finite"), result.message
    for engine in engines.values():
        engine.close()
    print(f"model {Path(args.model).name}, {args.threads} thread(s), median of {args.rounds} rounds per item")
    print(f"{'place':<12} {'start + first item':>18} {'high':>10} {'x native':>9} {'low':>10} {'x native':>9}")
    for name in places:
        cells = [f"{startup[name]:>16.2f} s"]
        for precision in ("high", "low"):
            median = statistics.median(times[(name, precision)])
            ratio = median / statistics.median(times[("native x86", precision)])
            cells += [f"{median * 1000:>8.1f}ms", f"{ratio:>8.0f}x"]
        print(f"{name:<12} " + " ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
