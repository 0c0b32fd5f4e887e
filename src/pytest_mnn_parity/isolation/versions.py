"""Checks in other MNN releases: one isolated engine per release, and the bisection between two of them.

``--mnn-versions`` sends each item of a release to ``IsolatedEngine`` workers
whose Python is that release's environment (``envs.EnvCache``); the test
process keeps its own single MNN.  The reference is the same for every release:
the caller computes it once (in the test process) and each worker is judged
against it, so a release that changes the CPU's numbers shows as a change.

``bisect`` finds the first release whose verdict differs from the good end's,
by binary search over the releases between the two ends (each step one cached
environment); releases that cannot be installed here are left out and named.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from ..core.categories import Category
from ..engine.request import CheckRequest
from ..engine.results import ParityResult, ParitySettings
from ..mnn import backends
from .engine import IsolatedEngine, close_all, release_all
from .envs import EnvCache, MnnEnv

if TYPE_CHECKING:  # pragma: no cover
    from ..engine.engine import ParityEngine  # annotations: a run whose checks all run in workers never imports it (issue 22)


class ReleaseEngines:
    """One ``IsolatedEngine`` per MNN release, each started on its environment the first time it is needed."""

    def __init__(self, cache: EnvCache, settings: ParitySettings, *, timeout: float | None,
                 worker_per_model: bool = True, declarations: ParityEngine | None = None):
        self.cache = cache
        self.settings = settings
        self.timeout = timeout
        self.worker_per_model = worker_per_model
        self.declarations = declarations
        self._envs: dict[str, MnnEnv] = {}
        self._engines: dict[str, IsolatedEngine] = {}

    def env(self, version: str) -> MnnEnv:
        if version not in self._envs:
            self._envs[version] = self.cache.ensure(version)
        return self._envs[version]

    def engine(self, version: str) -> IsolatedEngine | None:
        env = self.env(version)
        if not env.ok:
            return None
        if version not in self._engines:
            self._engines[version] = IsolatedEngine(self.settings, timeout=self.timeout,
                                                    worker_per_model=self.worker_per_model, prespawn=False,
                                                    declarations=self.declarations, python=env.python)
        return self._engines[version]

    def backend_status(self, version: str, backend: str) -> backends.BackendStatus:
        """``backend`` as MNN ``version`` has it (probed in that release's worker); unavailable with the
        environment's reason when the release cannot be installed or imported here."""
        engine = self.engine(version)
        if engine is None:
            return backends.BackendStatus(backend, False, None, self.env(version).reason)
        return engine.backend_status(backend)

    def check_request(self, version: str, request: CheckRequest, *, bundle: Mapping[str, Any] | None = None,
                      sidecar: Any = None, reference: Any = None) -> ParityResult:
        engine = self.engine(version)
        if engine is None:
            result = ParityResult(os.fspath(request.model), request.config, Category.BACKEND_UNAVAILABLE,
                                  self.env(version).reason, variant=request.variant)
        else:
            result = engine.check_request(request, bundle=bundle, sidecar=sidecar, reference=reference)
        # The worker says which MNN it imported; a crash or timeout has no answer, so the release asked for.
        result.mnn_version = result.mnn_version or version
        return result

    def summary(self) -> list[str]:
        """One line per release used: where its environment is, and whether this run made it."""
        lines = []
        for version, env in self._envs.items():
            if env.ok:
                how = f"created in {env.seconds:.0f} s" if env.created else "cached"
                lines.append(f"MNN {version}: {env.python} ({how})")
            else:
                lines.append(f"MNN {version}: unavailable: {env.reason}")
        return lines

    def release(self, model_path: os.PathLike | str) -> None:
        release_all(self._engines.values(), model_path)

    def close(self) -> None:
        close_all(self._engines.values())
        self._engines.clear()


@dataclass
class Bisection:
    """What a bisection found: the last release judged like ``good`` and the first one judged otherwise."""

    good: str
    bad: str
    steps: list[str] = field(default_factory=list)  # the releases checked, in the order they were
    verdicts: dict[str, str] = field(default_factory=dict)  # release -> its verdict (category)
    unavailable: dict[str, str] = field(default_factory=dict)  # release -> why it could not run here
    last_same: str | None = None
    first_changed: str | None = None

    @property
    def changed(self) -> bool:
        return self.first_changed is not None


def bisect(releases: Sequence[str], judge: Callable[[str], str | None]) -> Bisection:
    """Binary search over ``releases`` (good end first) for the first whose verdict differs from the first's.

    ``judge(release)`` returns the verdict, or None where the release cannot run here: such a release is
    dropped and the search goes on over the others (a change is then placed between two releases that ran).
    Assumes one change point, as any bisection does; with several, it finds one of them.
    """
    todo = list(releases)
    result = Bisection(todo[0], todo[-1])

    def verdict(index: int) -> str | None:
        release = todo[index]
        if release not in result.verdicts and release not in result.unavailable:
            result.steps.append(release)
            said = judge(release)
            if said is None:
                result.unavailable[release] = "cannot run here"
            else:
                result.verdicts[release] = said
        return result.verdicts.get(release)

    while todo and verdict(0) is None:
        todo.pop(0)
    while len(todo) > 1 and verdict(len(todo) - 1) is None:
        todo.pop()
    if len(todo) < 2:
        return result
    good = verdict(0)
    if verdict(len(todo) - 1) == good:
        return result
    low, high = 0, len(todo) - 1  # todo[low] is judged like good, todo[high] is not
    while high - low > 1:
        mid = (low + high) // 2
        said = verdict(mid)
        if said is None:
            todo.pop(mid)
            high -= 1
            continue
        if said == good:
            low = mid
        else:
            high = mid
    result.last_same, result.first_changed = todo[low], todo[high]
    return result


def verdict_of(result: ParityResult) -> str | None:
    """The verdict a bisection compares: the category; None for a release that could not run."""
    if result.category is Category.BACKEND_UNAVAILABLE:
        return None
    return result.category.value


def metrics_line(result: ParityResult) -> str:
    """The numbers behind one release's verdict, for the bisection's message."""
    outputs = [v.metrics for v in (result.verdict.outputs if result.verdict else ()) if v.metrics is not None]
    if not outputs:
        return result.category.value + (f" ({result.message.splitlines()[0]})" if result.message else "")
    worst_abs = max(float(m.max_abs) for m in outputs)
    worst_cos = min(float(m.cosine) for m in outputs)
    zeros = max(float(m.zero_fraction) for m in outputs)
    return f"{result.category.value}: max|d| {worst_abs:.3g}, cosine {worst_cos:.6f}, zeros {zeros:.0%}"
