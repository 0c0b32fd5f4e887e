"""How a failed MNN run is put into words: what failed, what MNN said, and what to do.

Shared by the engine's messages, the Module API side and the fixtures for users' own tests.
"""
from __future__ import annotations

from .runner import RunOutput, error_name


def last_lines(log: str, n: int = 3) -> str:
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    return " | ".join(lines[-n:]) if lines else "(nothing)"


def runtime_hint(run: RunOutput) -> str:
    if getattr(run, "failure", ""):  # the Module API already handles control flow
        if run.rc == 3 or "Compute Shape Error" in run.log:
            return "MNN could not compute the output shapes: check the input shapes (--mnn-input-shape)"
        return "see MNN's log above"
    if run.rc == 3 or "Compute Shape Error" in run.log or "not resized" in run.log:
        return ("MNN could not compute the output shapes. A model with control flow (ONNX If/Loop, or an LSTM "
                "converted to While) cannot run in a session: use the Module API (--mnn-api auto or module; "
                "MNN.nn.load_module_from_file) or re-convert with --useOriginRNNImpl; a dynamic input needs "
                "--mnn-input-shape")
    return "see MNN's log above"


def run_failure(run: RunOutput) -> str:
    """What failed, in the terms of the API that ran it."""
    return getattr(run, "failure", "") or f"runSession returned {run.rc} ({error_name(run.rc)})"


def mnn_said(log: str, n: int = 4) -> str:
    """MNN's error lines first (``Compute Shape Error for out`` is printed at resize, before the run)."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    errors = [line for line in lines if "rror" in line]
    chosen = list(dict.fromkeys(errors[:2] + lines[-(n - min(2, len(errors))):])) if lines else []
    return " | ".join(chosen) if chosen else "(nothing)"


# When neither API can compute the shapes, control flow is not the cause: the input shapes are.
SHAPES_HINT = ("MNN could not compute the output shapes with these input shapes, on either API: check "
               "--mnn-input-shape (or the sidecar's [shapes]) against the shapes the model was exported for")


def runtime_error_text(run: RunOutput, log: str = "", hint: str | None = None) -> str:
    return (f"{run_failure(run)}; outputs were not read (MNN leaves stale data "
            f"after a failed run).\n  MNN said: {mnn_said(log or run.log)}\n  hint: {hint or runtime_hint(run)}")
