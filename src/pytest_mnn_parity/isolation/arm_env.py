"""The emulated arm64 environment: an aarch64 CPython with MNN's aarch64 wheel, run by ``qemu-aarch64``.

On x86 every CPU precision computes in fp32, so the fp16 arithmetic that phones
really run at ``Precision_Low`` (ARMv8.2 FP16) cannot go wrong here.  Under
``qemu-aarch64 -cpu cortex-a76`` MNN's own aarch64 kernels run, fp16 included,
and the bugs show (docs/arm.md).

``ArmEnvBuilder.ensure`` makes, once per MNN release, a cache folder of:

* ``root/``: Debian arm64 packages (python3.11 and the libraries it and MNN
  load), fetched with ``apt-get download`` through a private apt state in the
  folder (the machine's own dpkg and apt configuration are left as they are:
  no ``dpkg --add-architecture``, no root needed for the lists) and unpacked
  with ``dpkg -x``;
* ``site/``: the aarch64 cp311 wheels of MNN (the same release as this
  machine's), numpy and pillow, fetched with ``pip download --platform`` and
  unpacked.

It is checked by importing MNN under the emulator; a ``ready`` file marks it
usable, so an interrupted build is redone, never used, and a second run needs
no network.  A lock keeps parallel runs (pytest-xdist workers) from building
it twice.  No pytest here: ``mnn-parity-env arm64`` (``main``) builds it from a
shell.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .envs import EnvCache
from .launch import Emulated

ARCH = "arm64"
PYTHON_VERSION = "3.11"  # Debian 12's Python: the wheels below are cp311
QEMU = ("qemu-aarch64", "qemu-aarch64-static")
QEMU_INSTALL = "apt-get install qemu-user"
# What CPython 3.11 and MNN's wheel load, and their own dependencies (Debian 12 names, arm64).
DEBIAN_PACKAGES = (
    "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "libc6", "libstdc++6", "libgcc-s1",
    "zlib1g", "libffi8", "libssl3", "libexpat1", "libbz2-1.0", "liblzma5", "libsqlite3-0", "libncursesw6",
    "libtinfo6", "libreadline8", "libuuid1", "libcrypt1", "libnsl2", "libtirpc3", "libdb5.3", "libgomp1",
    "libgssapi-krb5-2", "libkrb5-3", "libk5crypto3", "libkrb5support0", "libcom-err2", "libkeyutils1")
PLATFORMS = ("manylinux2014_aarch64", "manylinux_2_28_aarch64")
# Besides MNN: numpy for its Python API, pillow for input sets that declare pictures (as envs.EXTRA_REQUIREMENTS).
EXTRA_WHEELS = ("numpy", "pillow")
# Measured sizes (MNN 3.6.1): what a cold cache says it would download.
DOWNLOAD_WORDS = "about 13 MB of Debian arm64 packages and 40 MB of aarch64 wheels (190 MB unpacked)"
CHECK_CPU = "cortex-a53"  # the cheapest to emulate; any CPU imports the same wheel
STEP_TIMEOUT = 600.0
# Signs in apt's and pip's words that the registry could not be reached.
OFFLINE_SIGNS = ("Could not resolve", "Temporary failure", "Failed to fetch", "Could not connect",
                 "Connection refused", "Unable to connect", "Network is unreachable", "NewConnectionError",
                 "Max retries exceeded", "No matching distribution found", "Could not find a version",
                 "ProxyError", "Failed to establish a new connection", "Unable to locate package")

Progress = Callable[[str], None]


@dataclass
class ArmEnv:
    """The arm64 environment of one MNN release, or why there is none (``reason``)."""

    folder: Path
    mnn_version: str
    qemu: str | None = None
    reason: str = ""
    created: bool = False
    seconds: float = 0.0
    details: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.reason

    @property
    def root(self) -> Path:
        return self.folder / "root"

    @property
    def site(self) -> Path:
        return self.folder / "site"

    def command(self, cpu: str) -> Emulated:
        """The worker command of one emulated CPU (``qemu-aarch64 -cpu CPU``)."""
        return Emulated(label=f"arm64 {cpu} under {self.qemu}", qemu=self.qemu or QEMU[0], cpu=cpu,
                        root=str(self.root), site=str(self.site), python=f"/usr/bin/python{PYTHON_VERSION}")


def host_mnn_version() -> str:
    """This machine's MNN release, from its package metadata (MNN itself is not imported)."""
    from importlib import metadata  # noqa: PLC0415

    for name in ("MNN", "mnn"):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    from ..mnn.library import mnn_version  # noqa: PLC0415 - an MNN without metadata (a source build)

    return mnn_version()


def find_qemu() -> str | None:
    for name in QEMU:
        found = shutil.which(name)
        if found:
            return found
    return None


def _last(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("WARNING: Location")]
    return lines[-1] if lines else "no output"


