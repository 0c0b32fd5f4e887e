"""One pytest run's state: the engine, the isolation policy and the items' checks (their records and the report
files: ``run_report``).

The hooks (``hooks.py``) create one ``ParityRun`` per pytest run, keep it in the
config's stash (``items.PARITY_RUN``) and hand every event to it.
"""
from __future__ import annotations

import platform
import sys
from collections import Counter
from dataclasses import replace
from functools import cached_property
from typing import TYPE_CHECKING

import pytest

from ..core.categories import Category
from ..mnn.library import mnn_version
from ..mnn.model import ModelError, is_model_file
from .options import Options
from .run_report import RunReport, junit_properties
from .state import is_parity_item, node_id_path

# What checks a model (the engine, isolation, items, regression) is imported when a run first needs it: pytest
# imports this module at every start-up, and most runs of a repository's own tests never check a model.
if TYPE_CHECKING:  # pragma: no cover
    from ..engine.declarations import Declarations
    from ..engine.engine import ParityEngine
    from ..engine.request import CheckRequest
    from ..engine.results import ParityResult, ParitySettings
    from ..isolation.policy import Isolation
    from ..report.artifacts import ArtifactWriter
    from .input_items import SidecarSupport
    from .items import Case, ModelFile, ParityItem
    from .regression import Regression


# pytest's cache key of what backend discovery and the arithmetic probes found (``load_discovery``).
DISCOVERY_CACHE = "mnn-parity/discovery"


