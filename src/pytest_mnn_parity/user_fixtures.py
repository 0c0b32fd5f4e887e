"""Fixtures and markers for a model repository's own tests (docs/fixtures.md).

A test that uses ``mnn_config`` (directly, or through ``mnn_run`` or
``mnn_parity``) runs once per backend x precision, with ids like
``test_psnr[CPU-low]``; configurations whose backend this MNN build cannot
really run are skipped with the same reason as the generated items.  Each such
test leaves one record on its report (``report.mnn_parity``), so its result
joins the terminal matrix and the JSON report, also from pytest-xdist workers.
"""
from __future__ import annotations

import dataclasses
import os
import shlex
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import pytest

from . import backends as backend_discovery
from .items import PARITY_RUN, node_id_path
from .model import ModelError, expand_model_args
from .parity import ParityEngine, ParityResult
from .report import record
from .runner import LoadedModel, RunConfig
from .user_markers import (MARKER_HELP, MARKER_SOURCE, MarkerError, ParitySpec, matrix_row, parity_spec,
                           required_backends, select, xfail_specs)
from .user_parity import MnnInputError, MnnOutputs, MnnRunError, ModelRegistry, ModelUnderTest
from .verdict import CATEGORY_ORDER, Category

CASE = "_mnn_parity_case"
USER_TESTS = pytest.StashKey["UserTests"]()
RESULTS = pytest.StashKey[list]()
LAST_RUN = pytest.StashKey["RunSummary"]()
PLANNED = pytest.StashKey[tuple]()
SETUP_FAILURE = pytest.StashKey[tuple]()
FIXTURES = ("mnn_config", "mnn_model", "mnn_run", "mnn_reference", "mnn_parity")


class MissingModel(Exception):
    """A test uses a model fixture but neither a marker nor ``--mnn-model`` names a model."""


class ParityCheckFailed(AssertionError):
    """``mnn_parity`` found outputs outside tolerance; the text is the full failure message."""

    # As pytest does for its outcome exceptions: the one-line summary then
    # reads "ParityCheckFailed: zero_output on CPU-low: ..." instead of
    # spending the line on the module path.
    __module__ = "builtins"

    def __init__(self, result: ParityResult):
        super().__init__(result.message)
        self.result = result


@dataclass(frozen=True)
class RunSummary:
    """Where and how fast a test's last ``mnn_run`` ran (kept instead of its outputs, which can be large)."""

    forward_type: int | None
    backend_used: str | None
    seconds: float
    rc: int


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
            # An engine of its own: the generated items free their models when
            # their last item ran, which must not pull a model from under a test.
            settings = dataclasses.replace(self.config.stash[PARITY_RUN].engine.settings)
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
                if not status.available:
                    marks.append(pytest.mark.skip(reason=status.reason))
                matching = [x for x in xfails if x.matches(run_config)]
                if matching:
                    strict = {} if matching[0].strict is None else {"strict": matching[0].strict}
                    marks.append(pytest.mark.xfail(reason=matching[0].reason, **strict))
                case = dataclasses.replace(base, config=run_config, id=prefix + run_config.id)
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
    def under_test(self, node, case: UserCase) -> ModelUnderTest:
        """The test's model, loaded; at fixture setup, so a model that cannot load is a setup error."""
        __tracebackhide__ = True
        with user_errors(case, node, setup=True):
            if case.model is None:
                wanted = [n for n in FIXTURES if n in node.fixturenames]
                raise MissingModel(f"{node.nodeid} uses {', '.join(wanted)} but names no model: add "
                                   f"@pytest.mark.mnn_parity(model=\"model.mnn\") (a path relative to the test "
                                   f"file's directory) or run pytest with --mnn-model PATH")
            if case.error is not None:
                raise case.error
            mut = self.registry.get(case.model, case.reference, case.model_label, case.reference_label)
            mut.model
        return mut

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