class ArmEnvBuilder:
    """Builds and finds ``ArmEnv`` folders under ``cache_root`` (the plugin's ``--mnn-env-cache``)."""

    def __init__(self, cache_root: os.PathLike | str, mnn_version: str | None = None,
                 progress: Progress | None = None):
        self.cache_root = Path(cache_root)
        self.mnn_version = mnn_version or host_mnn_version()
        self.progress = progress or (lambda line: None)

    @property
    def folder(self) -> Path:
        return self.cache_root / f"{ARCH}-cp{PYTHON_VERSION.replace('.', '')}-mnn{self.mnn_version}"

    def what_it_downloads(self) -> str:
        return (f"Debian {ARCH} packages {', '.join(DEBIAN_PACKAGES[:3])} and {len(DEBIAN_PACKAGES) - 3} "
                f"libraries; aarch64 cp311 wheels mnn=={self.mnn_version}, {', '.join(EXTRA_WHEELS)} "
                f"({DOWNLOAD_WORDS})")

    def cached(self) -> ArmEnv | None:
        ready = self.folder / "ready"
        if ready.is_file():
            try:
                details = json.loads(ready.read_text())
            except (OSError, ValueError):
                return None
            return ArmEnv(self.folder, self.mnn_version, find_qemu(), details=details)
        return None

    def ensure(self) -> ArmEnv:
        """The environment, built if missing; an ``ArmEnv`` with a ``reason`` when it cannot be had here."""
        qemu = find_qemu()
        if qemu is None:
            return ArmEnv(self.folder, self.mnn_version, reason=(
                f"qemu-aarch64 is not installed: the emulated arm64 CPUs need it. Install it with "
                f"`{QEMU_INSTALL}` (Debian/Ubuntu), then run again"))
        started = time.monotonic()
        with EnvCache(self.cache_root).lock(self.folder.name):
            found = self.cached()
            if found is not None:
                return found
            env = self._build(qemu)
        env.seconds = round(time.monotonic() - started, 1)
        return env

    def _run(self, argv: Sequence[str], cwd: Path | None = None, env: dict | None = None) -> tuple[int, str]:
        try:
            done = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, timeout=STEP_TIMEOUT,
                                  env=env)
        except FileNotFoundError:
            return 127, f"{argv[0]}: command not found"
        except subprocess.TimeoutExpired:
            return -1, f"{argv[0]} did not finish within {STEP_TIMEOUT:g} s"
        return done.returncode, done.stdout + done.stderr

    def _failed(self, step: str, output: str) -> ArmEnv:
        shutil.rmtree(self.folder, ignore_errors=True)
        if any(sign in output for sign in OFFLINE_SIGNS):
            # The registry's own words (apt's "Could not connect to ...") rather than the last line ("Unable to
            # locate package", which only follows from them).
            said = next((line.strip() for sign in OFFLINE_SIGNS for line in output.splitlines() if sign in line),
                        _last(output))
            reason = (f"the arm64 environment is not in the cache {self.folder} and the package registries cannot "
                      f"be reached ({step}: {said}). Building it downloads {self.what_it_downloads()}; "
                      f"run `mnn-parity-env arm64 --cache {self.cache_root}` once with the registries reachable")
        else:
            reason = f"building the arm64 environment in {self.folder} failed at {step}: {_last(output)}"
        return ArmEnv(self.folder, self.mnn_version, reason=reason)

    def _apt(self) -> list[str]:
        """apt-get with a private state for arm64 in the cache folder: the machine's own dpkg and apt are left
        alone, and their sources (``/etc/apt``) are used."""
        state = self.folder / "apt"
        for sub in ("lists/partial", "cache/archives/partial"):
            (state / sub).mkdir(parents=True, exist_ok=True)
        (state / "status").touch()
        options = {"Dir::State::Lists": state / "lists", "Dir::Cache": state / "cache",
                   "Dir::State::status": state / "status", "APT::Architecture": ARCH, "APT::Architectures::": ARCH,
                   "Debug::NoLocking": "1", "Acquire::Languages": "none", "APT::Sandbox::User": "root",
                   # Offline, say so at once rather than after apt's retries.
                   "Acquire::Retries": "0", "Acquire::http::Timeout": "20", "Acquire::https::Timeout": "20"}
        return ["apt-get", "-q"] + [arg for key, value in options.items() for arg in ("-o", f"{key}={value}")]

    def _build(self, qemu: str) -> ArmEnv:
        shutil.rmtree(self.folder, ignore_errors=True)  # half-made by an interrupted run
        self.folder.mkdir(parents=True)
        started = time.monotonic()
        if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
            return self._failed("the system files", "apt-get and dpkg are needed (a Debian or Ubuntu machine)")
        self.progress(f"arm64 environment for MNN {self.mnn_version}: building in {self.folder} (once; "
                      f"downloads {DOWNLOAD_WORDS})")
        apt = self._apt()
        self.progress(f"arm64 environment: {len(DEBIAN_PACKAGES)} Debian arm64 packages (python{PYTHON_VERSION} "
                      "and its libraries)")
        code, out = self._run([*apt, "update"])
        debs = self.folder / "debs"
        debs.mkdir()
        code, out2 = self._run([*apt, "download", *DEBIAN_PACKAGES], cwd=debs)
        if code != 0:
            return self._failed("apt-get, Debian arm64 packages", out + out2)
        root = self.folder / "root"
        for deb in sorted(debs.glob("*.deb")):
            code, out = self._run(["dpkg", "-x", str(deb), str(root)])
            if code != 0:
                return self._failed(f"dpkg -x {deb.name}", out)
        shutil.rmtree(self.folder / "apt", ignore_errors=True)  # 20 MB of package lists, used once
        wheels = [f"mnn=={self.mnn_version}", *EXTRA_WHEELS]
        self.progress(f"arm64 environment: aarch64 wheels {', '.join(wheels)}")
        wheel_dir = self.folder / "wheels"
        pip_env = dict(os.environ)
        pip_env.pop("PYTHONPATH", None)
        platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
        code, out = self._run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                               "--only-binary=:all:", *platforms, "--python-version", PYTHON_VERSION,
                               "--implementation", "cp", "-d", str(wheel_dir), *wheels], env=pip_env)
        if code != 0:
            return self._failed("pip download", out)
        site = self.folder / "site"
        for wheel in sorted(wheel_dir.glob("*.whl")):
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(site)
        self.progress(f"arm64 environment: checking that MNN {self.mnn_version} imports under {Path(qemu).name} "
                      f"-cpu {CHECK_CPU}")
        env = ArmEnv(self.folder, self.mnn_version, qemu)
        check = env.command(CHECK_CPU)
        argv = check.argv({})[:-2] + ["-c", "import MNN, numpy, sys; sys.stdout.write('\\n' + MNN.version())"]
        code, out = self._run(argv, env=check.environment({}))
        said = out.strip().splitlines()[-1:] if code == 0 else []
        if not said or said[0].strip() != self.mnn_version:
            why = f"it reports MNN {said[0].strip()!r}" if said else f"import MNN failed ({_last(out)})"
            return self._failed(f"the check under {Path(qemu).name}", f"{why} (exit {code})")
        wheel_names = sorted(p.name for p in wheel_dir.glob("*.whl"))
        shutil.rmtree(debs, ignore_errors=True)
        shutil.rmtree(wheel_dir, ignore_errors=True)  # unpacked in site/; their names are in the ready file
        size = sum(p.stat().st_size for p in self.folder.rglob("*") if p.is_file() and not p.is_symlink())
        env.details = {"mnn": self.mnn_version, "python": PYTHON_VERSION, "packages": list(DEBIAN_PACKAGES),
                       "wheels": wheel_names, "bytes": size,
                       "build_seconds": round(time.monotonic() - started, 1)}
        (self.folder / "ready").write_text(json.dumps(env.details, indent=1))
        env.created = True
        self.progress(f"arm64 environment: ready, {size / 2**20:.0f} MiB in {self.folder}")
        return env


