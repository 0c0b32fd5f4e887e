"""One check, asked as one object: which model, which configuration, judged how, on which inputs.

``ParityEngine``, ``IsolatedEngine`` and the plugin's ``Isolation`` all answer
``check_request(CheckRequest)``; the worker protocol sends the request itself
(``isolation/protocol.py``), so a new check option is a field here and
nowhere else.  ``Checker.check(model, config, ...)`` is the keyword form for
scripts and tests; it builds the request.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ..inputs.sets import InputSet
from ..mnn.runner import RunConfig

# Tolerance overrides, lowest first: (where they come from, {field: value}); see core.tolerances.resolve.
Layers = Sequence[tuple[str, Mapping[str, Any] | None]]


@dataclass(frozen=True)
class CheckRequest:
    """What ``check`` is asked.

    ``variant``: the conversion variant of an ``.onnx`` model (``fp32`` when
    None).  ``input_set``: a named set (None: seeded generated inputs).
    ``output_tolerances`` / ``layer_tolerances``: override layers for some
    outputs / traced ops.  ``api``: "session", "module" or "auto" (None: the
    engine's setting).  ``reproduce``: the command a failure message ends with.
    """

    model: os.PathLike | str
    config: RunConfig
    tolerance_layers: Layers = ()
    reproduce: str = ""
    variant: str | None = None
    input_set: InputSet | None = None
    output_tolerances: Mapping[str, Layers] | None = None
    layer_tolerances: Mapping[str, Layers] | None = None
    api: str | None = None


class Checker:
    """The keyword form of ``check_request``, written once for every engine that answers requests."""

    def check_request(self, request: CheckRequest, **extra: Any):  # pragma: no cover - each engine defines it
        raise NotImplementedError

    def check(self, model: os.PathLike | str | CheckRequest, config: RunConfig | None = None,
              tolerance_layers: Layers = (), reproduce: str = "", variant: str | None = None,
              input_set: InputSet | None = None, output_tolerances: Mapping[str, Layers] | None = None,
              layer_tolerances: Mapping[str, Layers] | None = None, api: str | None = None, **extra: Any):
        """``check(CheckRequest(...))``, or the same fields as arguments; ``extra`` goes to
        ``check_request`` (an isolated engine's ``bundle`` and ``sidecar``)."""
        if isinstance(model, CheckRequest):
            return self.check_request(model, **extra)
        if config is None:
            raise TypeError("check() needs a RunConfig, e.g. check('model.mnn', RunConfig('CPU', 'low'))")
        request = CheckRequest(model, config, tuple(tolerance_layers), reproduce, variant, input_set,
                               output_tolerances, layer_tolerances, api)
        return self.check_request(request, **extra)
