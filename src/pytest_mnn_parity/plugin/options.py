"""The settings the command-line options and ini keys resolve to (``Options``), checked as they are read.

The options themselves are declared in ``option_table``; the command line wins over the ini file.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from ..core.choices import ARTIFACT_MODES, ISOLATE_MODES, LAYER_MODES, SWEEP_MODES, WORKER_SCOPES
from ..inputs.generate import parse_input_shapes
from ..isolation.envs import version_key
from ..isolation.place_spec import Place, parse_cpu, parse_remote
from ..mnn.backends import (
    DEFAULT_BACKENDS,
    GPU_MODE_BITS,
    PRECISIONS,
    canonical_backend,
    canonical_precision,
    did_you_mean,
    gpu_mode_applies,
    parse_gpu_mode,
)
from ..mnn.limits import DEFAULT_MAX_INPUT_MB
from ..onnx.variants import DEFAULT_VARIANTS, parse_converter_flags, parse_variants
from .option_table import TOLERANCE_OPTIONS

if TYPE_CHECKING:  # pragma: no cover
    from ..inputs.stream_spec import StreamSpec

@dataclass
class Options:
    models: list[str]
    backends: list[str]
    precisions: list[str]
    reference: str | None
    seed: int
    input_shapes: dict[str, tuple[int, ...]]
    threads: int
    tolerance_ini: dict[str, float] = field(default_factory=dict)
    tolerance_cli: dict[str, float] = field(default_factory=dict)
    report: Path | None = None
    layers: str = "on-failure"
    isolate: str = "auto"
    worker_scope: str = "model"
    timeout: float | None = None
    max_input_mb: float = DEFAULT_MAX_INPUT_MB
    only: bool = False
    input_sets: list[str] = field(default_factory=list)
    hypothesis: int = 0
    hypothesis_dir: Path | None = None
    hypothesis_dir_given: bool = False
    convert: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS))
    convert_flags: tuple[str, ...] = ()
    artifacts: Path | None = None
    artifacts_when: str = "on-failure"
    html: Path | None = None
    api: str = "auto"
    streams: tuple[StreamSpec, ...] = ()
    save_outputs: Path | None = None
    golden: Path | None = None
    update_golden: bool = False
    gpu_modes: list[str] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)
    bisect: tuple[str, str] | None = None
    # Seconds between progress lines; None: decided by the terminal (progress.py).
    progress: float | None = None
    op_sweep: str = "off"
    repro: Path | None = None
    env_cache: Path | None = None
    # Emulated CPUs (--mnn-cpu) and other machines (--mnn-remote): the place axis (isolation/places.py).
    cpus: list[Place] = field(default_factory=list)
    remotes: list[Place] = field(default_factory=list)
    ssh_config: Path | None = None
    # --mnn-require-backends: backends whose absence fails their items and the run, never a skip.
    require_backends: list[str] = field(default_factory=list)
    require_source: str = "--mnn-require-backends"
    rootpath: Path = Path(".")
    invocation_dir: Path = Path(".")

    @classmethod
    def from_config(cls, config: pytest.Config) -> "Options":
        def get(name: str):
            value = config.getoption(f"mnn_{name}")
            if value is None or value == []:
                ini = config.getini(f"mnn_{name}")
                return ini if ini not in ("", [], None) else None
            return value

        def where(name: str) -> str:
            """The option, or the ini key and its file when the value came from there."""
            if config.getoption(f"mnn_{name}") in (None, []) and config.inipath is not None:
                return f"mnn_{name} in {config.inipath}"
            return f"--mnn-{name.replace('_', '-')}"

        def listed(name: str, default, canon) -> list[str]:
            raw = get(name)
            items = default if raw is None else [p for chunk in _as_list(raw) for p in chunk.split(",")]
            try:
                return list(dict.fromkeys(canon(p) for p in items if p.strip()))
            except ValueError as exc:
                raise pytest.UsageError(f"{where(name)}: {exc}") from None

        def number(name: str, kind, default):
            raw = get(name)
            if raw is None:
                return default
            try:
                return kind(raw)
            except ValueError:
                raise pytest.UsageError(f"{where(name)}: expected a number, got {raw!r}") from None

        def choice(name: str, allowed, default: str) -> str:
            value = str(get(name) or default).strip().lower()
            if value not in allowed:
                raise pytest.UsageError(f"{where(name)}: expected one of {', '.join(allowed)}, got "
                                        f"{value!r}{did_you_mean(value, allowed)}")
            return value

        try:
            shapes = parse_input_shapes(_as_list(get("input_shape") or []))
        except ValueError as exc:
            raise pytest.UsageError(str(exc)) from None
        tol_cli = {k: number(k, float, None) for k in TOLERANCE_OPTIONS if config.getoption(f"mnn_{k}") is not None}
        tol_ini = {}
        for k in TOLERANCE_OPTIONS:
            if config.getini(f"mnn_{k}") not in ("", None):
                try:
                    tol_ini[k] = float(config.getini(f"mnn_{k}"))
                except ValueError:
                    raise pytest.UsageError(f"mnn_{k} in {config.inipath}: expected a number, got "
                                            f"{config.getini(f'mnn_{k}')!r}") from None
        reference = get("reference")
        if reference is not None and str(reference).strip().lower() in ("", "cpu"):
            reference = None
        threads = number("threads", int, 4)
        if threads < 1:
            raise pytest.UsageError("--mnn-threads must be at least 1")
        report = get("report")
        layers = choice("layers", LAYER_MODES, "on-failure")
        hypothesis = number("hypothesis", int, 0)
        if hypothesis < 0:
            raise pytest.UsageError("--mnn-hypothesis must be 0 (off) or a number of examples")
        hypothesis_dir = get("hypothesis_dir")
        isolate = choice("isolate", ISOLATE_MODES, "auto")
        worker_scope = choice("worker_scope", WORKER_SCOPES, "model")
        timeout = number("timeout", float, None)
        if timeout is not None and not timeout >= 0:
            raise pytest.UsageError(f"{where('timeout')}: expected seconds >= 0 (0: no timeout), got {timeout:g}")
        max_input_mb = number("max_input_mb", float, DEFAULT_MAX_INPUT_MB)
        if not max_input_mb > 0:
            raise pytest.UsageError(f"{where('max_input_mb')}: expected a size in MiB > 0, got {max_input_mb:g}")
        try:
            convert = parse_variants(_as_list(get("convert") or list(DEFAULT_VARIANTS)))
        except ValueError as exc:
            raise pytest.UsageError(f"--mnn-convert: {exc}") from None
        try:
            convert_flags = parse_converter_flags(config.getini("mnn_convert_flags") or "")
        except ValueError as exc:
            raise pytest.UsageError(f"mnn_convert_flags: {exc}") from None
        artifacts = get("artifacts")
        artifacts_when = choice("artifacts_when", ARTIFACT_MODES, "on-failure")
        html = get("html")
        try:
            api, streams = _api_and_streams(get("api"), [t for t in _as_list(get("stream") or []) if t.strip()])
        except ValueError as exc:
            raise pytest.UsageError(str(exc)) from None
        save_outputs, golden = get("save_outputs"), get("golden")
        update_golden = bool(config.getoption("mnn_update_golden"))
        if update_golden and not golden:
            raise pytest.UsageError("--mnn-update-golden needs --mnn-golden DIR: the directory to write the goldens to")
        _check_reference(reference, save_outputs)
        backend_list = listed("backends", DEFAULT_BACKENDS, canonical_backend)
        require_backends = listed("require_backends", [], canonical_backend)
        # Required means tested: a required backend the list leaves out joins it (it cannot be missed quietly).
        backend_list += [b for b in require_backends if b not in backend_list]
        gpu_modes = _gpu_modes(listed("gpu_modes", [], _parse_mode), backend_list, where("gpu_modes"))
        versions = listed("versions", [], _release)
        bisect = _bisect_range(get("bisect"), where("bisect"))
        if versions and bisect:
            raise pytest.UsageError("--mnn-versions and --mnn-bisect: give one of them (a bisection runs the releases "
                                    "it needs itself)")
        env_cache = get("env_cache")
        cpus, remotes = listed("cpu", [], parse_cpu), listed("remote", [], parse_remote)
        names = [place.name for place in cpus + remotes]
        if len(set(names)) != len(names):
            raise pytest.UsageError(f"{where('remote')}: two places share a name ({', '.join(names)}): name them "
                                    "NAME=ssh:HOST")
        if (cpus or remotes) and (versions or bisect):
            raise pytest.UsageError("--mnn-cpu / --mnn-remote with --mnn-versions / --mnn-bisect: one axis at a time "
                                    "(a place runs the MNN release installed there)")
        ssh_config = get("ssh_config")
        if ssh_config:
            ssh_config = (config.invocation_params.dir / str(ssh_config)).resolve()
            if not ssh_config.is_file():
                raise pytest.UsageError(f"{where('ssh_config')}: {ssh_config} does not exist (an ssh_config file, "
                                        "as ssh -F reads)")
        progress = number("progress", float, None)
        if progress is not None and not progress >= 0:
            raise pytest.UsageError(f"{where('progress')}: expected seconds >= 0 (0: off), got {progress:g}")
        op_sweep = choice("op_sweep", SWEEP_MODES, "off")
        repro = get("repro")
        return cls(
            progress=progress,
            op_sweep=op_sweep,
            # Absolute, as the pictures' folder: every worker process writes into the same one.
            repro=(config.invocation_params.dir / str(repro)).resolve() if repro else None,
            gpu_modes=gpu_modes,
            cpus=cpus,
            remotes=remotes,
            ssh_config=ssh_config or None,
            versions=versions,
            bisect=bisect,
            env_cache=((config.invocation_params.dir / str(env_cache)).resolve() if env_cache
                       else _cache_dir(config) / "d" / "mnn-parity-envs"),
            api=api,
            streams=streams,
            save_outputs=Path(save_outputs) if save_outputs else None,
            golden=Path(golden) if golden else None,
            update_golden=update_golden,
            input_sets=[p.strip() for chunk in _as_list(get("input_sets")) for p in chunk.split(",") if p.strip()],
            hypothesis=hypothesis,
            hypothesis_dir=Path(hypothesis_dir) if hypothesis_dir else _cache_dir(config) / "d" / "mnn-parity",
            hypothesis_dir_given=bool(hypothesis_dir),
            convert=convert,
            convert_flags=convert_flags,
            models=[str(m) for m in _as_list(get("model") or [])],
            backends=backend_list,
            require_backends=require_backends,
            require_source=f"{where('require_backends')} {','.join(require_backends)}",
            precisions=listed("precisions", PRECISIONS, canonical_precision),
            reference=str(reference) if reference is not None else None,
            seed=number("seed", int, 0),
            input_shapes=shapes,
            threads=threads,
            tolerance_ini=tol_ini,
            tolerance_cli=tol_cli,
            report=Path(report) if report else None,
            layers=layers,
            isolate=isolate,
            worker_scope=worker_scope,
            timeout=timeout or None,
            max_input_mb=max_input_mb,
            only=bool(config.getoption("mnn_only")),
            # Absolute, so every xdist worker writes into the same folder whatever its cwd.
            artifacts=(config.invocation_params.dir / str(artifacts)).resolve() if artifacts else None,
            artifacts_when=artifacts_when,
            html=Path(html) if html else None,
            rootpath=config.rootpath,
            invocation_dir=config.invocation_params.dir,
        )

    def requires(self, backend: str) -> bool:
        return backend in self.require_backends

    def required_unavailable(self, backend: str, reason: str) -> str:
        """The failure of an item (or run) whose required backend is not there."""
        return (f"{backend} is required ({self.require_source}) but unavailable: {reason}. A required backend "
                "fails instead of skipping: install an MNN build with it, or fix the machine's driver "
                "(docs/gpu.md)")

    def reproduce_command(self, model: str, backend: str, precision: str, variant: str | None = None,
                          input_set: str | None = None, api: str | None = None, gpu_mode: str | None = None,
                          mnn_version: str | None = None, bisect: tuple[str, str] | None = None,
                          place: str | None = None) -> str:
        """A command that reruns exactly one configuration of one model (conversion variant, input set, API,
        GPU mode, MNN release, place)."""
        parts = ["pytest", "--mnn-only", "--mnn-model", model, "--mnn-backends", backend,
                 "--mnn-precisions", precision, "--mnn-seed", str(self.seed)]
        chosen = next((p for p in self.cpus + self.remotes if p.name == place), None)
        if chosen is not None:
            parts += [chosen.option, chosen.spec, "-k", chosen.name]
            if chosen.kind == "ssh" and self.ssh_config is not None:
                parts += ["--mnn-ssh-config", _shown_path(self.ssh_config, self.invocation_dir)]
        if gpu_mode:
            parts += ["--mnn-gpu-modes", gpu_mode]
        if mnn_version:
            parts += ["--mnn-versions", mnn_version]
        if bisect:
            parts += ["--mnn-bisect", f"{bisect[0]}..{bisect[1]}"]
        if variant is not None:
            parts += ["--mnn-convert", variant]
        if self.api != "auto":
            parts += ["--mnn-api", self.api]
        if self.api == "both" and api:
            # Both APIs must run for the cross-API comparison; -k picks this item by its id.
            parts += ["-k", "-".join(p for p in (api, variant, input_set, f"{backend}-{precision}") if p)]
        for spec in self.streams:
            parts += ["--mnn-stream", spec.text()]
        if self.threads != 4:
            parts += ["--mnn-threads", str(self.threads)]
        if self.reference:
            parts += ["--mnn-reference", self.reference]
        if self.layers != "on-failure":
            parts += ["--mnn-layers", self.layers]
        for name, dims in self.input_shapes.items():
            parts += ["--mnn-input-shape", f"{name}={'x'.join(map(str, dims))}"]
        if self.isolate != "auto":
            parts += [f"--mnn-isolate={self.isolate}"]
        if self.timeout is not None:
            parts += ["--mnn-timeout", f"{self.timeout:g}"]
        if self.max_input_mb != DEFAULT_MAX_INPUT_MB:
            parts += ["--mnn-max-input-mb", f"{self.max_input_mb:g}"]
        for name, value in self.tolerance_cli.items():
            parts += [f"--mnn-{name.replace('_', '-')}", f"{value:g}"]
        if input_set is not None:
            parts += ["--mnn-input-sets", input_set]
        if self.op_sweep != "off":
            parts += [f"--mnn-op-sweep={self.op_sweep}"]
        if self.artifacts is not None:
            parts += ["--mnn-artifacts", _shown_path(self.artifacts, self.invocation_dir)]
            if self.artifacts_when != "on-failure":
                parts += ["--mnn-artifacts-when", self.artifacts_when]
        return " ".join(shlex.quote(p) for p in parts)

    def settings_dict(self) -> dict[str, Any]:
        return {"backends": self.backends, "precisions": self.precisions, "reference": self.reference or "cpu",
                "seed": self.seed, "threads": self.threads, "layers": self.layers, "api": self.api,
                "streams": [spec.text() for spec in self.streams],
                "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
                "input_sets": self.input_sets or None, "hypothesis": self.hypothesis,
                "isolate": self.isolate, "worker_scope": self.worker_scope, "timeout": self.timeout, "max_input_mb": self.max_input_mb,
                "convert": self.convert, "convert_flags": list(self.convert_flags),
                "save_outputs": str(self.save_outputs) if self.save_outputs else None,
                "golden": str(self.golden) if self.golden else None, "update_golden": self.update_golden,
                "tolerance_overrides": {"ini": self.tolerance_ini, "cli": self.tolerance_cli},
                "artifacts": (None if self.artifacts is None
                              else {"dir": str(self.artifacts), "when": self.artifacts_when}),
                "html": None if self.html is None else str(self.html),
                "op_sweep": self.op_sweep, "repro": None if self.repro is None else str(self.repro),
                "gpu_modes": self.gpu_modes, "mnn_versions": self.versions,
                "cpu": [p.spec for p in self.cpus], "remote": [p.spec for p in self.remotes],
                "bisect": None if self.bisect is None else f"{self.bisect[0]}..{self.bisect[1]}"}


def _api_and_streams(api: str | None, streams: list[str]) -> tuple[str, tuple]:
    """--mnn-api and --mnn-stream, parsed by the modules that act on them: imported only when given, since they
    bring in MNN's Module API runner and the input generators, which a run that checks no model never needs."""
    if api:
        from ..engine.apis import parse_api

        api = parse_api(api)
    if not streams:
        return api or "auto", ()
    from ..inputs.stream_spec import parse_stream

    return api or "auto", tuple(parse_stream(text) for text in streams)


