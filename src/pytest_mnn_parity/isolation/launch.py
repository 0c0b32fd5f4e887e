"""How a worker process is started: which Python, where, with which ``PYTHONPATH``.

Every isolated worker is ``python -m pytest_mnn_parity.isolation.worker``
talking JSON lines on its stdin and stdout (``protocol.py``).  What differs is
the command in front of it, and this module is the one place that knows:

* ``LocalPython``: this interpreter, or another environment's (``envs.EnvCache``,
  one MNN release per virtual environment);
* ``Emulated``: an aarch64 CPython run by ``qemu-aarch64 -cpu CPU`` from an
  environment ``arm_env.ArmEnv`` built (system files and wheels);
* ``OverSsh``: a Python on another machine, reached by OpenSSH; its stdin and
  stdout are the same pipe, so the protocol does not change.

In every case this package itself comes from our own source on ``PYTHONPATH``
(a remote machine gets a copy first, ``OverSsh.prepare``), so a worker's
environment needs only MNN, numpy and pillow.

A command that is ``remote`` cannot see this machine's files: the models and
the pickled input sets it needs travel inside the protocol instead
(``protocol.put_messages``).
"""
from __future__ import annotations

import hashlib
import io
import os
import shlex
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

WORKER_MODULE = "pytest_mnn_parity.isolation.worker"
# Our package's source: the folder holding ``pytest_mnn_parity``.
PACKAGE_ROOT = Path(__file__).resolve().parents[2]
# Where a remote machine keeps the copies of our source, one folder per content hash.
REMOTE_SOURCE_DIR = "~/.cache/mnn-parity-worker"
SSH_CONNECT_TIMEOUT = 15
SSH_PREPARE_TIMEOUT = 120.0


class LaunchError(Exception):
    """A worker command that cannot start (no ssh client, an unreachable host): the message says what to do."""


@dataclass(frozen=True)
class WorkerCommand:
    """The command line and environment of one worker process.  ``label`` names it in messages."""

    label: str = "this Python"
    # The worker sees none of this machine's files (models, pickled input sets travel in the protocol).
    remote: bool = False
    # Signals sent to the local process reach the worker itself (SIGUSR1 asks faulthandler for its stack).
    signals_reach_worker: bool = True
    # Whether the worker's parent is this process (the worker ends itself when that pid goes).
    child: bool = True

    def argv(self, env: Mapping[str, str]) -> list[str]:
        raise NotImplementedError

    def environment(self, env: Mapping[str, str]) -> dict[str, str]:
        """The local process's environment: ours, with ``env`` (the worker's variables) on top."""
        return {**os.environ, **env}

    def prepare(self) -> None:
        """Anything to do once before the first worker starts (copy our source to a remote machine)."""


def with_pythonpath(entries: list[str], env: Mapping[str, str]) -> str:
    """Our source first, then ``entries``, then what ``env`` already had."""
    parts = [str(PACKAGE_ROOT), *entries] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys(parts))


@dataclass(frozen=True)
class LocalPython(WorkerCommand):
    """``python -m ...worker`` on this machine; ``python`` defaults to this interpreter."""

    python: str = field(default_factory=lambda: sys.executable)

    def argv(self, env: Mapping[str, str]) -> list[str]:
        return [self.python, "-m", WORKER_MODULE]

    def environment(self, env: Mapping[str, str]) -> dict[str, str]:
        merged = {**os.environ, **env}
        merged["PYTHONPATH"] = with_pythonpath([], os.environ)
        return merged


