"""The command-line options and ini keys the plugin declares (``Options`` reads them back).

Every option has an ini key of the same name with ``mnn_`` instead of
``--mnn-`` (e.g. ``mnn_backends`` in ``[tool.pytest.ini_options]``); the
command line wins over the ini file.  docs/options.md documents each one.
"""
from __future__ import annotations

from typing import Any

import pytest

from ..core.choices import API_MODES
from ..mnn.backends import DEFAULT_BACKENDS, PRECISIONS
from ..mnn.limits import DEFAULT_MAX_INPUT_MB
from ..onnx.variants import DEFAULT_VARIANTS

TOLERANCE_OPTIONS = {
    "atol": "absolute tolerance as a fraction of each output's largest |reference| value",
    "rtol": "relative tolerance, per element",
    "min_cosine": "minimum cosine similarity between target and reference",
    "max_outside_fraction": "fraction of elements allowed outside tolerance (default: the tier's, fp32 1e-3)",
    "outlier_limit": "how many times its allowance an allowed outlier may differ (default 10)",
    "abs_floor": "differences up to this (absolute) always pass; replaces the measured noise floor (default: "
                 "the tier's, fp32 1e-6)",
}


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("mnn-parity", "MNN backend parity (pytest-mnn-parity)")

    def option(name: str, help: str, ini_type: str | None = None, **kwargs: Any) -> None:
        group.addoption(f"--mnn-{name}", dest=f"mnn_{name.replace('-', '_')}", help=help, **kwargs)
        parser.addini(f"mnn_{name.replace('-', '_')}", help, type=ini_type)

    option("model", "an .mnn or .onnx file, a directory (every *.mnn and *.onnx below it) or a glob; repeatable",
           ini_type="args", action="append", default=None, metavar="PATH")
    option("backends", f"comma-separated backends to test (default: {','.join(DEFAULT_BACKENDS)})",
           metavar="LIST")
    option("precisions", f"comma-separated precisions (default: {','.join(PRECISIONS)})", metavar="LIST")
    option("require-backends", "comma-separated backends that must really run, e.g. OPENCL,VULKAN,CUDA on a GPU "
           "runner: their items fail instead of being skipped when the backend is unavailable (a fallback always "
           "fails), and the run exits non-zero naming each one that is missing (default: none); a required backend "
           "is tested even where --mnn-backends leaves it out", metavar="LIST")
    option("reference", "what outputs are compared against: 'cpu' (default: the same model on CPU, high "
           "precision, at --mnn-threads; ONNX Runtime for an .onnx model), another .mnn file with the same inputs and "
           "outputs, an .onnx file run by ONNX Runtime, or an output bundle directory: DIR (its reference "
           "outputs), DIR::BACKEND-precision or DIR::same", metavar="REF")
    option("convert", f"conversion variants tested for each .onnx model: comma-separated from fp32, fp16, int8 "
           f"(default {','.join(DEFAULT_VARIANTS)})", metavar="LIST")
    parser.addini("mnn_convert_flags", "extra MNNConvert flags for every conversion variant of an .onnx model, "
                  "e.g. --keepInputFormat", type="string")
    option("seed", "seed for the generated inputs (default 0)", metavar="INT")
    option("input-shape", "shape for an input, e.g. image=1x3x512x512 (needed for dynamic dimensions); repeatable",
           ini_type="linelist", action="append", default=None, metavar="NAME=SHAPE")
    option("threads", "CPU threads for the configurations under test and the CPU reference (default 4)",
           metavar="INT")
    for name, help_text in TOLERANCE_OPTIONS.items():
        option(name.replace("_", "-"), f"override every tier's {help_text}", metavar="FLOAT")
    option("layers", "per-layer trace: off, on-failure (default: trace configurations whose outputs are wrong "
           "and name the first divergent layer) or always", metavar="MODE")
    option("report", "write the JSON report (schema pytest-mnn-parity/1) to this path", metavar="PATH")
    option("input-sets", "comma-separated names of the sidecar input sets to run (default: all declared)",
           metavar="LIST")
    option("hypothesis", "also search, per configuration, up to N hypothesis examples for an input that breaks "
           "parity (seeded by --hypothesis-seed, default --mnn-seed)", metavar="N")
    option("hypothesis-dir", "where the search saves minimal failing inputs as .npz (default: "
           ".pytest_cache/d/mnn-parity under the rootdir)", metavar="DIR")
    option("artifacts", "write pictures (reference, target, error heatmap, zero/NaN mask, error histogram) of "
           "failing outputs into this directory, one folder per item", metavar="DIR")
    option("artifacts-when", "which outputs get pictures: on-failure (default: the failing outputs of failing "
           "configurations) or always", metavar="MODE")
    option("html", "write a self-contained HTML report (matrix, metrics, per-layer error curve, pictures) to this "
           "path", metavar="PATH")
    option("api", f"MNN API that runs the models: {', '.join(API_MODES)} (default auto: the session API where a "
           "session can run the model, the Module API where it cannot; both: the API is a matrix axis and the two "
           "are compared)", metavar="MODE")
    option("stream", "streaming model: feed state outputs back into inputs step by step, e.g. "
           "\"h_out->h;steps=8\" (model=GLOB; limits it to some models); repeatable",
           ini_type="linelist", action="append", default=None, metavar="SPEC")
    option("isolate", "run configurations in worker processes so a crash or hang fails one item: always (the "
           "default when the option is given without a value), never, or auto (the default: every backend too, the CPU's "
           "configurations in one warm worker for the whole run)", nargs="?", const="always", metavar="MODE")
    option("worker-scope", "what one isolated worker process serves: model (the default: a fresh process per "
           "model, as an app that loads one model would run) or run (one worker for every model until it crashes "
           "or times out: GPU runtimes are set up once, not per model)", metavar="SCOPE")
    option("timeout", "seconds one configuration may take; an isolated worker is killed then (default: none, "
           "600 for isolated configurations; 0: none)", metavar="SECONDS")
    option("max-input-mb", f"refuse models whose inputs need more than this many MiB per input set, before "
           f"allocating them (default {DEFAULT_MAX_INPUT_MB:g})", metavar="MB")
    option("save-outputs", "write an output bundle (outputs + manifest per model x configuration) into this "
           "directory, to compare against with --mnn-reference DIR elsewhere", metavar="DIR")
    option("golden", "check each model's CPU/high outputs against the goldens in this directory", metavar="DIR")
    option("versions", "comma-separated MNN releases from the package index (e.g. 3.0.0,3.4.1,3.6.1): every item "
           "runs in each, in a worker of that release's cached environment, against the same reference; the "
           "release is an axis of the ids (parity[mnn3.4.1-CPU-low])", metavar="LIST")
    option("bisect", "GOOD..BAD: search the releases on the package index between two MNN releases for the first "
           "whose verdict changes, per model and configuration (binary search, each step a cached environment)",
           metavar="GOOD..BAD")
    option("env-cache", "where the per-release environments of --mnn-versions / --mnn-bisect live (default: "
           "mnn-parity-envs in pytest's cache folder); shared by runs and pytest-xdist workers", metavar="DIR")
    option("cpu", "comma-separated emulated CPUs, each an axis value for the CPU configurations: arm64:cortex-a76 "
           "(ARMv8.2 fp16 arithmetic, as phones run Precision_Low), arm64:cortex-a53 (none), ...; runs them under "
           "qemu-aarch64 in an aarch64 environment built once in --mnn-env-cache (mnn-parity-env arm64), against "
           "this machine's reference (parity[arm64.a76-CPU-low]; docs/arm.md)", metavar="LIST")
    option("remote", "comma-separated other machines, each an axis value: [NAME=]ssh:[USER@]HOST[:PORT][:PYTHON]; "
           "every configuration runs in a worker there (its Python needs MNN and numpy), against this machine's "
           "reference (parity[ssh.NAME-CPU-low]; docs/arm.md)", metavar="LIST")
    option("ssh-config", "an ssh_config file for --mnn-remote (ssh -F FILE): host aliases, keys, ports, known hosts",
           metavar="FILE")
    option("gpu-modes", "comma-separated GPU modes, each an axis value for the backends it applies to: tune-none, "
           "tune-heavy, tune-wide, tune-normal, tune-fast, buffer, image, record-op, record-batch, or several "
           "joined by + (image+record-batch); default: none, GPU sessions use the cheapest tuning (docs/gpu.md)",
           metavar="LIST")
    option("progress", "while models run, a line at most every SECONDS: model, configurations done/total, elapsed "
           "(default 10 on an interactive terminal, off when CI is set or the output is not a terminal; a value "
           "given turns it on anywhere; -q and 0 turn it off)", metavar="SECONDS")
    option("op-sweep", "run ops alone on the reference's recorded inputs to prove which op is broken: flagged "
           "(the default when the option is given without a value: the ops a failing item's trace flagged), all "
           "(every op of every item) or off (the default)", nargs="?", const="flagged", metavar="MODE")
    option("repro", "for each failing item, write a directory that plain MNN can run (the smallest graph that "
           "still fails as .mnn, inputs and reference outputs as .npz, repro.py, ISSUE.md) under this directory",
           metavar="DIR")
    group.addoption("--mnn-update-golden", action="store_true", dest="mnn_update_golden", default=False,
                    help="(re)write the goldens in --mnn-golden DIR instead of checking them")
    group.addoption("--mnn-only", action="store_true", dest="mnn_only", default=False,
                    help="run only the generated parity items: do not collect test files")