class ParityRun:
    """Per-pytest-run state: the engine, the isolation, the items' checks; ``report`` keeps their records."""

    def __init__(self, options: Options):
        self.options = options
        # Lines for the user while something slow happens outside any item (an environment being built); the
        # hooks point it at the terminal.
        self.say = lambda line: print(line, file=sys.stderr, flush=True)
        self._remaining: Counter = Counter()
        self.active = bool(options.models)
        # Model node ids given as arguments: the items come from pytest's own collection (hooks.collect_file).
        self.pasted = False
        # Set at session end: why each backend of --mnn-require-backends is missing (hooks.pytest_sessionfinish).
        self.missing_required: list[str] = []
        # The items' records and the report files written from them.
        self.report = RunReport(options, self.backend_status, lambda: self.active)
        # pytest's cache folder for converted ONNX models (hooks.configure), read when the engine is made.
        self.convert_cache: str | None = None

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.report.add(report)

    # The engine and what hangs off it are made on first use (see the imports above).
    @cached_property
    def writer(self) -> ArtifactWriter | None:
        if self.options.artifacts is None:
            return None
        from ..report.artifacts import ArtifactWriter

        return ArtifactWriter(self.options.artifacts, self.options.artifacts_when)

    @cached_property
    def settings(self) -> ParitySettings:
        """The engines' settings: the in-process engine's own object, and what every worker is started with."""
        from ..engine.results import ParitySettings

        options = self.options
        settings = ParitySettings(seed=options.seed, input_shapes=options.input_shapes,
                                  reference=options.reference, threads=options.threads,
                                  layers=options.layers, converter_flags=options.convert_flags,
                                  output_sink=self.writer, api=options.api, streams=options.streams,
                                  max_input_mb=options.max_input_mb,
                                  keep_outputs=options.save_outputs is not None,
                                  op_sweep=options.op_sweep,
                                  repro=None if options.repro is None else str(options.repro))
        if self.convert_cache is not None:
            settings.convert_cache = self.convert_cache
        return settings

    @cached_property
    def declarations(self) -> Declarations:
        """What the sidecars declared per model (shapes, streams): sent to the workers with each check, and given
        to the in-process engine when one is made."""
        from ..engine.declarations import Declarations

        return Declarations(self.settings)

    @cached_property
    def engine(self) -> ParityEngine:
        """The in-process engine: made only when a check, a golden, a bundle or a search runs in this process.  A
        run whose configurations all run in isolated workers (the default) never makes it (issue 22)."""
        from ..engine.engine import ParityEngine

        engine = ParityEngine(self.settings)
        self.declarations.attach(engine)
        return engine

    @cached_property
    def isolation(self) -> Isolation:
        from ..isolation.envs import EnvCache
        from ..isolation.policy import DEFAULT_ISOLATED_TIMEOUT, Isolation
        from ..isolation.versions import ReleaseEngines

        options = self.options
        isolation = Isolation(lambda: self.engine, options.isolate, options.timeout, options.backends,
                              options.worker_scope, settings=self.settings, declarations=self.declarations)
        if options.versions or options.bisect:
            isolation.releases = ReleaseEngines(
                EnvCache(options.env_cache), self.settings,
                timeout=options.timeout if options.timeout is not None else DEFAULT_ISOLATED_TIMEOUT,
                worker_per_model=options.worker_scope == "model", declarations=self.declarations)
        if options.cpus or options.remotes:
            from ..isolation.places import PlaceEngines

            isolation.places = PlaceEngines(
                options.cpus + options.remotes, options.env_cache, self.settings,
                timeout=options.timeout if options.timeout is not None else DEFAULT_ISOLATED_TIMEOUT,
                declarations=self.declarations,
                ssh_config=None if options.ssh_config is None else str(options.ssh_config),
                progress=lambda line: self.say(line))
        return isolation

    @cached_property
    def inputs(self) -> SidecarSupport:
        from .input_items import SidecarSupport

        return SidecarSupport(self)

    @cached_property
    def regression(self) -> Regression:
        from .regression import Regression

        return Regression(self.options, lambda: self.engine)

    # -- discovery kept between runs ---------------------------------------------------
    def load_discovery(self, cache) -> None:
        """What an earlier run's discovery and arithmetic probes found, from pytest's cache (``config.cache``),
        when nothing that could change it has changed (``kept_results.discovery_key``); else this run probes."""
        from ..mnn import kept_results

        self._discovery_key = kept_results.discovery_key()
        kept = cache.get(DISCOVERY_CACHE, None)
        self._discovery_kept = None
        if isinstance(kept, dict) and kept.get("key") == self._discovery_key:
            try:
                kept_results.remember_results(kept.get("results") or {})
                self._discovery_kept = kept.get("results")
            except (TypeError, ValueError):  # written by another version of the plugin: probe again
                self._discovery_kept = None

    def save_discovery(self, cache) -> None:
        """Keep what this run's probes found for the next run (only when it found something new)."""
        if getattr(self, "_discovery_key", None) is None:
            return
        from ..mnn import kept_results

        results = kept_results.known_results()
        if results["statuses"] or results["arithmetic"]:
            if results != self._discovery_kept:
                cache.set(DISCOVERY_CACHE, {"key": self._discovery_key, "results": results})

    def made(self, name: str) -> bool:
        """Whether the lazily made part ``name`` (engine, isolation, regression, ...) exists yet."""
        return name in self.__dict__

    # -- collection -------------------------------------------------------------
    def collect(self, session: pytest.Session) -> list[pytest.Item]:
        from ..mnn.model import expand_model_args

        if not self.options.models:
            return []
        if self.pasted:
            return []  # node ids on the command line: pytest collected just those (collect_file)
        items: list[pytest.Item] = []
        for target in expand_model_args(self.options.models, self.options.invocation_dir):
            nodeid = node_id_path(target.path, session.config.rootpath)
            collector = self.model_file(session, target.path, target.error, nodeid=nodeid)
            collected = list(collector.collect())
            # Tell the terminal (and any other listener) what was collected, as
            # regular collection would: "collected N items" must count these.
            session.ihook.pytest_collectreport(report=pytest.CollectReport(nodeid, "passed", None, collected))
            items.extend(collected)
        return items

    def model_file(self, parent: pytest.Collector, path, error: ModelError | None = None, **kwargs) -> ModelFile:
        """The collector of one model: its load error, or its sidecar read (the same for both ways in)."""
        from ..mnn.model import check_model_path
        from .items import ModelFile

        if error is None:
            try:
                check_model_path(path)
                self.inputs.load(path)
            except ModelError as exc:
                error = exc
        collector = ModelFile.from_parent(parent, path=path, **kwargs)
        collector.error = error
        return collector

    def pasted_model(self, file_path, session: pytest.Session) -> bool:
        """A model file named on the command line (``pytest 'x.mnn::parity[CPU-low]'``, what -v and the failure
        header print): pytest collects it itself, and only the ids given."""
        return session.isinitpath(file_path) and is_model_file(file_path)

    def cases(self, model_path) -> list[Case]:
        """Every item to generate for one model, in a stable order; an ONNX model once per conversion variant,
        each configuration once per API with --mnn-api both, per MNN release with --mnn-versions, per GPU mode
        (of the backends it applies to) with --mnn-gpu-modes."""
        from ..mnn.config import RunConfig
        from ..onnx.variants import is_onnx
        from .items import Case

        apis = ["session", "module"] if self.options.api == "both" else [None]
        variants = self.options.convert if is_onnx(model_path) else [None]
        sets = self.inputs.set_names(model_path)
        if None not in sets and self.declarations.streams.spec_for(model_path) is not None:
            # A declared stream runs on seeded steps (it feeds back its own state): with named input sets beside
            # it, it gets items of its own rather than being dropped without a word.
            sets = [*sets, None]
        releases = self.options.versions or [None]
        # This machine first, then each place; an emulated CPU has the CPU backend only.
        places = [None] + [p for p in self.options.cpus + self.options.remotes]
        return [Case(RunConfig(backend, precision, self.options.threads, mode), variant=variant,
                     input_set=input_set, api=api, mnn_version=release, bisect=self.options.bisect,
                     place=None if place is None else place.name)
                for release in releases for place in places for api in apis for variant in variants
                for input_set in sets for backend in self.options.backends
                if place is None or not place.cpu_only or backend == "CPU"
                for precision in self.options.precisions for mode in self.modes_for(backend)]

    def modes_for(self, backend: str) -> list[str | None]:
        """The GPU modes asked for that ``backend`` reads; [None] (its plain items) when it reads none."""
        from ..mnn.backends import gpu_mode_applies

        return [m for m in self.options.gpu_modes if gpu_mode_applies(m, backend)] or [None]

    def backend_status(self, backend: str, case: Case | None = None):
        if case is not None and case.mnn_version is not None:
            return self.isolation.releases.backend_status(case.mnn_version, backend)
        if case is not None and case.place is not None:
            return self.isolation.places.backend_status(case.place, backend)
        return self.isolation.backend_status(backend)

    def required_missing(self) -> list[str]:
        """Why each backend of --mnn-require-backends is not really there (empty: all are)."""
        missing = []
        for backend in self.options.require_backends:
            status = self.backend_status(backend)
            if not status.available:
                missing.append(self.options.required_unavailable(backend, status.reason))
        return missing

    def plan(self, items: list[pytest.Item]) -> None:
        if not any(is_parity_item(item) for item in items):
            return  # no model to check: no engine, no worker to plan for
        from .items import ParityItem

        self._remaining = Counter(item.model_path for item in items if isinstance(item, ParityItem))
        # Only items that will run count: asking for the per-model engine starts its first worker, and on a
        # machine without the backend (every GPU item skipped) that interpreter imported numpy and MNN for
        # nothing, next to the run's one CPU worker (on 2 cores, on the critical path: issue 22's timeline).
        self.isolation.expect_models(len({item.model_path for item in items if isinstance(item, ParityItem)
                                          and self.isolation.per_model(item.run_config.backend)
                                          and item.get_closest_marker("skip") is None}))

    # -- running ----------------------------------------------------------------
    def check(self, item: ParityItem) -> ParityResult:
        from ..engine.request import CheckRequest
        from ..engine.results import ParityResult

        config = item.run_config
        model = node_id_path(item.model_path, item.config.rootpath)
        # Tolerance layers, input set; or a bad sidecar's error (checked by the worker for an isolated item).
        checks = self.inputs.prepare(item, in_worker=self.isolation.isolates(config.backend))
        variant = item.case.variant
        if self.writer is not None:
            self.writer.label = item.nodeid
        reproduce = self.options.reproduce_command(model, config.backend, config.precision, variant,
                                                   input_set=item.case.input_set, api=item.case.api,
                                                   gpu_mode=config.gpu_mode, mnn_version=item.case.mnn_version,
                                                   bisect=item.case.bisect, place=item.case.place)
        if isinstance(checks, ParityResult):
            result = checks
        else:
            # Isolated or not, one request: the worker protocol carries it whole.
            sidecar = checks.pop("sidecar", None)
            request = CheckRequest(item.model_path, config, reproduce=reproduce, variant=variant,
                                   api=item.case.api, **checks)
            if item.case.mnn_version is not None or item.case.bisect is not None:
                result = self.check_releases(item, request, sidecar)
            elif item.case.place is not None:
                result = self.check_place(item, request, sidecar)
            else:
                result = self.isolation.check_request(request, bundle=self.regression.bundle_spec(item, model),
                                                      sidecar=sidecar)
        result.model = model
        self.regression.after_check(item, result)
        for name, value in junit_properties(result):
            item.user_properties.append((name, value))
        return result

    def check_releases(self, item: ParityItem, request: CheckRequest, sidecar) -> ParityResult:
        """An item of another MNN release (--mnn-versions), or the bisection between two (--mnn-bisect)."""
        from ..engine.results import ParityResult
        from ..isolation.envs import EnvError, between
        from ..isolation.versions import bisect, verdict_of
        from ..onnx.variants import is_onnx

        releases = self.isolation.releases
        if is_onnx(request.model):
            return ParityResult(str(request.model), request.config, Category.BACKEND_UNAVAILABLE,
                                f"{request.model}: --mnn-versions / --mnn-bisect run .mnn models; an .onnx model "
                                "is converted by the test process's MNN, so convert it once (MNNConvert) and pass "
                                "the .mnn with --mnn-reference model.onnx", variant=request.variant)
        reference = self.shared_reference(request)
        if item.case.mnn_version is not None:
            return releases.check_request(item.case.mnn_version, request, sidecar=sidecar, reference=reference)
        good, bad = item.case.bisect
        try:
            chosen = between(releases.cache.releases(), good, bad)
        except EnvError as exc:
            return ParityResult(str(request.model), request.config, Category.BACKEND_UNAVAILABLE, str(exc))
        missing = [v for v in (good, bad) if v not in chosen]
        if missing:
            return ParityResult(str(request.model), request.config, Category.BACKEND_UNAVAILABLE,
                                f"--mnn-bisect {good}..{bad}: {', '.join(missing)} is not a release on the package "
                                f"index; its releases are {', '.join(releases.cache.releases())}")
        results: dict[str, ParityResult] = {}

        def judge(version: str) -> str | None:
            results[version] = releases.check_request(version, request, sidecar=sidecar, reference=reference)
            return verdict_of(results[version])

        found = bisect(chosen, judge)
        for version in found.unavailable:
            found.unavailable[version] = results[version].message
        return bisection_result(request, found, results, chosen)

    def check_place(self, item: ParityItem, request: CheckRequest, sidecar) -> ParityResult:
        """An item at an emulated CPU or on another machine, judged against this machine's reference."""
        from ..engine.results import ParityResult
        from ..onnx.variants import is_onnx

        if is_onnx(request.model):
            return ParityResult(str(request.model), request.config, Category.BACKEND_UNAVAILABLE,
                                f"{request.model}: --mnn-cpu / --mnn-remote run .mnn models; an .onnx model is "
                                "converted by this machine's MNN, so convert it once (MNNConvert) and pass the .mnn "
                                "with --mnn-reference model.onnx", variant=request.variant)
        reference = self.shared_reference(request)
        if reference is not None:
            reference = replace(reference, description=f"{reference.description[:-1]}, {platform.machine()})")
        return self.isolation.places.check_request(item.case.place, request, sidecar=sidecar, reference=reference)

    def shared_reference(self, request: CheckRequest):
        """The reference every MNN release is judged against: this process's, computed once (None when the
        reference is a bundle, which each release reads itself, or cannot be computed here: the worker says why)."""
        if self.engine.bundle is not None or request.api == "module":
            return None
        try:
            model = self.engine.model(request.model)
            reference = self.engine.live_reference(model, request.input_set)
        except ModelError:
            return None
        return replace(reference, description=f"{reference.description}, MNN {mnn_version()} (the test process)")

    def done(self, item: pytest.Item, nextitem: pytest.Item | None = None) -> None:
        """After an item: a model whose items are over is let go (its interpreter and sessions, reference,
        traces, inputs, conversions, in this process and in its isolated worker).

        Without pytest-xdist a model's items run together, and the count says when the last one ran.  Under
        pytest-xdist every worker collects every item but runs only those it is sent, so the count never reaches
        zero there: a worker let go of nothing, and held every model it had touched (two workers were OOM-killed
        at 13 and 18.5 GB on large models).  There a model is let go when the next item is of another model; if
        more of its items come later (``--dist load`` sends them in chunks) it is loaded again: bounded memory
        before speed.  ``--dist loadgroup`` sends a model's items to one worker together, and loads it once."""
        if not is_parity_item(item):
            return
        from .items import ParityItem

        if isinstance(item, ParityItem):
            self._remaining[item.model_path] -= 1
            over = self._remaining[item.model_path] <= 0
            if not over and hasattr(item.config, "workerinput"):
                over = getattr(nextitem, "model_path", None) != item.model_path
            if over:
                self.isolation.release(item.model_path)