def _parse_mode(text: str) -> str:
    return parse_gpu_mode(text)


def _release(text: str) -> str:
    text = text.strip()
    version_key(text)  # a word like "latest" is refused here, before any environment is made
    return text


def _gpu_modes(modes: list[str], backends: list[str], where: str) -> list[str]:
    """Each mode must apply to one of the backends asked for: a mode that changes nothing would pass silently."""
    for mode in modes:
        if not any(gpu_mode_applies(mode, b) for b in backends):
            readers = [b for b in ("OPENCL", "VULKAN", "METAL")
                       if all(b in GPU_MODE_BITS[p].backends for p in mode.split("+"))]
            raise pytest.UsageError(f"{where}: GPU mode {mode!r} applies to {', '.join(readers) or 'no backend'} "
                                    f"only, and the backends asked for are {', '.join(backends)}: add one with "
                                    "--mnn-backends, or leave the mode out (docs/gpu.md lists which backend reads "
                                    "which mode)")
    return modes


def _bisect_range(raw, where: str) -> tuple[str, str] | None:
    if raw is None or not str(raw).strip():
        return None
    good, sep, bad = str(raw).strip().partition("..")
    good, bad = good.strip(), bad.strip()
    if not sep or not good or not bad:
        raise pytest.UsageError(f"{where}: expected GOOD..BAD (two MNN releases, e.g. 3.4.0..3.6.1), got {raw!r}")
    try:
        version_key(good), version_key(bad)
    except ValueError as exc:
        raise pytest.UsageError(f"{where}: {exc}") from None
    if good == bad:
        raise pytest.UsageError(f"{where}: {good}..{bad} is one release; a bisection needs two different ends")
    return good, bad