@dataclass(frozen=True)
class Emulated(WorkerCommand):
    """An aarch64 CPython under ``qemu-aarch64 -cpu CPU -L ROOT``; ``site`` holds its wheels (MNN, numpy)."""

    qemu: str = "qemu-aarch64"
    cpu: str = "cortex-a76"
    root: str = ""
    site: str = ""
    python: str = "/usr/bin/python3.11"

    def argv(self, env: Mapping[str, str]) -> list[str]:
        return [self.qemu, "-cpu", self.cpu, "-L", self.root, self.root + self.python, "-m", WORKER_MODULE]

    def environment(self, env: Mapping[str, str]) -> dict[str, str]:
        merged = {**os.environ, **env}
        # The host's PYTHONPATH holds x86 extension modules: the guest must see our source and its own wheels only.
        merged["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_ROOT), self.site])
        merged.pop("PYTHONHOME", None)
        return merged


@dataclass(frozen=True)
class OverSsh(WorkerCommand):
    """``ssh [options] HOST`` running ``python -m ...worker`` there; stdin and stdout are the protocol."""

    host: str = ""
    port: int | None = None
    python: str = "python3"
    options: tuple[str, ...] = ()  # more ssh options: -i KEY, -o UserKnownHostsFile=..., as the user's ssh needs
    remote: bool = True
    signals_reach_worker: bool = False
    child: bool = False

    def ssh(self) -> list[str]:
        port = ["-p", str(self.port)] if self.port else []
        # BatchMode: a password prompt would wait forever for a terminal nobody watches; a lost connection is noticed
        # within seconds by the keep-alives, and the worker's read then ends (a failed item, never a hang).
        return ["ssh", "-T", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={SSH_CONNECT_TIMEOUT}",
                "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3", *port, *self.options, self.host]

    def source_dir(self) -> str:
        return f"{REMOTE_SOURCE_DIR}/{source_digest()}"

    def argv(self, env: Mapping[str, str]) -> list[str]:
        # sshd passes no environment: the variables go on the remote command line; exec, so that the worker's
        # parent is the ssh session, which ends when the connection does (and takes the worker with it).
        assigns = [f"{k}={shlex.quote(v)}" for k, v in env.items()]
        remote = (f"cd {self.source_dir()} && exec env PYTHONPATH=\"$PWD${{PYTHONPATH:+:$PYTHONPATH}}\" "
                  f"{' '.join(assigns)} {shlex.quote(self.python)} -m {WORKER_MODULE}")
        return [*self.ssh(), remote]

    def environment(self, env: Mapping[str, str]) -> dict[str, str]:
        return dict(os.environ)

    def prepare(self) -> None:
        """Copy our package source to the remote machine once per version of it (a tar over the same ssh)."""
        target = self.source_dir()
        script = (f"test -f {target}/ready && exit 0; mkdir -p {target} && tar xzf - -C {target} && "
                  f"touch {target}/ready")
        try:
            done = subprocess.run([*self.ssh(), script], input=source_tarball(), capture_output=True,
                                  timeout=SSH_PREPARE_TIMEOUT)
        except FileNotFoundError:
            raise LaunchError("no ssh client on this machine: install OpenSSH (Debian: apt-get install "
                              "openssh-client)") from None
        except subprocess.TimeoutExpired:
            raise LaunchError(f"ssh {self.host}: copying the worker's source did not finish within "
                              f"{SSH_PREPARE_TIMEOUT:g} s") from None
        if done.returncode != 0:
            said = done.stderr.decode(errors="replace").strip().splitlines()
            raise LaunchError(f"ssh {self.host}{f' -p {self.port}' if self.port else ''} failed "
                              f"(exit {done.returncode}: {said[-1] if said else 'no message'}); check that "
                              f"`{shlex.join(self.ssh())} true` works without a password prompt (a key in "
                              "ssh-agent or in ~/.ssh/config, or an ssh_config file given with --mnn-ssh-config)")


def _source_files() -> list[Path]:
    package = PACKAGE_ROOT / "pytest_mnn_parity"
    return sorted(p for p in package.rglob("*.py") if "__pycache__" not in p.parts)


def source_digest() -> str:
    digest = hashlib.sha256()
    for path in _source_files():
        digest.update(str(path.relative_to(PACKAGE_ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def source_tarball() -> bytes:
    """The package's Python files as a gzipped tar (about 200 KiB), paths relative to ``PACKAGE_ROOT``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in _source_files():
            tar.add(path, arcname=str(path.relative_to(PACKAGE_ROOT)))
    return buffer.getvalue()