def bisection_result(request: CheckRequest, found, results: dict, chosen: list[str]) -> ParityResult:
    """The bisect item's result: the bad end's judgement, with what the search found in front of its message."""
    from ..engine.results import ParityResult
    from ..isolation.versions import metrics_line

    ran = [v for v in chosen if v in results and v not in found.unavailable]
    if not ran:
        base = ParityResult(str(request.model), request.config, Category.BACKEND_UNAVAILABLE,
                            f"--mnn-bisect {found.good}..{found.bad}: no release in the range could run here: "
                            + "; ".join(f"{v}: {why}" for v, why in found.unavailable.items()))
        base.bisect = {"good": found.good, "bad": found.bad, "releases": chosen, "steps": found.steps,
                       "verdicts": {}, "unavailable": found.unavailable, "first_changed": None, "last_same": None}
        return base
    end = results[ran[-1]]
    lines = [f"bisect {found.good}..{found.bad} ({len(chosen)} releases on the index, {len(found.steps)} checked: "
             f"{', '.join(found.steps)})"]
    if found.changed:
        before, after = results[found.last_same], results[found.first_changed]
        turn = "broke" if before.passed and not after.passed else ("got fixed" if after.passed else "changed")
        lines += [f"first release whose verdict changed: {found.first_changed} (it {turn} there)",
                  f"  {found.last_same}: {metrics_line(before)}",
                  f"  {found.first_changed}: {metrics_line(after)}"]
    else:
        lines.append(f"no change: every release checked gives {found.verdicts.get(ran[0])} "
                     f"({ran[0]}: {metrics_line(results[ran[0]])})")
    for version, why in found.unavailable.items():
        lines.append(f"  left out {version}: {why.splitlines()[0] if why else 'cannot run here'}")
    end.bisect = {"good": found.good, "bad": found.bad, "releases": chosen, "steps": found.steps,
                  "verdicts": found.verdicts, "unavailable": found.unavailable, "first_changed": found.first_changed,
                  "last_same": found.last_same,
                  "metrics": {v: metrics_line(results[v]) for v in found.steps if v in results}}
    # The item fails when the search found a change (the finding asked for); with none, it is the bad end's.
    if found.changed:
        after = results[found.first_changed]
        end.category = after.category if not after.passed else Category.OK
        end.message = "\n".join(lines) + ("\n\n" + after.message if after.message else "")
        end.bisect["changed"] = True
    else:
        end.message = "\n".join(lines) + ("\n\n" + end.message if end.message else "")
    return end


