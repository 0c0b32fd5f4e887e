"""The docs stay truthful: every option is documented, and every example command and snippet runs."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, gpu_backends_present

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
_FENCE = re.compile(r"```(\w+)\n(.*?)```", re.S)
_EXPECT = re.compile(r"#\s*exits (\d+)(?::\s*(\w+))?\s*$")

_ANY_FENCE = re.compile(r"```(\w+)([^\n]*)\n(.*?)```", re.S)
_FILE = re.compile(r"\bfile=(\S+)")
SRC = REPO / "src"


def _project_files(doc) -> list[str]:
    return [m.group(1) for m in _FILE.finditer(" ".join(info for _, info, _ in _ANY_FENCE.findall(doc.read_text())))]


def _blocks(language: str):
    for doc in DOCS:
        for lang, body in _FENCE.findall(doc.read_text()):
            if lang == language:
                yield doc, body


def _commands():
    for doc, body in _blocks("sh"):
        if _project_files(doc):
            continue  # an example project's commands run in its own directory (below)
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


def test_every_marker_is_documented_with_its_arguments():
    proc = subprocess.run([sys.executable, "-m", "pytest", "--markers"], cwd=REPO, capture_output=True, text=True)
    markers = re.findall(r"^@pytest\.mark\.(mnn_\w+)", proc.stdout, re.M)
    assert {"mnn_parity", "mnn_xfail", "mnn_requires_backend", "mnn_generated"} <= set(markers)
    documented = (REPO / "docs" / "fixtures.md").read_text() + (REPO / "docs" / "options.md").read_text()
    for name in markers:
        assert f"`{name}" in documented, f"marker {name} is not documented in docs/fixtures.md"
    for key in ("model=", "reference=", "backends=", "precisions=", "atol=", "rtol=", "min_cosine=",
                "max_outside_fraction=", "partial_zero_fraction=", "backend=", "precision=", "reason=", "strict="):
        assert key in documented, f"marker argument {key} is not documented in docs/fixtures.md"


def test_every_option_and_ini_key_is_documented():
    options_doc = (REPO / "docs" / "options.md").read_text()
    options, keys = _registered("option"), _registered("ini")
    assert "--mnn-model" in options and "mnn_backends" in keys
    for name in options | keys:
        assert f"`{name}" in options_doc, f"{name} is not documented in docs/options.md"


# -- example projects ---------------------------------------------------------------
# A doc with fences like ```python file=tests/test_model.py is an example project:
# those files are written into an empty directory (next to a copy of fixtures/),
# and every line of its ```sh fences that starts with `pytest` or `python` runs
# there, in document order, with the same `# exits N: WORD` convention.

def _project_docs():
    return [pytest.param(doc, id=doc.name) for doc in DOCS if _project_files(doc)]


def _project_steps(doc):
    for lang, info, body in _ANY_FENCE.findall(doc.read_text()):
        target = _FILE.search(info)
        if target:
            yield "file", target.group(1), body
        elif lang == "sh":
            for line in body.splitlines():
                if line.startswith(("pytest ", "python ")):
                    yield "run", line, ""


@pytest.mark.parametrize("doc", _project_docs())
def test_documented_example_project_runs_as_documented(doc, tmp_path):
    # A copy, not a link: paths then read as they would in the user's repository, and nothing an
    # example writes can reach the real fixtures.
    shutil.copytree(REPO / "fixtures", tmp_path / "fixtures", ignore=shutil.ignore_patterns("*.onnx", "*.py"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    if gpu_backends_present():
        # The examples show a CPU-only CI runner (its outputs, a missing OPENCL); on a GPU build of MNN the
        # GPU backends are switched off for them, with the plugin's own escape hatch.
        env["MNN_PARITY_DISABLE_BACKENDS"] = ",".join(gpu_backends_present())
    ran = []
    for kind, text, body in _project_steps(doc):
        if kind == "file":
            path = tmp_path / text
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(body)
            continue
        expect = _EXPECT.search(text)
        argv = shlex.split(_EXPECT.sub("", text).strip())
        command = ([sys.executable, "-m", *argv, "-p", "no:cacheprovider"] if argv[0] == "pytest"
                   else [sys.executable, *argv[1:]])
        proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        out = proc.stdout + proc.stderr
        expected_rc = int(expect.group(1)) if expect else 0
        assert proc.returncode == expected_rc, f"{doc.name}: {text}\n{out[-3000:]}"
        if expect and expect.group(2):
            assert expect.group(2) in out, f"{doc.name}: {text}\n{out[-3000:]}"
        if argv[0] == "pytest":
            assert "MNN parity" in out, f"{doc.name}: {text}\n{out[-3000:]}"
        ran.append(_EXPECT.sub("", text).strip())
    assert ran, f"{doc.name} has example files but runs nothing"
    # A CI workflow in the docs runs exactly the commands the docs run here.
    for workflow in (p for p in _project_files(doc) if p.endswith((".yml", ".yaml"))):
        steps = re.findall(r"^\s*(?:-\s*)?run:\s*((?:pytest|python) .*)$", (tmp_path / workflow).read_text(), re.M)
        assert steps, workflow
        for step in steps:
            command = re.split(r"\s+(?:>>?|\|)\s+", step.strip())[0]  # without the shell redirection
            assert command in ran, f"{workflow} runs {command!r}, which {doc.name} does not run"
