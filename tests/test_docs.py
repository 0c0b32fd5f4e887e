"""The docs stay truthful: every option is documented, and every example command and snippet runs."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest

from conftest import REPO, gpu_backends_present

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
_FENCE = re.compile(r"```(\w+)\n(.*?)```", re.S)
_EXPECT = re.compile(r"#\s*exits (\d+)(?::\s*(\w+))?\s*$")


def _blocks(language: str):
    for doc in DOCS:
        for lang, body in _FENCE.findall(doc.read_text()):
            if lang == language:
                yield doc, body


def _commands():
    for doc, body in _blocks("sh"):
        for line in body.splitlines():
            if line.startswith("pytest --mnn"):
                yield pytest.param(line, id=f"{doc.name}:{line[:90]}")


@pytest.mark.parametrize("line", list(_commands()))
def test_documented_command_runs_as_documented(line, tmp_path):
    expect = _EXPECT.search(line)
    command = _EXPECT.sub("", line).strip()
    argv = shlex.split(command)
    if gpu_backends_present() and "--mnn-backends" not in argv:
        # The docs show the CPU wheel's matrix; on a GPU build the default matrix
        # also runs MNN's GPU backends, whose own bugs (docs/gpu.md) would fail
        # an example that is about something else.
        argv += ["--mnn-backends", "CPU,METAL"]
    proc = subprocess.run([sys.executable, "-m", *argv, "-p", "no:cacheprovider"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    out = proc.stdout + proc.stderr
    expected_rc = int(expect.group(1)) if expect else 0
    assert proc.returncode == expected_rc, out[-3000:]
    if expect and expect.group(2):
        assert expect.group(2) in out
    assert "MNN parity" in out  # the matrix was printed


def test_engine_snippets_run(tmp_path):
    snippets = [body for doc, body in _blocks("python")]
    assert snippets
    for code in snippets:
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "device supports" not in proc.stdout  # MNN's import chatter is kept off stdout


def _registered(kind: str) -> set[str]:
    proc = subprocess.run([sys.executable, "-m", "pytest", "--help"], cwd=REPO, capture_output=True, text=True)
    pattern = r"--mnn-[a-z-]+" if kind == "option" else r"^\s+(mnn_[a-z_]+)"
    return set(re.findall(pattern, proc.stdout, re.M))


def test_every_option_and_ini_key_is_documented():
    options_doc = (REPO / "docs" / "options.md").read_text()
    options, keys = _registered("option"), _registered("ini")
    assert "--mnn-model" in options and "mnn_backends" in keys
    for name in options | keys:
        assert f"`{name}" in options_doc, f"{name} is not documented in docs/options.md"
