"""The pytest side of output bundles and goldens.

``--mnn-save-outputs DIR``: after each item, its outputs (and once per model
and process, the reference's) are written into the bundle at once, so memory
stays bounded; pytest-xdist workers write fragments side by side and the
controller merges the index at the end.  ``--mnn-golden DIR``: one extra item
per model, ``MODEL::golden``.
"""
from __future__ import annotations

import os
import shlex
from typing import TYPE_CHECKING, Any, Callable

import pytest

from ..core.categories import Category
from ..engine.bundle import BundleError, BundleWriter
from ..engine.results import ParityResult
from ..mnn.config import reference_config
from .items import PARITY_RUN, Case, ModelLoadFailure, ParityItem, node_id_path

if TYPE_CHECKING:  # pragma: no cover
    from ..engine.engine import ParityEngine
    from ..regression.bundle_saver import BundleSaver
    from .options import Options


class GoldenItem(ParityItem):
    """``MODEL::golden``: the model on CPU/high/1 thread against its committed golden."""

    def setup(self) -> None:
        self.result = self.config.stash[PARITY_RUN].regression.check_golden(self)
        if self.result.category is Category.MODEL_ERROR:
            raise ModelLoadFailure(self.result.message)


class Regression:
    def __init__(self, options: "Options", engine: Callable[[], ParityEngine]):
        """``engine`` makes (or returns) the run's in-process engine: called only by what computes in this process
        (a golden, a bundle's in-process outputs), so a run without them never makes it (issue 22)."""
        self.options = options
        self._engine = engine
        self.writer = BundleWriter(options.save_outputs) if options.save_outputs else None
        self._saver: BundleSaver | None = None
        self.index: dict[str, Any] | None = None
        self._references_saved: set[str] = set()

    @property
    def engine(self) -> ParityEngine:
        return self._engine()

    @property
    def saver(self) -> BundleSaver | None:
        if self.writer is not None and self._saver is None:
            from ..regression.bundle_saver import BundleSaver

            self._saver = BundleSaver(self.engine, self.writer, self.options.layers)
        return self._saver

    # -- session ---------------------------------------------------------------------
    def configure(self, config: pytest.Config) -> None:
        if self.writer is not None and not hasattr(config, "workerinput"):
            try:
                self.writer.start()
            except (BundleError, OSError) as exc:
                raise pytest.UsageError(str(exc)) from None

    def finish(self) -> None:
        """Controller only: merge the fragments every process wrote into the bundle's index."""
        if self.writer is not None and self.options.models:
            self.index = self.writer.finish()

    def items(self, collector) -> list[pytest.Item]:
        if self.options.golden is None:
            return []
        from ..regression.golden import LABEL as GOLDEN_LABEL

        return [GoldenItem.from_parent(collector, name=GOLDEN_LABEL, case=Case(reference_config(self.options.threads)))]

    # -- goldens ---------------------------------------------------------------------
    def check_golden(self, item: GoldenItem) -> ParityResult:
        from ..regression.golden import check_golden

        opts = self.options
        label = node_id_path(item.model_path, item.config.rootpath)
        base = f"{opts.reproduce_command(label, 'CPU', 'high')} --mnn-golden {shlex.quote(str(opts.golden))}"
        return check_golden(self.engine, item.model_path, opts.golden, label, update=opts.update_golden,
                            tolerance_layers=[("ini", opts.tolerance_ini), ("command line", opts.tolerance_cli)],
                            update_command=f"{base} --mnn-update-golden", reproduce=base, variant=item.case.variant)

    # -- bundles ---------------------------------------------------------------------
    def after_check(self, item: ParityItem, result: ParityResult) -> None:
        """Write this item's outputs into the bundle now, then let go of them.

        An isolated worker saves its items' outputs itself (``bundle_spec``): their results carry none."""
        computed, result.computed = result.computed, None
        if computed is None or self.saver is None:  # in this order: an isolated result needs no engine here
            return
        self.saver.save(result, computed, variant=item.case.variant, config=item.run_config, case_id=item.case.id,
                        set_name=item.case.input_set)

    def bundle_spec(self, item: ParityItem, label: str) -> dict[str, Any] | None:
        """What an isolated worker needs to save ``item``'s outputs as ``after_check`` would (None: no bundle)."""
        if self.writer is None:
            return None
        # Absolute: the worker's working directory is this process's at the worker's start, not necessarily now.
        return {"folder": os.path.abspath(self.writer.folder), "layers": self.options.layers, "label": label,
                "case_id": item.case.id, "set_name": item.case.input_set}

    # -- terminal --------------------------------------------------------------------
    def summary_lines(self, records: list[dict[str, Any]]) -> list[str]:
        lines = []
        goldens = []
        if self.options.golden is not None:  # golden records come from --mnn-golden's items only
            from ..regression.golden import LABEL as GOLDEN_LABEL

            goldens = [r for r in records if r.get("reference_label") == GOLDEN_LABEL and r["outcome"] == "passed"
                       and r.get("message")]
        for r in goldens:
            lines.append(r["message"])
        if goldens:
            counts: dict[str, int] = {}
            for r in goldens:
                word = r["message"].split(":", 1)[0].split()[-1]
                counts[word] = counts.get(word, 0) + 1
            lines.append(f"goldens in {self.options.golden}: " + ", ".join(f"{n} {w}" for w, n in counts.items()))
        if self.index is not None:
            lines.append(f"MNN output bundle: {self.options.save_outputs} ({len(self.index['entries'])} entries, "
                         f"MNN {', '.join(self.index['mnn_versions']) or '-'})")
        return lines
