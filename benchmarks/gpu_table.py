"""Render the GPU results table of docs/gpu.md from saved JSON reports.

    python benchmarks/gpu_table.py benchmarks/gpu-results/2026-11-25-h100
"""
from __future__ import annotations

import gzip
import json
import sys
from collections import OrderedDict
from pathlib import Path

SHORT = {"ok": "ok", "zero_output": "ZERO", "partial_zero": "PZERO", "constant_output": "CONST",
         "non_finite": "NaN/Inf", "stale_output": "STALE", "mismatch": "MISM", "runtime_error": "RTERR",
         "shape_mismatch": "SHAPE", "backend_fallback": "FALLBK", "model_error": "MODEL"}


def load(folder: Path):
    for path in sorted(folder.glob("*.json.gz")):
        with gzip.open(path, "rt") as f:
            yield path.name.removesuffix(".json.gz"), json.load(f)


def key_metric(rec) -> str:
    outs = [o for o in rec["outputs"].values() if "cosine" in o]
    if not outs:
        return ""
    if rec["category"] == "non_finite":
        return f"{sum(o['nonfinite_count'] for o in outs)} NaN/Inf"
    if rec["category"] in ("zero_output", "partial_zero"):
        return f"{max(o['new_zero_fraction'] for o in outs):.0%} new zeros"
    cos = [o["cosine"] for o in outs if not isinstance(o["cosine"], str)]
    return f"cos {min(cos):.4f}" if cos else "cos nan"


def main(folder: Path) -> None:
    rows: OrderedDict = OrderedDict()
    details = []
    for run, report in load(folder):
        ref = report["settings"]["reference"]
        for rec in report["results"]:
            if rec["outcome"] == "skipped":
                continue
            label = rec["model"].replace("fixtures/", "") + ("" if ref == "cpu" else f" vs {Path(ref).name}")
            col = f"{rec['backend']}-{rec['precision']}"
            rows.setdefault(label, {})[col] = SHORT.get(rec["category"], rec["category"])
            if rec["outcome"] == "failed" and rec["backend"] != "CPU":
                layer = rec.get("first_divergent_layer") or {}
                arith = (rec.get("arithmetic") or {}).get("kind", "")
                details.append((label, col, arith, rec["category"], key_metric(rec),
                                f"{layer.get('name', '-')} ({layer.get('type', '-')})" if layer else "-"))
    cols = [f"{b}-{p}" for b in ("CPU", "OPENCL", "VULKAN", "CUDA") for p in ("normal", "high", "low", "Low_BF16")]
    print("| model | " + " | ".join(c.replace("-", " ") for c in cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for label, cells in rows.items():
        print(f"| {label} | " + " | ".join(cells.get(c, "-") for c in cols) + " |")
    print()
    print("| model | config | arithmetic | category | key metric | first divergent layer |")
    print("|---|---|---|---|---|---|")
    for row in details:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
