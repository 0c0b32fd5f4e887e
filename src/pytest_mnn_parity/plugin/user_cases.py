"""Which model and configurations each of a user's tests runs on, and the models they share.

The pytest hooks (``user_fixtures``) ask this module for the ``pytest.param``s
of a test and for its case at run time; the models themselves live in a
``ModelRegistry`` (``user_parity``), one per run.
"""
from __future__ import annotations

import dataclasses
import os
import shlex
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from ..mnn import backends as backend_discovery
from ..mnn.model import ModelError, expand_model_args
from ..mnn.config import RunConfig
from .state import PARITY_RUN, node_id_path
from .user_markers import MarkerError, ParitySpec, parity_spec, select, xfail_specs

if TYPE_CHECKING:  # pragma: no cover
    from ..engine.user_inputs import ModelRegistry

CASE = "_mnn_parity_case"
USER_TESTS = pytest.StashKey["UserTests"]()
PLANNED = pytest.StashKey[tuple]()


class MissingModel(Exception):
    """A test uses a model fixture but neither a marker nor ``--mnn-model`` names a model."""


@dataclass(frozen=True, eq=False)
class UserCase:
    """What one of the user's test items runs on: a configuration (or none) and a model (or none)."""

    config: RunConfig | None
    model: Path | None = None
    model_label: str | None = None
    source: str = ""  # "marker", "--mnn-model" or "" (no model)
    reference: Path | None = None
    tolerance: tuple[tuple[str, float], ...] = ()
    error: ModelError | None = None
    id: str = ""
    reference_label: str | None = None
    # Set when the configuration's backend is required (--mnn-require-backends) but unavailable: the item fails.
    required_unavailable: str = ""