class user_errors:
    """Engine errors told the way a test's author needs them.

    A model error names the model as the report does (relative to the
    rootdir) with a fix that fits where its path came from.  At fixture setup
    the error becomes a setup failure without a traceback into the plugin; in
    a call it is re-raised from the test's own line.
    """

    def __init__(self, case: UserCase, node, setup: bool = False):
        self.case, self.node, self.setup = case, node, setup

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        __tracebackhide__ = True
        if isinstance(exc, ModelError):
            exc = _explained(self.case, exc)
        elif not isinstance(exc, (MnnRunError, MnnInputError, MissingModel)):
            return False
        if self.setup:
            category = exc.category.value if isinstance(exc, MnnRunError) else Category.MODEL_ERROR.value
            self.node.stash[SETUP_FAILURE] = (category, str(exc))
            raise pytest.fail.Exception(str(exc), pytrace=False) from None
        raise exc.with_traceback(None) from None


def _explained(case: UserCase, exc: ModelError) -> ModelError:
    path, fix = exc.path, exc.fix
    is_reference = case.reference is not None and _same(exc.path, case.reference)
    if case.model is not None and _same(exc.path, case.model):
        path = Path(case.model_label)
    elif is_reference:
        path = Path(case.reference_label)
    if exc.reason == "no such file":
        if case.source == "marker":
            fix = "paths in @pytest.mark.mnn_parity(model=..., reference=...) are relative to the test file's directory"
        elif is_reference:
            fix = "check --mnn-reference (relative to the directory pytest was started in)"
    return ModelError(path, exc.reason, fix, exc.log)


def _same(a: Path, b: Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


class ParityCheck:
    """What ``mnn_parity`` gives a test: call it to compare outputs; ``results`` holds every comparison."""

    def __init__(self, tests: UserTests, item, case: UserCase, config: RunConfig, mut: ModelUnderTest):
        self._tests, self._item, self._case, self._config, self._mut = tests, item, case, config, mut
        self.results: list[ParityResult] = item.stash.setdefault(RESULTS, [])

    def __call__(self, outputs: Mapping[str, Any], reference: Mapping[str, Any] | None = None, *,
                 fail: bool = True, **overrides: float) -> ParityResult:
        """Judge ``outputs`` against ``reference`` (default: the reference run on the outputs' inputs).

        Tolerances: built-in tier < ini < the mnn_parity marker < these
        keyword arguments < command line.  Raises ``ParityCheckFailed`` with
        the failure message unless ``fail=False``; the result is recorded either way.
        """
        __tracebackhide__ = True
        options = self._tests.options
        layers = [("ini", options.tolerance_ini), (MARKER_SOURCE, dict(self._case.tolerance)),
                  ("mnn_parity call", overrides), ("command line", options.tolerance_cli)]
        with user_errors(self._case, self._item):
            result = self._mut.compare(outputs, reference, config=self._config, tolerance_layers=layers,
                                       reproduce=self._tests.reproduce_command(self._item, self._case))
        self.results.append(result)
        if fail and not result.passed:
            raise ParityCheckFailed(result)
        return result


# -- hooks ----------------------------------------------------------------------

def pytest_configure(config: pytest.Config) -> None:
    for name, text in MARKER_HELP.items():
        config.addinivalue_line("markers", text)
    config.stash[USER_TESTS] = UserTests(config)


@pytest.hookimpl(trylast=True)  # after @pytest.mark.parametrize, so the configuration ends the id
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if CASE not in metafunc.fixturenames:
        return
    needs_config = "mnn_config" in metafunc.fixturenames and not any(
        "mnn_config" in _argnames(m) for m in metafunc.definition.iter_markers("parametrize"))
    try:
        params = metafunc.config.stash[USER_TESTS].params(metafunc.definition, needs_config)
    except MarkerError:
        # Not a collection error, which would stop the whole run: the test
        # stays one item and its setup fails with the message.
        return
    if params is not None:
        metafunc.parametrize(CASE, params, indirect=True)


def pytest_collection_finish(session: pytest.Session) -> None:
    session.config.stash[USER_TESTS].plan(session.items)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list) -> None:
    # A skip mark (not a skip raised later) so the skip is reported at the test's own location.
    for item in items:
        marks = list(item.iter_markers("mnn_requires_backend"))
        if not marks:
            continue
        try:
            names = required_backends(marks, item.nodeid)
        except MarkerError:
            continue  # pytest_runtest_setup fails the test with the message
        for status in backend_discovery.discover(names).values():
            if not status.available:
                item.add_marker(pytest.mark.skip(reason=status.reason))
                break


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    marks = list(item.iter_markers("mnn_requires_backend"))
    if marks:
        try:
            required_backends(marks, item.nodeid)
        except MarkerError as exc:
            message = str(exc)
        else:
            return
        pytest.fail(message, pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem):
    try:
        return (yield)
    finally:
        item.config.stash[USER_TESTS].done(item)


