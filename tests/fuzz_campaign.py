#!/usr/bin/env python
"""A long fuzzing campaign: many corrupted variants of real models through the isolated engine.

Not collected by pytest (the suite runs a short hypothesis version of this in
test_bad_input.py); run it by hand, results go to docs/reliability.md::

    python tests/fuzz_campaign.py --variants 2000 --json /tmp/fuzz.json

Every variant is checked on CPU-high in a shared isolated worker (a crash
costs a fresh one); after each, a healthy control model must still pass.  The
campaign itself must never die: that is the property under test.
"""
from __future__ import annotations

import argparse
import collections
import json
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from pytest_mnn_parity.isolation.engine import IsolatedEngine, WorkerError  # noqa: E402
from pytest_mnn_parity.engine.results import ParitySettings  # noqa: E402
from pytest_mnn_parity.mnn.runner import RunConfig  # noqa: E402

SOURCES = ["fixtures/collapse/healthy.mnn", "fixtures/multi_io.mnn", "fixtures/demo/lama_like.mnn"]
KINDS = ["truncate", "flip1", "flip8", "overwrite", "zero", "insert", "duplicate"]
CONTROL = REPO / "fixtures" / "multi_io.mnn"


def corrupt(data: bytes, kind: str, rng: random.Random) -> bytes:
    out = bytearray(data)
    offset = rng.randrange(len(out))
    if kind == "truncate":
        return bytes(out[:offset])
    if kind in ("flip1", "flip8"):
        for _ in range(1 if kind == "flip1" else 8):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    elif kind == "overwrite":
        chunk = rng.randbytes(rng.randint(1, 64))
        out[offset:offset + len(chunk)] = chunk
    elif kind == "zero":
        length = rng.randint(1, 256)
        out[offset:offset + length] = bytes(len(out[offset:offset + length]))
    elif kind == "insert":
        out[offset:offset] = rng.randbytes(rng.randint(1, 64))
    else:
        out[offset:offset] = out[offset:offset + rng.randint(1, 256)]
    return bytes(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    config = RunConfig("CPU", "high")
    engine = IsolatedEngine(ParitySettings(), timeout=args.timeout, worker_per_model=False)
    tally: collections.Counter = collections.Counter()
    signals: collections.Counter = collections.Counter()
    examples: dict[str, str] = {}
    control_failures = 0
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mnn-parity-fuzz-") as folder:
        for i in range(args.variants):
            source, kind = SOURCES[i % len(SOURCES)], KINDS[(i // len(SOURCES)) % len(KINDS)]
            path = Path(folder) / f"v{i}.mnn"
            path.write_bytes(corrupt((REPO / source).read_bytes(), kind, rng))
            try:
                result = engine.check(path, config)
            except WorkerError as exc:  # a Python exception in the engine: a bug, kept to fix
                tally[(Path(source).name, kind, "ENGINE_EXCEPTION")] += 1
                examples.setdefault("ENGINE_EXCEPTION", str(exc)[-600:])
                keep = Path(folder).parent / f"mnn-parity-fuzz-exception-{i}.mnn"
                keep.write_bytes(path.read_bytes())
                engine.release(path)
                continue
            category = result.category.value
            tally[(Path(source).name, kind, category)] += 1
            if result.fault:
                signals[result.fault.get("signal") or f"exit {result.fault.get('returncode')}"] += 1
            if not result.passed and str(path) not in result.message:
                examples.setdefault("message_without_path", result.message[:300])
            examples.setdefault(category, result.message.splitlines()[0][:200] if result.message else "")
            engine.release(path)
            path.unlink()
            control = engine.check(CONTROL, config)
            if control.category.value != "ok":
                control_failures += 1
                examples.setdefault("control_failure", control.message[:600])
            if (i + 1) % 250 == 0:
                print(f"{i + 1} variants, {time.monotonic() - started:.0f} s", file=sys.stderr)
    engine.close()
    by_category = collections.Counter()
    for (_, _, category), n in tally.items():
        by_category[category] += n
    summary = {"variants": args.variants, "seconds": round(time.monotonic() - started, 1),
               "by_category": dict(by_category.most_common()), "signals": dict(signals),
               "control_failures": control_failures, "first_message_per_category": examples,
               "by_source_kind_category": {" / ".join(k): v for k, v in sorted(tally.items())}}
    print(json.dumps({k: v for k, v in summary.items() if k != "by_source_kind_category"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    bad = control_failures or {"message_without_path", "ENGINE_EXCEPTION"} & set(examples)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
