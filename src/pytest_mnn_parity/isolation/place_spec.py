"""How a place of the place axis is written (``--mnn-cpu``, ``--mnn-remote``) and what it names.

Kept apart from ``places.py``, which runs them: the options read these at every
pytest start-up, and running a place imports the engine.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .arm_env import ARCH

# qemu-aarch64 -cpu names that are ARMv8 application cores (``qemu-aarch64 -cpu help`` lists them all).
KNOWN_CPUS = ("cortex-a35", "cortex-a53", "cortex-a55", "cortex-a57", "cortex-a72", "cortex-a76", "cortex-a710",
              "neoverse-n1", "neoverse-n2", "neoverse-v1", "a64fx", "max")


class PlaceError(ValueError):
    """A place written wrongly: the message says how to write it."""


@dataclass(frozen=True)
class Place:
    """One value of the place axis: its id part (``arm64.a76``, ``ssh.pi``) and how to reach it."""

    name: str
    kind: str  # "arm64" or "ssh"
    target: str  # the CPU, or [USER@]HOST
    spec: str  # as written, for the reproduce command
    port: int | None = None
    python: str = "python3"

    @property
    def cpu_only(self) -> bool:
        return self.kind == ARCH

    @property
    def option(self) -> str:
        return "--mnn-cpu" if self.kind == ARCH else "--mnn-remote"


def parse_cpu(text: str) -> Place:
    """``arm64:cortex-a76`` -> the place ``arm64.a76``."""
    arch, sep, cpu = text.strip().partition(":")
    arch, cpu = arch.strip().lower(), cpu.strip().lower()
    if not sep or arch != ARCH or not cpu:
        raise PlaceError(f"{text.strip()!r}: expected {ARCH}:CPU with a qemu CPU name, e.g. {ARCH}:cortex-a76 "
                         f"(fp16 arithmetic) or {ARCH}:cortex-a53 (none); known: {', '.join(KNOWN_CPUS)}")
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", cpu):
        raise PlaceError(f"{text.strip()!r}: {cpu!r} is not a CPU name; known: {', '.join(KNOWN_CPUS)}")
    if cpu not in KNOWN_CPUS:
        from ..mnn.backends import did_you_mean  # noqa: PLC0415

        hint = did_you_mean(cpu, KNOWN_CPUS)
        if hint:  # a near miss is a typo; an unknown name may be a newer qemu's CPU, which qemu itself judges
            raise PlaceError(f"{text.strip()!r}: unknown CPU {cpu!r}{hint}")
    return Place(f"{ARCH}.{cpu.removeprefix('cortex-')}", ARCH, cpu, f"{ARCH}:{cpu}")


def parse_remote(text: str) -> Place:
    """``[NAME=]ssh:[USER@]HOST[:PORT][:PYTHON]`` -> the place ``ssh.NAME`` (NAME defaults to HOST)."""
    raw = text.strip()
    name, eq, rest = raw.partition("=")
    if not eq:
        name, rest = "", raw
    kind, sep, where = rest.partition(":")
    usage = (f"{raw!r}: expected [NAME=]ssh:[USER@]HOST[:PORT][:PYTHON], e.g. ssh:pi@raspberrypi.local or "
             "mac=ssh:me@mac.local:22:/opt/venv/bin/python (adb has no worker transport: docs/arm.md has the recipe)")
    if not sep or kind.strip().lower() != "ssh" or not where.strip():
        raise PlaceError(usage)
    parts = where.strip().split(":", 2)
    host, port, python = parts[0], None, "python3"
    for part in parts[1:]:
        if part.isdigit() and port is None and python == "python3":
            port = int(part)
        elif part:
            python = part
    if not re.fullmatch(r"[A-Za-z0-9_.@-]+", host) or (name and not re.fullmatch(r"[A-Za-z0-9_.-]+", name)):
        raise PlaceError(usage)
    shown = name or host.rpartition("@")[2]
    return Place(f"ssh.{shown}", "ssh", host, raw, port, python)
