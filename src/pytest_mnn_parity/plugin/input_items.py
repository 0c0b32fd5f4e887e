"""The pytest side of sidecars: input-set cases, tolerance layers, xfail marks and search items."""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest

from ..core.categories import Category
from ..engine.results import ParityResult
from ..engine.search import describe_inputs, replay_snippet, save, search, seed_from
from ..inputs import test_data
from ..inputs.sets import InputSet
from ..inputs.sidecar import Sidecar, find_sidecar
from ..mnn.backends import did_you_mean, forward_name
from ..mnn.model import ModelError
from ..onnx.variants import is_onnx
from .items import PARITY_RUN, ModelLoadFailure, ParityFailure, ParityItem, node_id_path


class SearchItem(ParityItem):
    """``search[...]``: a hypothesis search for an input that breaks one configuration."""

    def setup(self) -> None:
        run = self.config.stash[PARITY_RUN]
        self.result = run.inputs.search(self)
        if self.result.category is Category.MODEL_ERROR:
            raise ModelLoadFailure(self.result.message)


class SidecarSupport:
    """Per-run state of the sidecars: which model has which, and what they ask of each item."""

    def __init__(self, run):  # the run.ParityRun this serves
        self.run = run
        self.options = run.options
        self.sidecars: dict[Path, Sidecar | None] = {}
        self._validated: set[Path] = set()

    # -- collection -------------------------------------------------------------
    def load(self, model_path: Path) -> Sidecar | None:
        """Read the model's sidecar (``ModelError`` if it is broken) and declare its shapes and stream to the run
        (``run.declarations``: the workers get them with each check, an in-process engine when it is made)."""
        key = Path(model_path).resolve()
        sidecar = find_sidecar(model_path, self.options.rootpath)
        self.sidecars[key] = sidecar
        shapes, source = (sidecar.shapes, f"{sidecar.label} [shapes]") if sidecar is not None else ({}, "")
        stored = next((s for s in sidecar.input_sets if s.expected_from and s.error is None), None) if sidecar else None
        if stored is not None and set(test_data.shapes_of(stored)) - set(shapes):
            # ONNX graphs are often dynamic, and stored outputs are for exactly the stored inputs' shapes.
            shapes, source = {**test_data.shapes_of(stored), **shapes}, f"{stored.where.file}"
        if shapes:
            self.run.declarations.set_input_shapes(model_path, shapes, source)
        if sidecar is not None and sidecar.stream is not None:
            self.run.declarations.streams.declare(model_path, sidecar.stream)
        self.set_names(model_path)  # unknown --mnn-input-sets names are this model's error
        return sidecar

    def sidecar(self, model_path: Path) -> Sidecar | None:
        return self.sidecars.get(Path(model_path).resolve())

    def set_names(self, model_path: Path) -> list[str | None]:
        """The input sets to run: the declared ones (filtered by ``--mnn-input-sets``), or [None] (seeded)."""
        sidecar = self.sidecar(model_path)
        declared = [s.name for s in sidecar.input_sets] if sidecar is not None else []
        wanted = self.options.input_sets
        if not wanted:
            return list(declared) or [None]
        chosen = [name for name in declared if name in wanted]
        if not chosen:
            where = sidecar.file if sidecar is not None else model_path
            close = "".join(did_you_mean(name, declared) for name in wanted)
            raise ModelError(where, f"--mnn-input-sets {','.join(wanted)}{close}: {Path(model_path).name} declares "
                                    f"{'input sets ' + ', '.join(declared) if declared else 'no input sets'}",
                             "name declared input sets (see docs/inputs.md), or drop --mnn-input-sets")
        return chosen

    def extra_items(self, collector: pytest.Collector, items: list[pytest.Item]) -> list[pytest.Item]:
        """Search items (``--mnn-hypothesis``), then the sidecar's xfail marks on every item."""
        extra: list[pytest.Item] = []
        if self.options.hypothesis:
            extra = [SearchItem.from_parent(collector, name=f"search[{item.case.id}]", case=item.case)
                     for item in items if isinstance(item, ParityItem)]
        sidecar = self.sidecar(collector.path)
        for item in [*items, *extra]:
            if sidecar is None or not isinstance(item, ParityItem):
                continue
            config = item.run_config
            xfail = sidecar.xfail_for(config.backend, config.precision, item.case.input_set)
            if xfail is not None:
                # raises=ParityFailure: a model or sidecar error is never an expected failure.
                item.add_marker(pytest.mark.xfail(reason=f"{sidecar.label}: {xfail.reason}", strict=True,
                                                  raises=ParityFailure))
                item.mnn_xfail = xfail.reason
        return extra

    # -- running ----------------------------------------------------------------
    def prepare(self, item: ParityItem, in_worker: bool = False) -> dict[str, Any] | ParityResult:
        """engine.check's keyword arguments for ``item``, or the MODEL_ERROR result of a bad sidecar.

        ``in_worker``: the item runs in an isolated worker, which checks the sidecar against the model
        (``sidecar`` in the keywords): loading a model here could crash this process, which is what
        isolation exists to prevent (a corrupt file does crash MNN while it creates a session)."""
        config = item.run_config
        sidecar = self.sidecar(item.model_path)
        input_set = sidecar.input_set(item.case.input_set) if sidecar and item.case.input_set else None
        ini, cli = ("ini", self.options.tolerance_ini), ("command line", self.options.tolerance_cli)
        layers = [ini, sidecar.tolerance_layer(), cli] if sidecar is not None else [ini, cli]
        kwargs: dict[str, Any] = {"tolerance_layers": layers, "input_set": input_set}
        if sidecar is None:
            return kwargs
        if in_worker:
            kwargs["sidecar"] = sidecar
        else:
            try:
                self._validate(item, sidecar)
            except ModelError as exc:
                return ParityResult(self._label(item), config, Category.MODEL_ERROR, str(exc), log=exc.log,
                                    input_set=item.case.input_set or "")
        # The command line stays last: it overrides every tier, the sidecar's included.
        kwargs["output_tolerances"] = {name: [*layers[:-1], sidecar.output_layer(name), cli]
                                       for name in sidecar.output_tolerances}
        kwargs["layer_tolerances"] = {name: [*layers[:-1], sidecar.layer_layer(name), cli]
                                      for name in sidecar.layer_tolerances}
        return kwargs

    def _validate(self, item: ParityItem, sidecar: Sidecar) -> None:
        """Once per model, before it runs: the sidecar against the model, and every input set built.

        The engine does not cache a set that fails to build, so a broken set
        raises its error again for its own items only; a problem with the
        sidecar as a whole is raised here, for every item of the model.
        """
        model = self._model(item)
        if model is None:
            return  # the engine reports why the model cannot load
        sidecar.check_model(model, Path(item.model_path).name, self.run.engine.layer_names(item.model_path)
                            if sidecar.layer_tolerances else None)
        key = Path(model.path).resolve()
        if key not in self._validated:
            self._validated.add(key)
            for input_set in sidecar.input_sets:
                try:
                    self.run.engine.inputs(model, input_set)
                except ModelError:
                    pass  # raised again when that set's items run

    def _model(self, item: ParityItem):
        try:
            return self.run.engine.model(self._mnn_path(item))
        except ModelError:
            return None

    def _mnn_path(self, item: ParityItem) -> Path:
        """The .mnn an item runs: for an ONNX model, its conversion for the item's variant."""
        if is_onnx(item.model_path):
            return self.run.engine.onnx.converted(item.model_path, item.case.variant or "fp32")[0]
        return item.model_path

    def _label(self, item: ParityItem) -> str:
        return node_id_path(item.model_path, item.config.rootpath)

    # -- the search -------------------------------------------------------------
    def search(self, item: ParityItem) -> ParityResult:
        seed = seed_from(item.config.getoption("hypothesis_seed", None))
        seed = self.options.seed if seed is None else seed
        result = self._search(item, seed)
        result.variant = item.case.variant
        if result.search is None:  # an error: still a search row in the matrix and the report
            result.search = {"max_examples": self.options.hypothesis, "seed": seed, "runs": 0, "found": False}
        return result

    def _search(self, item: ParityItem, seed: Any) -> ParityResult:
        config, label = item.run_config, self._label(item)
        prepared = self.prepare(item)
        if isinstance(prepared, ParityResult):
            return prepared
        engine = self.run.engine
        input_set: InputSet | None = prepared["input_set"]
        variant = item.case.variant
        try:
            if input_set is not None and input_set.error is not None:
                raise input_set.error
            path = self._mnn_path(item)
            tol = engine.tolerance(config, prepared["tolerance_layers"], variant, model_path=path)
            own = {k: engine.tolerance(config, v, variant, model_path=path)
                   for k, v in prepared.get("output_tolerances", {}).items()}
            engine.reference(engine.model(path), input_set)  # the model and its reference can run
            outcome = search(engine, path, config, tol, max_examples=self.options.hypothesis, seed=seed,
                             input_set=input_set, output_tolerances=own)
        except ModelError as exc:
            return ParityResult(label, config, Category.MODEL_ERROR, str(exc), log=exc.log)
        set_label = item.case.input_set or "seeded"
        search_again = (self.options.reproduce_command(label, config.backend, config.precision, item.case.variant,
                                                       input_set=item.case.input_set)
                        + f" --mnn-hypothesis {self.options.hypothesis} --hypothesis-seed {shlex.quote(str(seed))}")
        if self.options.hypothesis_dir_given:
            search_again += f" --mnn-hypothesis-dir {shlex.quote(str(self.options.hypothesis_dir))}"
        if not outcome.found:
            forward, _ = engine.model(path).session_backend(config)
            return ParityResult(label, config, Category.OK, "", forward_name(forward), forward, tol,
                                input_set=set_label, search=outcome.as_dict())
        stem = f"{Path(label).name.removesuffix('.mnn')}-{set_label}-{config.id}"
        saved = save(outcome, self.options.hypothesis_dir, stem)
        found = InputSet.from_arrays(outcome.name, outcome.inputs, label=str(saved))
        result = engine.check(item.model_path, config, prepared["tolerance_layers"], variant=variant, input_set=found,
                              output_tolerances=prepared.get("output_tolerances"),
                              layer_tolerances=prepared.get("layer_tolerances"))
        result.model = label
        # B (mirrored) passed too and A-only judging disagreed (a degenerate pair counts as agreeing here: the
        # search judged this very input as failing): keep the search's verdict.
        if result.passed or result.category is Category.DEGENERATE_REFERENCE:
            result.verdict, result.category = outcome.verdict, outcome.verdict.category
        file, snippet = replay_snippet(item.model_path, self.sidecar(item.model_path), outcome.name, saved,
                                       outcome.inputs, item.config.rootpath)
        replay = self.options.reproduce_command(label, config.backend, config.precision, item.case.variant,
                                                input_set=outcome.name)
        body = result.message.splitlines()[1:] if result.message else []
        verb = "add this input set to" if file.exists() else "create"
        lines = [result.message.splitlines()[0] if result.message else f"{result.category.value} on {config.id}",
                 f"search:    found after {outcome.runs_to_first} example(s) of up to {outcome.max_examples} "
                 f"(input set {set_label}, hypothesis seed {seed}), then shrunk in "
                 f"{outcome.runs - outcome.runs_to_first} more run(s)",
                 f"minimal:   {describe_inputs(outcome.inputs)}",
                 f"saved:     {saved}",
                 *body, "",
                 f"replay:    {verb} {node_id_path(file, item.config.rootpath)} (paths are relative to it):",
                 *("  " + line for line in snippet.splitlines()),
                 f"then:      {replay}",
                 f"reproduce: {search_again}"]
        result.message = "\n".join(lines)
        result.input_set, result.search = set_label, outcome.as_dict()
        return result


def xfail_outcome(item: pytest.Item, report: pytest.TestReport) -> str:
    """The report outcome of an item the sidecar expects to fail: xfailed, xpassed (strict) or as reported."""
    reason = getattr(item, "mnn_xfail", None)
    if reason is None:
        return report.outcome
    if getattr(report, "wasxfail", None) is not None and report.skipped:
        return "xfailed"
    result = getattr(item, "result", None)
    if report.failed and result is not None and result.passed:
        result.message = f"[XPASS(strict)] expected to fail ({reason}), but every output is within tolerance"
        return "xpassed"
    return report.outcome

