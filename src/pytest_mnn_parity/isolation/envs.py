"""One virtual environment per MNN release, made once and kept in a cache folder.

``--mnn-versions`` and ``--mnn-bisect`` run each release in a worker process
(``process.Worker``) whose Python is such an environment's, so the test process
never imports two MNNs.  An environment holds only ``mnn==X``, numpy and pillow: the
worker imports this package from our own source (``PYTHONPATH``), not from the
environment.  A folder is used once its ``ready`` file exists (written after
``import MNN`` answered with the right version), so an interrupted install is
redone, never used; a lock file per release makes pytest-xdist's workers (and
parallel runs) wait for the one that creates it instead of installing twice.

A warm cache needs no network at all.  A cold one says what it would download.
A release that cannot be installed or imported here (no wheel for this Python,
a wheel that does not import) is an ``MnnEnv`` with a ``reason``: its items skip
with that reason.
"""
from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

# Signs in pip's output that the index could not be reached (or was switched off): the cache is cold and the
# machine offline, not the release missing.
OFFLINE_SIGNS = ("NewConnectionError", "Temporary failure in name resolution", "Network is unreachable",
                 "Max retries exceeded", "Failed to establish a new connection", "ProxyError",
                 "Name or service not known", "Connection refused", "No matching distribution found",
                 "Could not find a version")
# numpy for MNN's Python API, pillow for input sets that declare pictures (inputs/sources.py): what a worker
# imports besides MNN; this package itself comes from our own source.
EXTRA_REQUIREMENTS = ("numpy", "pillow")
RELEASES_FILE = "mnn-releases.json"
RELEASES_MAX_AGE = 24 * 3600.0  # a day: new MNN releases are weeks apart
PIP_TIMEOUT = 900.0
LOCK_TIMEOUT = 1800.0  # another process creating the same release: at most one slow install


class EnvError(Exception):
    """Something about the cache itself (an unreadable folder, no release list): the message says what."""


@dataclass
class MnnEnv:
    """A release's environment, or why there is none."""

    version: str
    folder: Path
    python: Path | None = None
    reason: str = ""
    created: bool = False
    seconds: float = 0.0
    requirements: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.python is not None


def python_tag() -> str:
    return f"py{sys.version_info.major}{sys.version_info.minor}"


def platform_words() -> str:
    return f"CPython {platform.python_version()} on {sys.platform} {platform.machine()}"


def version_key(version: str):
    """Release order (3.10.0 after 3.9.0)."""
    from packaging.version import InvalidVersion, Version  # noqa: PLC0415 - pytest's own dependency

    try:
        return Version(version)
    except InvalidVersion:
        raise ValueError(f"{version!r} is not a release number (like 3.4.1)") from None


def _python_in(folder: Path) -> Path:
    return folder / ("Scripts" if os.name == "nt" else "bin") / "python"


def _tail(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip() and not line.startswith("WARNING: Location")]
    return lines[-1].strip() if lines else "no output"


