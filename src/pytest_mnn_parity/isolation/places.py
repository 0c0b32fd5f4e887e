"""Where else configurations run: emulated ARM CPUs (``--mnn-cpu``) and other machines (``--mnn-remote``).

A place is an axis of the matrix, like an MNN release (``versions.py``): every
item of a place runs in an ``IsolatedEngine`` whose workers start there
(``launch.py``), and is judged against the reference this process computes
(x86, CPU high), so an item compares the place's arithmetic with ours.

* ``arm64:CPU`` (``--mnn-cpu``): the CPU configurations under
  ``qemu-aarch64 -cpu CPU`` in the cached arm64 environment (``arm_env.py``).
  Only the CPU backend exists there.
* ``[NAME=]ssh:[USER@]HOST[:PORT][:PYTHON]`` (``--mnn-remote``): every
  configuration on that machine, with its Python (default ``python3``, which
  needs MNN and numpy installed); our source is copied there once.

One warm worker serves each place for the whole run (an emulated worker takes
seconds to import MNN; a remote one a connection), replaced after a crash.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from ..core.categories import Category
from ..engine.request import CheckRequest
from ..engine.results import ParityResult, ParitySettings
from ..mnn import backends
from .arm_env import ARCH, ArmEnv, ArmEnvBuilder
from .engine import IsolatedEngine, close_all, release_all
from .launch import LaunchError, OverSsh, WorkerCommand
from .place_spec import Place

if TYPE_CHECKING:  # pragma: no cover
    from ..engine.engine import ParityEngine  # annotations: a run whose checks all run in workers never imports it (issue 22)

BF16_FEATURE = "sme2"  # MNN 3.6.1's aarch64 wheel computes Low_BF16 only with SME2 kernels


def emulated_bf16_reason(features: Mapping[str, int] | None, place: Place) -> str | None:
    """Why ``Low_BF16`` cannot be tested at an emulated CPU, or None where it can."""
    if not place.cpu_only or (features or {}).get(BF16_FEATURE):
        return None
    return (f"{place.name}: no bf16 path under emulation: MNN's aarch64 wheel computes Low_BF16 only with SME2 "
            f"kernels and this emulated CPU has none (MNN detects {_features_words(features)}), so Low_BF16 would "
            "run as high and prove nothing about bf16")


def place_message(message: str, config_id: str, place: Place, described: Mapping[str, Any]) -> str:
    """The worker's message, which knows no place, saying where it ran: the id in its first line as the item's
    (``on arm64.a76-CPU-low``) and a ``place:`` line under ``ran on:``."""
    if not message:
        return message
    lines = message.splitlines()
    lines[0] = lines[0].replace(f" on {config_id}", f" on {place.name}-{config_id}", 1)
    where = (f"{place.target} emulated by {described.get('emulator')}" if place.kind == ARCH
             else f"ssh {place.target}" + (f" -p {place.port}" if place.port else ""))
    line = (f"place:     {place.name}: {where}, MNN {described.get('mnn_version') or '?'} there; MNN detects "
            f"{_features_words(described.get('features'))}")
    at = next((i + 1 for i, text in enumerate(lines) if text.startswith("ran on:")), 1)
    return "\n".join(lines[:at] + [line] + lines[at:])


def _features_words(features: Mapping[str, int] | None) -> str:
    return ", ".join(f"{k}:{v}" for k, v in (features or {}).items()) or "no features"


class PlaceEngines:
    """One ``IsolatedEngine`` per place, started the first time the place is needed."""

    def __init__(self, places: Sequence[Place], cache_root: os.PathLike | str, settings: ParitySettings, *,
                 timeout: float | None, declarations: ParityEngine | None = None, ssh_config: str | None = None,
                 progress: Callable[[str], None] | None = None):
        self.places = {place.name: place for place in places}
        self.cache_root = Path(cache_root)
        # Pictures and output bundles are written where the parent can read them: not at another place.
        self.settings = dataclasses.replace(settings, output_sink=None, keep_outputs=False)
        self.timeout = timeout
        self.declarations = declarations
        self.ssh_config = ssh_config
        self.progress = progress
        self._arm: ArmEnv | None = None
        self._engines: dict[str, IsolatedEngine] = {}
        self._unavailable: dict[str, str] = {}

    def arm_env(self) -> ArmEnv:
        if self._arm is None:
            self._arm = ArmEnvBuilder(self.cache_root, progress=self.progress).ensure()
        return self._arm

    def command(self, place: Place) -> WorkerCommand | str:
        """The place's worker command, or why there is none."""
        if place.kind == ARCH:
            env = self.arm_env()
            return env.command(place.target) if env.ok else env.reason
        options = ("-F", self.ssh_config) if self.ssh_config else ()
        return OverSsh(label=f"ssh {place.target}" + (f" -p {place.port}" if place.port else ""), host=place.target,
                       port=place.port, python=place.python, options=options)

    def engine(self, name: str) -> IsolatedEngine | str:
        if name in self._unavailable:
            return self._unavailable[name]
        if name not in self._engines:
            command = self.command(self.places[name])
            if isinstance(command, str):
                self._unavailable[name] = command
                return command
            self._engines[name] = IsolatedEngine(self.settings, timeout=self.timeout, worker_per_model=False,
                                                 prespawn=False, declarations=self.declarations, command=command)
        return self._engines[name]

    def backend_status(self, name: str, backend: str) -> backends.BackendStatus:
        """``backend`` as the place has it (probed there); unavailable with the reason where the place cannot run."""
        place = self.places[name]
        backend = backends.canonical_backend(backend)
        if place.cpu_only and backend != "CPU":
            return backends.BackendStatus(backend, False, None, f"{place.name}: an emulated CPU runs MNN's CPU "
                                          f"backend only; {backend} is tested natively (its items without "
                                          f"{place.name})")
        engine = self.engine(name)
        if isinstance(engine, str):
            return backends.BackendStatus(backend, False, None, f"{place.name}: {engine}")
        try:
            return engine.backend_status(backend)
        except LaunchError as exc:
            self._unavailable[name] = str(exc)
            return backends.BackendStatus(backend, False, None, f"{place.name}: {exc}")

    def check_request(self, name: str, request: CheckRequest, *, sidecar: Any = None,
                      reference: Any = None) -> ParityResult:
        place = self.places[name]
        engine = self.engine(name)
        if isinstance(engine, str):
            return ParityResult(str(request.model), request.config, Category.BACKEND_UNAVAILABLE,
                                f"{place.name}: {engine}", variant=request.variant)
        try:
            if request.config.precision == "Low_BF16" and place.cpu_only:
                engine.backend_status(request.config.backend)  # starts the worker: its banner says what the CPU has
                why = emulated_bf16_reason(engine.device_features, place)
                if why:
                    result = ParityResult(str(request.model), request.config, Category.BACKEND_UNAVAILABLE, why,
                                          variant=request.variant)
                    result.place = self.describe(name)
                    return result
            result = engine.check_request(request, sidecar=sidecar, reference=reference)
        except LaunchError as exc:
            return ParityResult(str(request.model), request.config, Category.BACKEND_UNAVAILABLE,
                                f"{place.name}: {exc}", variant=request.variant)
        result.place = self.describe(name)
        # The release the place ran goes with the place; mnn_version is the release axis (--mnn-versions).
        result.place["mnn_version"] = result.mnn_version or result.place["mnn_version"]
        result.mnn_version = None
        result.message = place_message(result.message, request.config.id, place, result.place)
        return result

    def describe(self, name: str) -> dict[str, Any]:
        """The report's ``place``: where the item ran and what MNN detected about that CPU."""
        place, engine = self.places[name], self._engines.get(name)
        data: dict[str, Any] = {"name": place.name, "kind": place.kind, "spec": place.spec}
        if place.kind == ARCH:
            data.update(emulated_cpu=place.target, emulator=Path(self.arm_env().qemu or "qemu-aarch64").name)
        else:
            data.update(host=place.target, port=place.port, python=place.python)
        data["features"] = engine.device_features if engine is not None else None
        data["mnn_version"] = engine.worker_mnn_version if engine is not None else None
        return data

    def summary(self) -> list[str]:
        lines = []
        for name, place in self.places.items():
            if name in self._unavailable:
                lines.append(f"{name}: unavailable: {self._unavailable[name]}")
            elif name in self._engines:
                lines.append(f"{name}: {self._engines[name].command.label}; MNN detects "
                             f"{_features_words(self._engines[name].device_features)}")
        return lines

    def release(self, model_path: os.PathLike | str) -> None:
        release_all(self._engines.values(), model_path)

    def close(self) -> None:
        close_all(self._engines.values())
        self._engines.clear()