@pytest.hookimpl(wrapper=True, tryfirst=True)  # outermost: sees the outcome after xfail handling
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    case = _matrix_case(item)
    if case is None or call.when == "teardown":
        return (yield)
    category, message = item.stash.get(SETUP_FAILURE, None) or classify(
        call.excinfo, item.stash.get(RESULTS, []), _unavailable_reasons(item, case))
    worst = worst_result(item.stash.get(RESULTS, []))
    if call.when == "call" or (call.excinfo is not None and category != "skipped"):
        from .plugin import _junit_properties

        props = list(_junit_properties(worst)) if worst is not None else [("mnn_category", category)]
        item.user_properties.extend((k, category if k == "mnn_category" else v) for k, v in props)
    report = yield
    if call.when == "call" or not report.passed:
        report.mnn_parity = user_record(item, case, report, category, message)
    return report


def user_record(item, case: UserCase, report, category: str, message: str) -> dict[str, Any]:
    """The report entry of one user test item; the layout of generated items' plus ``test`` and ``checks``."""
    results = item.stash.get(RESULTS, [])
    worst = worst_result(results)
    base = worst if worst is not None else ParityResult(case.model_label, case.config, Category.OK, "")
    last = item.stash.get(LAST_RUN, None)
    if worst is None and last is not None:
        base.forward_type, base.backend_used = last.forward_type, last.backend_used
        base.seconds, base.rc = last.seconds, last.rc
    data = record(item.nodeid, base, _outcome(report))
    data.update(model=case.model_label, category=category, message=message,
                test=matrix_row(item.nodeid, case.config.id), checks=len(results))
    return data


def classify(excinfo, results: list[ParityResult], unavailable: set[str]) -> tuple[str, str]:
    """A user test's category: its worst comparison, else how it stopped."""
    worst = worst_result(results)
    exc = excinfo.value if excinfo is not None else None
    if worst is not None and not worst.passed:
        return worst.category.value, worst.message
    if isinstance(exc, MnnRunError):
        return exc.category.value, str(exc)
    if isinstance(exc, (ModelError, MissingModel)):
        return Category.MODEL_ERROR.value, str(exc)
    if isinstance(exc, pytest.skip.Exception):
        reason = str(exc.msg)
        return ("backend_unavailable" if reason in unavailable else "skipped"), reason
    if exc is not None:
        return "test_failed", excinfo.exconly()[:2000]
    return Category.OK.value, ""


def worst_result(results: list[ParityResult]) -> ParityResult | None:
    """The most severe comparison, the first among equals."""
    return min(results, key=lambda r: CATEGORY_ORDER.index(r.category)) if results else None


def _unavailable_reasons(item, case: UserCase) -> set[str]:
    names = [case.config.backend]
    try:
        names += required_backends(item.iter_markers("mnn_requires_backend"), item.nodeid)
    except MarkerError:
        pass
    return {s.reason for s in backend_discovery.discover(names).values() if not s.available}


