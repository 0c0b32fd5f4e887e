"""Fixtures and markers for a model repository's own tests (docs/fixtures.md).

A test that uses ``mnn_config`` (directly, or through ``mnn_run`` or
``mnn_parity``) runs once per backend x precision, with ids like
``test_psnr[CPU-low]``; configurations whose backend this MNN build cannot
really run are skipped with the same reason as the generated items.  Each such
test leaves one record on its report (``report.mnn_parity``), so its result
joins the terminal matrix and the JSON report, also from pytest-xdist workers.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import pytest

from ..core.categories import Category
from ..mnn import backends as backend_discovery
from ..mnn.model import ModelError
from ..mnn.config import RunConfig
from .user_cases import CASE, USER_TESTS, MissingModel, UserCase, UserTests
from .user_markers import MARKER_HELP, MARKER_SOURCE, MarkerError, required_backends
from .user_report import (
    LAST_RUN,
    RESULTS,
    SETUP_FAILURE,
    RunSummary,
    classify,
    matrix_case,
    unavailable_reasons,
    user_record,
    worst_result,
)

# Why a test fails without running: its configuration's backend (or one its mnn_requires_backend marker names)
# is required by --mnn-require-backends and this machine lacks it.
REQUIRED_MISSING = pytest.StashKey[str]()

# The engine is imported by the fixtures that use it: pytest imports this module at every start-up.
if TYPE_CHECKING:  # pragma: no cover
    from ..engine.results import ParityResult
    from ..engine.user_inputs import MnnOutputs, ModelUnderTest
    from ..mnn.runner import LoadedModel

FIXTURES = ("mnn_config", "mnn_model", "mnn_run", "mnn_reference", "mnn_parity")


class ParityCheckFailed(AssertionError):
    """``mnn_parity`` found outputs outside tolerance; the text is the full failure message."""

    # As pytest does for its outcome exceptions: the one-line summary then
    # reads "ParityCheckFailed: zero_output on CPU-low: ..." instead of
    # spending the line on the module path.
    __module__ = "builtins"

    def __init__(self, result: ParityResult):
        super().__init__(result.message)
        self.result = result


def under_test(tests: UserTests, node, case: UserCase) -> ModelUnderTest:
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
        mut = tests.registry.get(case.model, case.reference, case.model_label, case.reference_label)
        mut.model
    return mut


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
        from ..engine.user_inputs import MnnInputError, MnnRunError

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
        case = matrix_case(item)
        if case is not None and case.required_unavailable:
            item.stash[REQUIRED_MISSING] = case.required_unavailable
        marks = list(item.iter_markers("mnn_requires_backend"))
        if not marks:
            continue
        try:
            names = required_backends(marks, item.nodeid)
        except MarkerError:
            continue  # pytest_runtest_setup fails the test with the message
        options = item.config.stash[USER_TESTS].options
        for status in backend_discovery.discover(names).values():
            if not status.available and options.requires(status.name):
                item.stash[REQUIRED_MISSING] = options.required_unavailable(status.name, status.reason)
                break
            if not status.available:
                item.add_marker(pytest.mark.skip(reason=status.reason))
                break


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    # Before the test function: a configuration whose required backend is missing fails without running it.
    missing = item.stash.get(REQUIRED_MISSING, "")
    if missing:
        item.stash[SETUP_FAILURE] = (Category.BACKEND_UNAVAILABLE.value, missing)
        pytest.fail(missing, pytrace=False)


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
    case = matrix_case(item)
    if case is None or call.when == "teardown":
        return (yield)
    category, message = item.stash.get(SETUP_FAILURE, None) or classify(
        call.excinfo, item.stash.get(RESULTS, []), unavailable_reasons(item, case))
    worst = worst_result(item.stash.get(RESULTS, []))
    if call.when == "call" or (call.excinfo is not None and category != "skipped"):
        from .run_report import junit_properties

        props = list(junit_properties(worst)) if worst is not None else [("mnn_category", category)]
        item.user_properties.extend((k, category if k == "mnn_category" else v) for k, v in props)
    report = yield
    if call.when == "call" or not report.passed:
        report.mnn_parity = user_record(item, case, report, category, message)
    return report


def _argnames(mark) -> list[str]:
    names = mark.args[0] if mark.args else mark.kwargs.get("argnames", ())
    return [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)


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
    return under_test(tests, request.node, _mnn_parity_case).model


@pytest.fixture
def mnn_run(request: pytest.FixtureRequest, _mnn_parity_case: UserCase, mnn_config: RunConfig,
            mnn_model: LoadedModel) -> Callable[[Any], MnnOutputs]:
    """``mnn_run(inputs) -> {output name: array}`` on this item's configuration."""
    mut = under_test(request.config.stash[USER_TESTS], request.node, _mnn_parity_case)
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
    mut = under_test(request.config.stash[USER_TESTS], request.node, _mnn_parity_case)
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
    mut = under_test(tests, request.node, _mnn_parity_case)
    return ParityCheck(tests, request.node, _mnn_parity_case, mnn_config, mut)
