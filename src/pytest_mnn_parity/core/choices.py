"""The words an enumerated option accepts, kept apart from the code that acts on them.

``plugin/options.py`` needs these at every pytest start-up (to parse and to print ``--help``); the modules that
act on them (the engine, the isolation policy, the artefact writer) import MNN's runner, the trace and Pillow.
Defined here, they cost a pytest run that never checks a model nothing (docs/architecture.md).
"""
from __future__ import annotations

# --mnn-api (engine/apis.py)
API_MODES = ("auto", "session", "module", "both")
# --mnn-layers (engine/results.py)
LAYER_MODES = ("off", "on-failure", "always")
# --mnn-isolate (isolation/policy.py)
ISOLATE_MODES = ("auto", "always", "never")
# --mnn-worker-scope: "model" gives every model a fresh worker process, "run" keeps one for all models.
WORKER_SCOPES = ("model", "run")
# --mnn-artifacts-when (report/artifacts.py)
ARTIFACT_MODES = ("on-failure", "always")
# --mnn-op-sweep (trace/sweep.py): which ops run alone
SWEEP_MODES = ("off", "flagged", "all")
