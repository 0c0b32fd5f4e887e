"""The docs stay truthful: every option is documented, every example command and snippet runs, and the output the
docs show is the output the commands give.

Shown output: a fence marked ``output`` (```` ```output ````) is the output of the last command of the nearest
``sh`` fence above it (```` ```output of=WORD ```` : of the last command above it containing WORD).  Each of its
lines must appear in the command's real output, in order (other lines may come between); a line ``...`` and
blank lines are skipped, and ``...`` inside a line stands for any text.  Runs of spaces, the width of pytest's
``====`` rules and the directory the command ran in (``/abs/path/``) do not count.  Numbers are compared with what
legitimately varies between runs in mind: durations (``0.35s``, ``1.2 s``) not at all; measured errors in
scientific notation or below 1e-3 within a factor of 3 (another CPU rounds differently); other decimals within
1%; percentages within half a point; integers exactly.  So ``zeros 98%`` or ``tier fp16`` where the run now says
``zeros 100%`` or ``tier fp32`` fails the test that runs the command.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import difflib
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


_OF = re.compile(r"\bof=(\S+)")


def shown_outputs(doc) -> dict[str, list[str]]:
    """Each command line of ``doc`` (as written) -> the bodies of the ``output`` fences that show its output."""
    shown: dict[str, list[str]] = {}
    commands: list[str] = []  # every command above, in order
    last_fence: list[str] = []  # the commands of the nearest sh fence above
    for lang, info, body in _ANY_FENCE.findall(doc.read_text()):
        if lang == "sh":
            last_fence = [line for line in body.splitlines() if line.startswith(("pytest ", "python "))]
            commands += last_fence
        elif lang == "output":
            word = _OF.search(info)
            owners = [c for c in commands if word.group(1) in c] if word else last_fence
            assert owners, f"{doc.name}: an output fence ({info.strip() or 'no of='}) follows no command it names"
            shown.setdefault(owners[-1], []).append(body)
    return shown


_SECONDS = re.compile(r"\b\d+(?:\.\d+)?\s?s\b")
_NUMBER = re.compile(r"(?<![\w.])([-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?)(?![\w])")
_RULE = re.compile(r"([=_-])\1{2,}")


def _normal(line: str, where: str) -> str:
    line = line.replace(where.rstrip("/") + "/", "") if where else line
    line = _SECONDS.sub("<seconds>", line)
    return " ".join(_RULE.sub(r"\1\1\1", line).split())


def _numbers_agree(shown: str, real: str, percent: bool) -> bool:
    a, b = float(shown), float(real)
    if percent:
        return abs(a - b) <= 0.5
    if not any(c in shown + real for c in ".e"):
        return a == b
    if "e" in shown + real or min(abs(a), abs(b)) < 1e-3:
        return a == b or (a * b > 0 and 1 / 3 <= a / b <= 3)
    return abs(a - b) <= 0.01 * max(abs(a), abs(b))


def line_matches(shown: str, real: str) -> bool:
    """One shown line against one real line (both normalised), with the number rules above."""
    if "..." in shown:  # an elision: the pieces in order, each as it is (".../x" also stands for a relative "x")
        first, *rest = shown.split("...")
        pattern = ".*".join([re.escape(first), *(re.escape(piece.removeprefix("/")) for piece in rest)])
        return re.fullmatch(pattern, real) is not None
    a, b = _NUMBER.split(shown), _NUMBER.split(real)
    if len(a) != len(b):
        return False
    for i, (x, y) in enumerate(zip(a, b)):
        if i % 2 == 0:
            if x != y:
                return False
        elif not _numbers_agree(x, y, percent=a[i + 1].startswith("%")):
            return False
    return True


def check_shown_output(body: str, out: str, where: str, label: str) -> None:
    """Every line the docs show is in the real output, in order; the failure names the line and the nearest one."""
    real = [_normal(line, where) for line in out.splitlines()]
    at = 0
    for raw in body.splitlines():
        shown = _normal(raw, where)
        if not shown or shown == "...":
            continue
        found = next((i for i in range(at, len(real)) if line_matches(shown, real[i])), None)
        if found is None:
            nearest = difflib.get_close_matches(shown, real, n=1, cutoff=0.0)
            pytest.fail(f"{label}: the docs show\n    {raw.strip()}\nbut the run printed no such line (after line "
                        f"{at} of its output); the nearest is\n    {nearest[0] if nearest else '(none)'}\n"
                        f"Update the doc's output fence from a real run (numbers: see tests/test_docs.py).\n"
                        f"--- output ---\n{out[-4000:]}", pytrace=False)
        at = found + 1


def _commands():
    for doc, body in _blocks("sh"):
        if _project_files(doc):
            continue  # an example project's commands run in its own directory (below)
        outputs = shown_outputs(doc)
        for line in body.splitlines():
            if line.startswith("pytest --mnn"):
                yield pytest.param(line, outputs.get(line, []), id=f"{doc.name}:{line[:90]}")


@pytest.mark.parametrize("line, shown", list(_commands()))
def test_documented_command_runs_as_documented(line, shown, tmp_path):
    expect = _EXPECT.search(line)
    command = _EXPECT.sub("", line).strip()
    argv = shlex.split(command)
    if "--mnn-cpu" in argv and shutil.which("qemu-aarch64") is None:
        pytest.skip("an emulated ARM example needs qemu-user (apt-get install qemu-user; .ci/run installs it)")
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
    if not gpu_backends_present():  # the docs show the CPU wheel's output
        for body in shown:
            check_shown_output(body, out, str(REPO), command)


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
    shown = shown_outputs(doc)
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
        for body in shown.get(text, []) if not gpu_backends_present() else []:
            check_shown_output(body, out, str(tmp_path), f"{doc.name}: {text}")
        ran.append(_EXPECT.sub("", text).strip())
    assert ran, f"{doc.name} has example files but runs nothing"
    # A CI workflow in the docs runs exactly the commands the docs run here.
    for workflow in (p for p in _project_files(doc) if p.endswith((".yml", ".yaml"))):
        steps = re.findall(r"^\s*(?:-\s*)?run:\s*((?:pytest|python) .*)$", (tmp_path / workflow).read_text(), re.M)
        assert steps, workflow
        for step in steps:
            command = re.split(r"\s+(?:>>?|\|)\s+", step.strip())[0]  # without the shell redirection
            assert command in ran, f"{workflow} runs {command!r}, which {doc.name} does not run"


@pytest.mark.parametrize("shown, real, same", [
    ("fixtures/collapse/zero.fp16.mnn  FAIL zero_output zeros 98%", "fixtures/collapse/zero.fp16.mnn  FAIL "
     "zero_output zeros 100%", False),  # the drift issue 21 found
    ("zero_output (tier fp16)", "zero_output (tier fp32)", False),
    ("search: then shrunk in 4 more run(s)", "search: then shrunk in 2 more run(s)", False),
    ("4 passed, 24 skipped in 1.01s", "4 passed, 24 skipped in 3.20s", True),  # durations vary
    ("4 passed", "5 passed", False),
    ("PASS max|d| 6e-07", "PASS max|d| 5.4e-07", True),  # a measured error on another CPU
    ("PASS max|d| 6e-07", "PASS max|d| 0.0017", False),
    ("outside 99.6%", "outside 99.61%", True),
    ("outside 98.0%", "outside 99.6%", False),
    ("max |ref| 0.7025", "max |ref| 0.7031", True),
    ("max |ref| 0.7025", "max |ref| 0.75", False),
    ("model    x.mnn  CPU-high", "model x.mnn CPU-high", True),  # column widths
    ("===== MNN parity =====", "================== MNN parity ==================", True),
    ("model:     .../fixtures/a.mnn (sha256 ...)", "model: fixtures/a.mnn (sha256 3c7df17321d2)", True),
    ("model:     .../fixtures/a.mnn (sha256 ...)", "model: fixtures/b.mnn (sha256 3c7df17321d2)", False),
])
def test_shown_output_is_compared_with_what_legitimately_varies_in_mind(shown, real, same):
    assert line_matches(_normal(shown, ""), _normal(real, "")) is same


def test_a_shown_line_the_run_does_not_print_fails_naming_it_and_the_nearest():
    out = "collected 2 items\n== MNN parity ==\nx.mnn  FAIL zero_output zeros 100%\n2 failed in 0.4s\n"
    check_shown_output("...\nx.mnn  FAIL zero_output zeros 100%\n", out, "/here", "doc.md: pytest x")
    with pytest.raises(pytest.fail.Exception) as failed:
        check_shown_output("== MNN parity ==\nx.mnn  FAIL zero_output zeros 98%\n", out, "/here", "doc.md: pytest x")
    assert ("doc.md: pytest x: the docs show\n    x.mnn  FAIL zero_output zeros 98%\nbut the run printed no such line "
            "(after line 2 of its output); the nearest is\n    x.mnn FAIL zero_output zeros 100%") in str(failed.value)
