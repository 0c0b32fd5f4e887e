"""The JSON report survives a killed run, is never half-written, and a bad path is refused at start-up."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_mnn_parity.report.durable import IncrementalReport, report_path_problem
from pytest_mnn_parity.core.files import write_json as write_json_atomically
from pytest_mnn_parity.report.records import build_report

from conftest import FIXTURES, plugin_env

HEADER = {"mnn_version": "3.6.1", "settings": {"seed": 0, "backends": ["CPU"]},
          "backends": {"CPU": {"available": True, "forward_type": 13, "reason": "ok"}}}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
records = st.lists(st.fixed_dictionaries(
    {"nodeid": st.text(min_size=1, max_size=20), "outcome": st.sampled_from(["passed", "failed", "skipped", "error"])},
    optional={"outputs": st.dictionaries(st.text(max_size=6), json_values, max_size=3), "message": st.text()}),
    max_size=8)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records)
def test_incremental_text_is_exactly_the_final_report_and_every_intermediate_file_is_valid(recs):
    with tempfile.TemporaryDirectory() as folder:
        final, path = Path(folder) / "final.json", Path(folder) / "incremental.json"
        write_json_atomically(final, build_report(recs, **HEADER))
        writer = IncrementalReport(path, lambda: build_report([], **HEADER), ratio=0.0)
        for count, rec in enumerate(recs, 1):
            writer.add(rec)
            on_disk = json.loads(path.read_text())  # strict JSON at every step
            assert len(on_disk["results"]) == count and sum(on_disk["summary"].values()) == count
        writer.flush()
        assert path.read_text() == final.read_text()
        assert not [p for p in Path(folder).iterdir() if p.suffix == ".tmp"]


class RecordedWrites(IncrementalReport):
    """The writer, with when each rewrite started and what it cost (the throttle's own clock)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.log: list[tuple[float, float]] = []

    def _write(self) -> None:
        started = time.monotonic()
        super()._write()
        self.log.append((started, self._last_cost))


def test_throttling_bounds_the_time_spent_writing():
    """Large records (a layer trace each) make every rewrite cost more; the writer skips rewrites to keep up.

    The bound is the throttle's rule, checked on its own clock rather than against the machine's speed (a timed
    assert failed on a loaded CI machine): no rewrite starts before ``ratio`` times the previous one's cost has
    passed since it ended, so all but the first cost at most 1/``ratio`` of the time between them."""
    layers = [{"index": i, "name": f"conv_{i}", "max_abs": 1e-3 * i, "cosine": 0.999, "health": []}
              for i in range(100)]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "r.json"
        writer = RecordedWrites(path, lambda: build_report([], **HEADER), ratio=10.0)
        for i in range(200):
            writer.add({"nodeid": f"m::{i}", "outcome": "passed", "layers": layers})
        assert 1 <= writer.writes < 200  # rewrites were skipped, and the report was written
        for (start, cost), (next_start, _) in zip(writer.log, writer.log[1:]):
            assert next_start >= start + cost + writer.ratio * cost - 1e-6, (start, cost, next_start)
        writer.flush()
        assert len(json.loads(path.read_text())["results"]) == 200


def test_a_throttled_record_is_written_when_the_window_ends_without_waiting_for_the_next_one():
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "r.json"
        writer = IncrementalReport(path, lambda: build_report([], **HEADER), ratio=300.0)
        writer.add({"nodeid": "a", "outcome": "passed"})
        writer.add({"nodeid": "b", "outcome": "failed"})  # inside the window: not written yet
        assert len(json.loads(path.read_text())["results"]) == 1 and writer.dirty
        deadline = time.monotonic() + 10
        while writer.dirty and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [r["nodeid"] for r in json.loads(path.read_text())["results"]] == ["a", "b"]
        assert writer.writes == 2


def _workers_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"pytest_mnn_parity.isolation.worker" in cmdline:
                found.append(int(entry.name))
    return found


def test_a_killed_pytest_leaves_a_valid_report_of_what_finished_and_no_worker_behind(tmp_path):
    for name in ("demo/lama_like.mnn", "slow/matmul_chain.mnn"):
        (tmp_path / Path(name).name).write_bytes((FIXTURES / name).read_bytes())
    report = tmp_path / "out" / "r.json"
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--mnn-only", "--mnn-backends",
                             "CPU", "--mnn-precisions", "high,low", "--mnn-model", "lama_like.mnn", "--mnn-model",
                             "matmul_chain.mnn", "--mnn-isolate", "--mnn-report", str(report)],
                            cwd=tmp_path, env=plugin_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
            workers = _workers_of(proc.pid) or workers
            if report.is_file() and len(json.loads(report.read_text())["results"]) >= 2:
                break  # the demo model is done; the slow one is running in its worker (for seconds)
        assert proc.poll() is None, "the run ended before it could be killed:\n" + proc.stdout.read().decode()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    data = json.loads(report.read_text())
    assert data["schema"] == "pytest-mnn-parity/1" and data["summary"] == {"passed": 2}
    assert [r["nodeid"] for r in data["results"]] == ["lama_like.mnn::parity[CPU-high]",
                                                      "lama_like.mnn::parity[CPU-low]"]
    assert not list(report.parent.glob("*.tmp"))
    # Workers end with their parent (PR_SET_PDEATHSIG), even in the middle of an inference.
    assert workers
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()]


@pytest.mark.parametrize(("target", "expected"), [
    ("folder", "folder is a directory; give a file name"),
    ("a_file/r.json", "a_file is a file, so no folder can be made under it"),
    ("/proc/mnn-parity.json", "cannot create files in /proc"),
])
def test_an_unwritable_report_path_is_a_usage_error_before_any_model_runs(pytester, models, target, expected):
    models("demo/lama_like.mnn")
    (pytester.path / "folder").mkdir()
    (pytester.path / "a_file").write_text("not a folder")
    result = pytester.runpytest("--mnn-only", "--mnn-backends", "CPU", "--mnn-model", "lama_like.mnn",
                                "--mnn-report", target)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert f"--mnn-report {target}: cannot write the report there: " in result.stderr.str()
    assert expected in result.stderr.str()
    assert "MNN parity" not in result.stdout.str() and "passed" not in result.stdout.str()


def test_a_writable_report_path_leaves_nothing_behind_at_start_up(tmp_path):
    assert report_path_problem(tmp_path / "new" / "deeper" / "r.json") is None
    assert list(tmp_path.iterdir()) == []