class UserTests:
    """Per-run state of the user-test layer: the cases, the shared models, what is still to run."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self._registry: ModelRegistry | None = None
        self._remaining: Counter = Counter()

    @property
    def options(self):
        return self.config.stash[PARITY_RUN].options

    @property
    def registry(self) -> ModelRegistry:
        if self._registry is None:
            # Imported here: pytest imports this module at every start-up, the engine only a test that uses it needs.
            from ..engine.engine import ParityEngine
            from ..engine.user_inputs import ModelRegistry

            # An engine of its own: the generated items free their models when
            # their last item ran, which must not pull a model from under a test.
            settings = dataclasses.replace(self.config.stash[PARITY_RUN].settings)
            self._registry = ModelRegistry(ParityEngine(settings))
        return self._registry

    # -- cases ------------------------------------------------------------------
    def params(self, node, needs_config: bool) -> list | None:
        """``pytest.param``s for a test, or None when it runs once as it is."""
        spec = parity_spec(node.iter_markers("mnn_parity"), node.nodeid)
        xfails = xfail_specs(node.iter_markers("mnn_xfail"), node.nodeid)
        models = self.models(spec, node)
        if not needs_config:
            if len(models) <= 1:
                return None
            return [pytest.param(case, id=case.model_label) for case in models]
        configs, empty_reason = self.configs(spec)
        params = []
        for base in models or [UserCase(None, tolerance=spec.tolerance)]:
            prefix = f"{base.model_label}-" if len(models) > 1 else ""
            if not configs:
                params.append(pytest.param(dataclasses.replace(base, id=prefix + "none"), id=prefix + "none",
                                           marks=pytest.mark.skip(reason=empty_reason)))
            for run_config in configs:
                marks = []
                status = backend_discovery.discover([run_config.backend])[run_config.backend]
                missing = ""
                if not status.available and self.options.requires(run_config.backend):
                    missing = self.options.required_unavailable(run_config.backend, status.reason)
                elif not status.available:
                    marks.append(pytest.mark.skip(reason=status.reason))
                matching = [x for x in xfails if x.matches(run_config)]
                if matching:
                    strict = {} if matching[0].strict is None else {"strict": matching[0].strict}
                    marks.append(pytest.mark.xfail(reason=matching[0].reason, **strict))
                case = dataclasses.replace(base, config=run_config, id=prefix + run_config.id,
                                           required_unavailable=missing)
                params.append(pytest.param(case, id=case.id, marks=marks))
        return params

    def single_case(self, node) -> UserCase:
        models = self.models(parity_spec(node.iter_markers("mnn_parity"), node.nodeid), node)
        return models[0] if models else UserCase(None)

    def models(self, spec: ParitySpec, node) -> list[UserCase]:
        """The marker's model (relative to the test file), else every model ``--mnn-model`` names."""
        base = Path(node.path).parent
        root = self.config.rootpath
        options = self.options
        reference = _under(base, spec.reference) if spec.reference else None
        if spec.model is not None:
            targets = [(_under(base, spec.model), None)]
            source = "marker"
        else:
            targets = [(t.path, t.error) for t in expand_model_args(options.models, options.invocation_dir)]
            source = "--mnn-model"
            if reference is None and options.reference:
                reference = _under(options.invocation_dir, options.reference)
        reference_label = _label(reference, root) if reference is not None else None
        return [UserCase(None, path, _label(path, root), source, reference, spec.tolerance, error,
                         reference_label=reference_label) for path, error in targets]

    def configs(self, spec: ParitySpec) -> tuple[list[RunConfig], str]:
        options = self.options
        backends = select(spec.backends, options.backends, self._explicit("backends"))
        precisions = select(spec.precisions, options.precisions, self._explicit("precisions"))
        configs = [RunConfig(b, p, options.threads) for b in backends for p in precisions]
        empty = [(kind, wanted, allowed) for kind, wanted, allowed, chosen in (
            ("backends", spec.backends, options.backends, backends),
            ("precisions", spec.precisions, options.precisions, precisions)) if not chosen]
        reason = "; ".join(f"the mnn_parity marker asks for {kind} {','.join(wanted or ())} but --mnn-{kind} "
                           f"(or ini mnn_{kind}) allows only {','.join(allowed)}: no configuration in common"
                           for kind, wanted, allowed in empty)
        return configs, reason

    def _explicit(self, name: str) -> bool:
        return (self.config.getoption(f"mnn_{name}") is not None
                or self.config.getini(f"mnn_{name}") not in ("", None, []))

    def case_of(self, item) -> UserCase:
        callspec = getattr(item, "callspec", None)
        param = callspec.params.get(CASE) if callspec is not None else None
        return param if isinstance(param, UserCase) else self.single_case(item)

    # -- models -----------------------------------------------------------------
    def plan(self, items) -> None:
        for item in items:
            if CASE not in getattr(item, "fixturenames", ()):
                continue
            try:
                case = self.case_of(item)
            except MarkerError:
                continue  # reported when the test sets up
            paths = tuple(p.resolve() for p in (case.model, case.reference) if p is not None)
            self._remaining.update(paths)
            item.stash[PLANNED] = paths

    def done(self, item) -> None:
        for path in item.stash.get(PLANNED, ()):
            self._remaining[path] -= 1
            if self._remaining[path] <= 0 and self._registry is not None:
                self._registry.release(path)

    # -- reporting --------------------------------------------------------------
    def reproduce_command(self, item, case: UserCase) -> str:
        options = self.options
        parts = ["pytest", item.nodeid]
        if case.source == "--mnn-model":
            for model in options.models:
                parts += ["--mnn-model", model]
            parts += ["-m", "not mnn_generated"]  # the generated items of --mnn-model are not this test
            if options.reference and case.reference is not None:
                parts += ["--mnn-reference", options.reference]
        if options.threads != 4:
            parts += ["--mnn-threads", str(options.threads)]
        if options.layers != "on-failure":
            parts += ["--mnn-layers", options.layers]
        for name, dims in options.input_shapes.items():
            parts += ["--mnn-input-shape", f"{name}={'x'.join(map(str, dims))}"]
        for name, value in options.tolerance_cli.items():
            parts += [f"--mnn-{name.replace('_', '-')}", f"{value:g}"]
        return " ".join(shlex.quote(p) for p in parts)


def _label(path: Path, root: Path) -> str:
    """The path as the report names it: relative to the rootdir, through symlinks as written."""
    try:
        return Path(os.path.abspath(path)).relative_to(os.path.abspath(root)).as_posix()
    except ValueError:
        return node_id_path(path, root)


def _under(base: Path, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else base / p
