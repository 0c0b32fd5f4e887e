#!/usr/bin/env python
"""The trained models of fixtures/real/ over every backend this MNN build has, with the defaults.

Run where a GPU build of MNN is importable (docs/gpu.md), with the models cached
(``MNN_PARITY_REAL_CACHE``, see fixtures/real/README.md)::

    python benchmarks/gpu_real_models.py OUT_DIR [--models ocr_det,ocr_rec,...] [--inputs seeded,real]

Writes one JSON report per input kind into OUT_DIR and prints, per backend x precision, how many
items passed and how each failing one failed (category, the bound that decided, its cosine and
the measured arithmetic), so false fails on healthy models can be told from real GPU findings.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "fixtures" / "real"))
import fetch_real  # noqa: E402
import make_inputs  # noqa: E402

# Magika's conversion is wrong in MNN 3.6.1 on the CPU too (tests/test_real_models.py): not a GPU question.
DEFAULT_MODELS = [m for m in fetch_real.MODELS if m != "magika"]


def folders(names: list[str], out: Path) -> dict[str, Path]:
    paths = {name: path for name, path in fetch_real.fetch(names).items()}
    seeded = out / "seeded"
    seeded.mkdir(parents=True, exist_ok=True)
    for name, path in paths.items():
        link = seeded / f"{name}.onnx"
        if not link.exists():
            os.symlink(path, link)
        (seeded / f"{name}.onnx.toml").write_text(make_inputs._shapes(name))
    make_inputs.write(out / "real", paths)
    return {"seeded": seeded, "real": out / "real"}


def run(kind: str, folder: Path, names: list[str], out: Path, extra: list[str]) -> dict:
    if kind == "seeded":
        names = [n for n in names if n != "silero_vad"]  # its If rejects a random sample rate (ONNX Runtime too)
    report = out / f"{kind}.json"
    args = [sys.executable, "-m", "pytest", "--mnn-only", "-q", "-p", "no:cacheprovider", "--mnn-report", str(report),
            *[a for n in names for a in ("--mnn-model", str(folder / f"{n}.onnx"))], *extra]
    proc = subprocess.run(args, cwd=out, capture_output=True, text=True)
    (out / f"{kind}.log").write_text(proc.stdout + proc.stderr)
    return json.loads(report.read_text())


def summary(kind: str, report: dict) -> list[str]:
    rows: dict[str, Counter] = defaultdict(Counter)
    details = []
    for rec in report["results"]:
        column = f"{rec['backend']}-{rec['precision']}"
        rows[column][rec["outcome"]] += 1
        if rec["outcome"] in ("failed", "error"):
            outs = [o for o in (rec.get("outputs") or {}).values() if "cosine" in o]
            worst = min(outs, key=lambda o: o["cosine"] if isinstance(o["cosine"], float) else -2) if outs else {}
            arith = (rec.get("arithmetic") or {}).get("kind")
            details.append(f"  {rec['nodeid']}: {rec['category']} (decided by {worst.get('decided_by', '-')}, "
                           f"cosine {worst.get('cosine', '-')}, max_abs {worst.get('max_abs', '-')}, "
                           f"arithmetic {arith}, tier {(rec.get('tolerance') or {}).get('tier')})")
    lines = [f"== {kind}: {sum(sum(c.values()) for c in rows.values())} items"]
    for column in sorted(rows):
        lines.append(f"  {column:22s} " + ", ".join(f"{k} {v}" for k, v in sorted(rows[column].items())))
    return lines + ["failing items:"] + details


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS))
    ap.add_argument("--inputs", default="seeded,real")
    args, extra = ap.parse_known_args(argv)
    out = Path(args.out).resolve()
    names = args.models.split(",")
    where = folders(names, out)
    for kind in args.inputs.split(","):
        for line in summary(kind, run(kind, where[kind], names, out, extra)):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