class EnvCache:
    """The folder of per-release environments (``--mnn-env-cache``)."""

    def __init__(self, root: os.PathLike | str, extra: Sequence[str] = EXTRA_REQUIREMENTS):
        self.root = Path(root)
        self.extra = list(extra)

    def requirements(self, version: str) -> list[str]:
        return [f"mnn=={version}", *self.extra]

    def folder(self, version: str, requirements: Sequence[str] | None = None) -> Path:
        reqs = list(requirements or self.requirements(version))
        tag = zlib.crc32(" ".join(reqs).encode())  # another requirement list, another environment
        return self.root / f"mnn-{version}-{python_tag()}-{tag:08x}"

    def find(self, version: str) -> Path | None:
        """A ready environment with ``mnn==version`` for this Python, whatever else it holds (so an environment
        made with more packages, like the cross-version test's, serves too)."""
        if not self.root.is_dir():
            return None
        for folder in sorted(self.root.glob(f"mnn-{version}-{python_tag()}-*")):
            if (folder / "ready").is_file() and _python_in(folder).exists():
                return folder
        return None

    @contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """An exclusive lock over ``name`` between processes (pytest-xdist workers, parallel runs)."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"{name}.lock"
        with open(path, "a+") as handle:
            try:
                import fcntl  # noqa: PLC0415 - POSIX only
            except ImportError:  # pragma: no cover - Windows: one process at a time is the user's affair
                yield
                return
            deadline = time.monotonic() + LOCK_TIMEOUT
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise EnvError(f"{path}: another process held this lock for {LOCK_TIMEOUT:g} s; if none "
                                       "is running, delete the file") from None
                    time.sleep(0.2)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def ensure(self, version: str, requirements: Sequence[str] | None = None) -> MnnEnv:
        """The environment of ``version``, created if missing (and if the package index can be reached)."""
        try:
            version_key(version)
        except ValueError as exc:
            return MnnEnv(version, self.root, reason=f"mnn {version}: {exc}")
        reqs = list(requirements or self.requirements(version))
        started = time.monotonic()
        with self.lock(f"mnn-{version}-{python_tag()}"):
            found = self.find(version) if requirements is None else None
            folder = found or self.folder(version, reqs)
            if (folder / "ready").is_file() and _python_in(folder).exists():
                return MnnEnv(version, folder, _python_in(folder), requirements=reqs)
            env = self._create(version, folder, reqs)
        env.seconds = round(time.monotonic() - started, 2)
        return env

    def _create(self, version: str, folder: Path, reqs: list[str]) -> MnnEnv:
        shutil.rmtree(folder, ignore_errors=True)  # half-made by an interrupted run
        made = subprocess.run([sys.executable, "-m", "venv", str(folder)], capture_output=True, text=True)
        python = _python_in(folder)
        if made.returncode != 0 or not python.exists():
            return MnnEnv(version, folder, reason=f"mnn {version}: could not create a virtual environment in "
                                                  f"{folder} ({_tail(made.stdout + made.stderr)})")
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)  # pip must see the new environment only
        try:
            pip = subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q",
                                  "--only-binary", ":all:", *reqs], capture_output=True, text=True,
                                 timeout=PIP_TIMEOUT, env=env)
            output, code = pip.stdout + pip.stderr, pip.returncode
        except subprocess.TimeoutExpired:
            output, code = f"pip did not finish within {PIP_TIMEOUT:g} s", -1
        if code != 0:
            shutil.rmtree(folder, ignore_errors=True)
            return MnnEnv(version, folder, reason=self._install_problem(version, reqs, output), requirements=reqs)
        check = subprocess.run([str(python), "-c", "import MNN, sys; sys.stdout.write('\\n' + str(MNN.version()))"],
                               capture_output=True, text=True, timeout=120, env=env)
        said = check.stdout.strip().splitlines()[-1:] if check.returncode == 0 else []
        if not said or said[0].strip() != version:
            shutil.rmtree(folder, ignore_errors=True)
            why = (f"it reports version {said[0].strip()!r}" if said
                   else f"import MNN failed ({_tail(check.stdout + check.stderr)})")
            return MnnEnv(version, folder, reason=f"mnn {version} installed but cannot be used on "
                                                  f"{platform_words()}: {why}", requirements=reqs)
        (folder / "ready").write_text(json.dumps({"mnn": version, "requirements": reqs,
                                                  "python": platform.python_version()}))
        return MnnEnv(version, folder, python, created=True, requirements=reqs)

    def _install_problem(self, version: str, reqs: list[str], output: str) -> str:
        tail = _tail(output)
        if any(sign in output for sign in OFFLINE_SIGNS):
            return (f"mnn {version}: not in the environment cache {self.root}, and pip could not fetch it "
                    f"({tail}). Creating it needs from the package index: {', '.join(reqs)} (wheels for "
                    f"{platform_words()}); run once with the index reachable, or drop {version} from the list")
        return f"mnn {version}: pip could not install {' '.join(reqs)} on {platform_words()} ({tail})"

    # -- the releases on the package index --------------------------------------------
    def releases(self) -> list[str]:
        """Every MNN release the package index lists, oldest first; cached for a day in the cache folder, and
        the cached list used (however old) when the index cannot be reached."""
        path = self.root / RELEASES_FILE
        cached = None
        if path.is_file():
            try:
                cached = json.loads(path.read_text())
            except (OSError, ValueError):
                cached = None
        if cached and time.time() - float(cached.get("time", 0)) < RELEASES_MAX_AGE:
            return list(cached["releases"])
        listed, problem = _index_versions()
        if listed:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"time": time.time(), "releases": listed}))
            os.replace(tmp, path)
            return listed
        if cached:
            return list(cached["releases"])
        raise EnvError(f"cannot list MNN's releases: `pip index versions mnn` failed ({problem}) and {path} does "
                       "not exist yet; run once with the package index reachable")


def _index_versions() -> tuple[list[str], str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "mnn", "--disable-pip-version-check"],
                              capture_output=True, text=True, timeout=120, env=env)
    except subprocess.TimeoutExpired:
        return [], "no answer within 120 s"
    match = re.search(r"Available versions:\s*(.+)", proc.stdout)
    if proc.returncode != 0 or not match:
        return [], _tail(proc.stdout + proc.stderr)
    found = [v.strip() for v in match.group(1).split(",") if v.strip()]
    return sorted(found, key=version_key), ""


def between(releases: Sequence[str], good: str, bad: str) -> list[str]:
    """The releases from ``good`` to ``bad`` inclusive, in order (either end may be the older one)."""
    low, high = sorted((good, bad), key=version_key)
    chosen = [v for v in releases if version_key(low) <= version_key(v) <= version_key(high)]
    return chosen if version_key(good) <= version_key(bad) else chosen[::-1]