def _shown_path(path: Path, base: Path) -> str:
    """Relative to where pytest was started when it lies below it, so a reproduce line stays short."""
    try:
        return path.relative_to(base.resolve()).as_posix()
    except ValueError:
        return str(path)


def _check_reference(reference, save_outputs) -> None:
    """A bundle named by --mnn-reference must exist and be readable before anything runs."""
    if reference is None:
        return  # the live CPU reference: nothing to read (and the bundle code not to import)
    from ..engine.bundle import BundleError
    from ..engine.bundle_reference import parse_reference

    try:
        spec = parse_reference(reference)
    except BundleError as exc:
        raise pytest.UsageError(str(exc)) from None
    if spec is not None and save_outputs and Path(save_outputs).resolve() == spec.folder.resolve():
        raise pytest.UsageError(f"--mnn-save-outputs {save_outputs} is the bundle --mnn-reference reads: "
                                f"save into another directory")


def _cache_dir(config: pytest.Config) -> Path:
    """pytest's cache folder (``cache_dir``), also when the cacheprovider plugin is off."""
    try:
        name = config.getini("cache_dir") or ".pytest_cache"
    except ValueError:  # -p no:cacheprovider: the ini key is not registered
        name = ".pytest_cache"
    return config.rootpath / name


def _as_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [str(value)]