def probe_features(env: ArmEnv, cpu: str) -> dict[str, int] | None:
    """What MNN's banner says about one emulated CPU (``The device supports: ...``)."""
    from .engine import device_features  # noqa: PLC0415

    command = env.command(cpu)
    argv = command.argv({})[:-2] + ["-c", "import MNN"]
    done = subprocess.run(argv, env=command.environment({}), capture_output=True, text=True, timeout=STEP_TIMEOUT)
    return device_features(done.stdout + done.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """``mnn-parity-env arm64``: build (or check) the emulated environment the plugin's ``--mnn-cpu`` uses."""
    parser = argparse.ArgumentParser(prog="mnn-parity-env", description=(
        "Build the emulated environment of --mnn-cpu arm64:CPU (an aarch64 Python with this machine's MNN "
        "release, run by qemu-aarch64) in the plugin's cache, and show what MNN detects on each CPU."))
    parser.add_argument("arch", choices=[ARCH], help="the architecture to emulate")
    parser.add_argument("--cache", default=str(Path(".pytest_cache") / "d" / "mnn-parity-envs"),
                        help="the cache folder (the plugin's --mnn-env-cache; default: "
                             ".pytest_cache/d/mnn-parity-envs under the current folder, the plugin's default "
                             "when run from the rootdir)")
    parser.add_argument("--cpus", default="cortex-a76,cortex-a53",
                        help="comma-separated qemu CPU names to check (default cortex-a76,cortex-a53)")
    args = parser.parse_args(argv)
    builder = ArmEnvBuilder(args.cache, progress=lambda line: print(line, flush=True))
    env = builder.ensure()
    if not env.ok:
        print(f"mnn-parity-env: {env.reason}", file=sys.stderr)
        return 1
    how = f"built in {env.seconds:.0f} s" if env.created else "cached"
    print(f"arm64 environment for MNN {env.mnn_version}: {env.folder} ({how})")
    for cpu in [c.strip() for c in args.cpus.split(",") if c.strip()]:
        features = probe_features(env, cpu)
        shown = ", ".join(f"{k}:{v}" for k, v in features.items()) if features else "no banner (qemu refused it?)"
        print(f"  {cpu}: MNN detects {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