def _matrix_case(item) -> UserCase | None:
    callspec = getattr(item, "callspec", None)
    case = callspec.params.get(CASE) if callspec is not None else None
    return case if isinstance(case, UserCase) and case.config is not None else None


def _outcome(report) -> str:
    if hasattr(report, "wasxfail"):
        return "xfailed" if report.skipped else "xpassed"
    if report.when != "call" and report.failed:
        return "error"
    return report.outcome


def _argnames(mark) -> list[str]:
    names = mark.args[0] if mark.args else mark.kwargs.get("argnames", ())
    return [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)


def _label(path: Path, root: Path) -> str:
    """The path as the report names it: relative to the rootdir, through symlinks as written."""
    try:
        return Path(os.path.abspath(path)).relative_to(os.path.abspath(root)).as_posix()
    except ValueError:
        return node_id_path(path, root)


def _under(base: Path, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else base / p


# -- fixtures -------------------------------------------------------------------

@pytest.fixture
def _mnn_parity_case(request: pytest.FixtureRequest) -> UserCase:
    param = getattr(request, "param", None)
    if isinstance(param, UserCase):
        return param
    try:
        return request.config.stash[USER_TESTS].single_case(request.node)
    except MarkerError as exc:
        message = str(exc)
    pytest.fail(message, pytrace=False)


@pytest.fixture
def mnn_config(_mnn_parity_case: UserCase) -> RunConfig:
    """The backend x precision this test item runs on (the test runs once per configuration)."""
    if _mnn_parity_case.config is None:
        pytest.fail("mnn_config has no configuration for this test", pytrace=False)
    return _mnn_parity_case.config


@pytest.fixture
def mnn_model(request: pytest.FixtureRequest, _mnn_parity_case: UserCase) -> LoadedModel:
    """The test's model, loaded once per run and shared by every test that names it."""
    tests = request.config.stash[USER_TESTS]
    return tests.under_test(request.node, _mnn_parity_case).model


@pytest.fixture
def mnn_run(request: pytest.FixtureRequest, _mnn_parity_case: UserCase, mnn_config: RunConfig,
            mnn_model: LoadedModel) -> Callable[[Any], MnnOutputs]:
    """``mnn_run(inputs) -> {output name: array}`` on this item's configuration."""
    mut = request.config.stash[USER_TESTS].under_test(request.node, _mnn_parity_case)
    node = request.node

    def run(inputs):
        __tracebackhide__ = True
        with user_errors(_mnn_parity_case, node):
            outputs = mut.run(mnn_config, inputs)
        node.stash[LAST_RUN] = RunSummary(outputs.forward_type, outputs.backend_used, outputs.seconds, outputs.rc)
        return outputs

    return run


@pytest.fixture
def mnn_reference(request: pytest.FixtureRequest, _mnn_parity_case: UserCase,
                  mnn_model: LoadedModel) -> Callable[[Any], MnnOutputs]:
    """``mnn_reference(inputs) -> {output name: array}`` from the reference (CPU, high, 1 thread)."""
    mut = request.config.stash[USER_TESTS].under_test(request.node, _mnn_parity_case)
    node = request.node

    def reference(inputs):
        __tracebackhide__ = True
        with user_errors(_mnn_parity_case, node):
            return mut.reference(inputs)

    return reference


@pytest.fixture
def mnn_parity(request: pytest.FixtureRequest, _mnn_parity_case: UserCase, mnn_config: RunConfig,
               mnn_model: LoadedModel) -> ParityCheck:
    """``mnn_parity(outputs, reference=None, fail=True, **tolerances)``: judge and record (see ParityCheck)."""
    tests = request.config.stash[USER_TESTS]
    mut = tests.under_test(request.node, _mnn_parity_case)
    return ParityCheck(tests, request.node, _mnn_parity_case, mnn_config, mut)
