"""What a parity check is configured with and what it returns (dataclasses, no behaviour).

``ParitySettings`` configures a ``parity.ParityEngine``; ``ParityResult`` is one
configuration's judgement; ``Reference`` is what a model's configurations are judged
against; the two exceptions say why a reference could not be computed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from ..core.tolerances import Tolerance
from ..core.verdict import Category, Verdict
from ..inputs.sets import InputSet
from ..mnn import arithmetic as mnn_arithmetic
from ..mnn.failures import run_failure, runtime_hint
from ..mnn.limits import DEFAULT_MAX_INPUT_MB
from ..mnn.model import ModelError
from ..mnn.runner import LoadedModel, RunConfig, RunOutput
from ..mnn.weights import WeightRisk
from ..trace.record import ActivationRisk, TraceResult
from ..trace.sweep import SweepResult


@dataclass
class ParitySettings:
    seed: int = 0
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    # None: the same model on CPU/high/1 thread.  A path: another .mnn with the
    # same inputs and outputs, run on that same reference configuration.
    reference: str | None = None
    threads: int = 4
    # Per-layer tracing: "off", "on-failure" (trace a configuration whose
    # outputs are wrong) or "always".
    layers: str = "on-failure"
    # One input set larger than this (MiB) is refused before it is allocated.
    max_input_mb: float | None = DEFAULT_MAX_INPUT_MB
    # ONNX models: where converted variants are cached (None: a temporary
    # folder for this engine) and extra MNNConvert flags for every variant.
    convert_cache: str | None = None
    converter_flags: tuple[str, ...] = ()
    # Called with (result, targets, references, layer_arrays) for every
    # configuration whose outputs were judged, while the arrays exist (e.g.
    # artifacts.ArtifactWriter); results never keep arrays themselves.
    output_sink: Callable[..., None] | None = None
    # Which MNN API runs the models: "auto", "session", "module" or "both" (see apis.py).
    api: str = "auto"
    # Streaming declarations (stream.StreamSpec): state outputs fed back into inputs, step by step.
    streams: tuple = ()
    # Keep each result's outputs (``ParityResult.computed``) for the caller to save
    # (--mnn-save-outputs); the plugin writes and drops them right after the check.
    keep_outputs: bool = False
    # The op sweep (trace.sweep): "off", "flagged" (the ops a failing item's trace flagged) or "all" (every
    # op of every item); and where failing items' repro bundles go (engine.repro), None for none.
    op_sweep: str = "off"
    repro: str | None = None


class ReferenceRunError(ModelError):
    """The reference configuration itself could not run the model."""

    def __init__(self, path: Path, run: RunOutput, session_log: str = ""):
        self.run = run
        super().__init__(path, f"the reference run failed: {run_failure(run)}",
                         runtime_hint(run), session_log + run.log)


class EmptyReferenceOutputs(ModelError):
    """The reference run returned success but left outputs empty (shapes MNN could not compute)."""


@dataclass
class Reference:
    description: str
    outputs_a: dict[str, np.ndarray]
    outputs_b: dict[str, np.ndarray]
    fp16_risks: list[ActivationRisk] = field(default_factory=list)
    weight_risks: list[WeightRisk] = field(default_factory=list)
    # What --mnn-reference named, for the matrix ("" = what the settings say: cpu, a path, onnxruntime).
    label: str = ""
    # A bundle entry computed at reduced precision needs that looser tier (see bundle_reference).
    arithmetic: str | None = None
    # A bundle entry's saved per-layer trace (``bundle.BundleTrace``), if any.
    trace: Any = None


@dataclass
class Computed:
    """What a check computed, for ``--mnn-save-outputs``: the model that ran, its input set, its outputs."""

    model: LoadedModel
    input_set: InputSet | None
    outputs_a: dict[str, np.ndarray]
    outputs_b: dict[str, np.ndarray]


@dataclass
class ParityResult:
    model: str
    config: RunConfig
    category: Category
    message: str
    backend_used: str | None = None
    forward_type: int | None = None
    tolerance: Tolerance | None = None
    verdict: Verdict | None = None
    reference: str = ""
    input_set: str = ""
    rc: int | None = None
    seconds: float = 0.0
    log: str = ""
    first_divergent_layer: dict[str, Any] | None = None
    variant: str | None = None
    arithmetic: mnn_arithmetic.Arithmetic | None = None
    trace: TraceResult | None = None
    fp16_risks: list[ActivationRisk] = field(default_factory=list)
    # {input name: {"nan", "inf", "size", "sets"}} when an input set holds NaN/Inf (allowed, but reported).
    inputs_nonfinite: dict[str, Any] | None = None
    # Set when the check ran in an isolated worker (isolation.py): {"pid", "index"}.
    worker: dict[str, Any] | None = None
    # Set for crashed/timeout: how the worker ended (signal, exit code, stderr tail).
    fault: dict[str, Any] | None = None
    weight_risks: list[WeightRisk] = field(default_factory=list)
    # How the tested .mnn was made from an ONNX model ("" for a given .mnn).
    conversion: str = ""
    # Where a named input set's arrays came from (files, generators), for the message.
    input_detail: str = ""
    # A hypothesis search's summary (search items only), see ``search``.
    search: dict[str, Any] | None = None
    # What an output_sink wrote (artifacts.ArtifactWriter: picture paths); None without one.
    artifacts: dict[str, Any] | None = None
    # The MNN API that ran ("session" or "module") and why; see apis.py.
    api: str | None = None
    api_reason: str = ""
    api_axis: bool = False
    # What is known of the backend where it cannot be read back (Module API).
    backend_note: str = ""
    trace_note: str = ""
    # --mnn-api both: a module item's outputs against the session API's.
    cross_api: dict[str, Any] | None = None
    # Streaming models: every step's judgement and the first failing step (stream.stream_record).
    stream: dict[str, Any] | None = None
    # Which reference, as given: "cpu", a path, "onnxruntime", "bundle DIR::SELECTOR", "golden".
    reference_label: str = ""
    # The MNN release that ran this check when it was not the test process's own (--mnn-versions, --mnn-bisect).
    mnn_version: str | None = None
    # --mnn-bisect: the releases checked, their verdicts and metrics, the first release that changed.
    bisect: dict[str, Any] | None = None
    # Where the check ran when not in this machine's own CPU (--mnn-cpu, --mnn-remote): the place's name, the
    # emulated CPU or the host, and the CPU features MNN detected there (isolation/places.py).
    place: dict[str, Any] | None = None
    # --mnn-op-sweep: each op alone against the reference's output of it (trace.sweep.SweepResult).
    op_sweep: SweepResult | None = None
    # --mnn-repro: where this item's repro bundle was written, or why it was not ({"dir"} or {"error"}).
    repro: dict[str, Any] | None = None
    # The outputs behind the verdict, with ``ParitySettings.keep_outputs`` only.
    computed: Computed | None = field(default=None, repr=False)

    @property
    def passed(self) -> bool:
        return self.category is Category.OK

    @property
    def skipped(self) -> bool:
        return self.category is Category.BACKEND_UNAVAILABLE

    def outputs_dict(self) -> dict[str, Any]:
        if self.verdict is None:
            return {}
        return {v.name: v.as_dict() for v in self.verdict.outputs}
