"""Which MNN runtime API runs a model: the session API, the Module API, or both.

``--mnn-api``:

* ``auto`` (default): the session API where the model runs in a session, the
  Module API where it cannot (a session's reference run fails, as it does for
  control flow: ``runSession`` returns 3 and every output is empty).  The item
  says which API ran and why.
* ``session`` / ``module``: that API only.  A model a session cannot run is a
  ``runtime_error`` naming MNN's shape error, never a result built from empty
  tensors.
* ``both``: the API is a matrix axis (``[session-CPU-low]``, ``[module-CPU-low]``),
  and each module item is also compared with the session API's outputs on the
  same backend x precision (``api_mismatch`` when they disagree beyond tolerance).

pymnn has no per-op callbacks for the Module API, so a module item is traced
layer by layer through the session API where a session can run the model, and
not at all where it cannot; the message says which.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from ..core.choices import API_MODES
from ..core.verdict import Category, judge_outputs
from ..mnn.backends import did_you_mean
from ..mnn.model import ModelError, model_key, remembered
from ..mnn.module_runner import API_MODULE, API_SESSION, ModuleModel

if TYPE_CHECKING:  # pragma: no cover
    from ..core.tolerances import Tolerance
    from ..mnn.runner import RunConfig
    from .results import ParityResult

TRACE_VIA_SESSION = ("through the session API on the same configuration, as pymnn has no per-op callbacks for "
                     "the Module API")
NO_TRACE = ("not traced: pymnn has no per-op callbacks for the Module API, and the session API cannot run "
            "this model")


def parse_api(value: str) -> str:
    mode = str(value).strip().lower()
    if mode not in API_MODES:
        raise ValueError(f"--mnn-api: expected one of {', '.join(API_MODES)}, got {value!r}"
                         f"{did_you_mean(mode, API_MODES)}")
    return mode


@dataclass(frozen=True)
class ApiChoice:
    api: str
    reason: str
    # Why a session cannot run the model ("" when it can or was not tried).
    session_failure: str = ""
    # --mnn-api both: the API is an axis of the matrix (part of the item id).
    axis: bool = False


class ApiSide:
    """The engine's API part: loaded modules, the auto choice per model, cross-API checks."""

    def __init__(self, engine):
        self.engine = engine
        self._modules: dict[Any, ModuleModel | ModelError] = {}
        self._choices: dict[Any, ApiChoice] = {}

    def module(self, path: os.PathLike | str) -> ModuleModel:

        key = model_key(path)

        def load() -> ModuleModel:
            shapes, sources = self.engine.shapes_for(key)  # --mnn-input-shape and a sidecar's [shapes]
            return ModuleModel(path, shapes, shape_sources=sources, declared_dims=self.engine.onnx.declared_dims(key),
                               source_name=getattr(self.engine.onnx.source_of(key), "name", ""))

        return remembered(self._modules, key, load)

    def resolve(self, path: os.PathLike | str, api: str | None) -> ApiChoice:
        """The API an item runs on: an explicit one, or the auto choice (also for ``both`` without an axis)."""
        mode = parse_api(api or self.engine.settings.api)
        if mode in (API_SESSION, API_MODULE):
            if self.engine.settings.api == "both":
                return ApiChoice(mode, "--mnn-api both: this item's API", axis=True)
            return ApiChoice(mode, f"--mnn-api {mode}")
        return self.choose(path)

    def choose(self, path: os.PathLike | str) -> ApiChoice:
        """auto: the session API if its reference run works, else the Module API (cached per model)."""

        key = model_key(path)
        if key not in self._choices:
            failure = self.session_failure(path)
            if failure is None:
                choice = ApiChoice(API_SESSION, "auto: the session API runs this model (MNN's own CPU run of it "
                                                "succeeded)")
            else:
                choice = ApiChoice(API_MODULE, f"auto: the session API cannot run this model ({failure}); the "
                                               "Module API runs it", failure)
            self._choices[key] = choice
        return self._choices[key]

    def session_failure(self, path: os.PathLike | str) -> str | None:
        """Why the session API cannot run ``path`` (its reference run fails), or None when it can.

        A model that does not load at all is left to the session path, whose
        errors already name the file and the fix.
        """
        from ..mnn.failures import mnn_said, run_failure
        from .results import EmptyReferenceOutputs, ReferenceRunError

        try:
            model = self.engine.model(path)
            if self.engine.onnx.reference_path(model) is None:
                self.engine.live_reference(model)  # a run here, even with a bundle as reference
                return None
        except (ReferenceRunError, EmptyReferenceOutputs) as exc:
            return f"{exc.reason}; MNN said: {mnn_said(exc.log)}"
        except ModelError:
            return None
        # An ONNX model's reference is ONNX Runtime, which says nothing of what an MNN session can run:
        # MNN's own run of the conversion decides.
        run = model.run(self.engine.reference_config, self.engine.inputs(model)[0])
        empty = [name for name, arr in run.outputs.items() if arr.size == 0]
        if not run.ok:
            return f"MNN's own run of it failed: {run_failure(run)}; MNN said: {mnn_said(run.log)}"
        if empty:
            return f"MNN's own run of it gave empty outputs {empty}; MNN said: {mnn_said(run.log)}"
        return None

    # -- both: the two APIs against each other --------------------------------------
    def cross_check(self, result: "ParityResult", path: os.PathLike | str, config: "RunConfig", tol: "Tolerance",
                    inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        """Compare a module item's outputs (input set A) with the session API's on the same configuration."""
        from ..mnn.failures import runtime_error_text

        try:
            session = self.engine.model(path)
            run = session.run(config, inputs)
        except ModelError as exc:
            result.cross_api = {"compared": False, "reason": f"the session API cannot load this model: {exc.reason}"}
            return
        empty = [name for name, arr in run.outputs.items() if arr.size == 0]
        if not run.ok or empty:
            why = runtime_error_text(run).splitlines()[0] if not run.ok else f"empty outputs {empty}"
            result.cross_api = {"compared": False, "reason": f"the session API cannot run this model: {why}"}
            return
        verdict = judge_outputs(outputs, run.outputs, tol)
        result.cross_api = {"compared": True, "against": f"session API on {config.describe()}",
                            "category": verdict.category.value,
                            "outputs": {v.name: v.as_dict() for v in verdict.outputs}}
        if result.category is Category.OK and not verdict.passed:
            result.category = Category.API_MISMATCH

    # -- tracing ------------------------------------------------------------------
    def session_for_trace(self, path: os.PathLike | str):
        """The session model to trace a module item with, or None where a session cannot run it."""
        if self.session_failure(path) is not None:
            return None
        try:
            return self.engine.model(path)
        except ModelError:
            return None

    def release(self, key) -> None:
        module = self._modules.pop(key, None)
        if isinstance(module, ModuleModel):
            module.close()
        self._choices.pop(key, None)
