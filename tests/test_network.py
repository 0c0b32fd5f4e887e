"""No network, ever: a full run (ONNX conversion, isolated workers, backend probes, report) opens no socket.

The run happens in a child pytest whose every Python process - the run itself
and each isolated worker it starts - loads a ``sitecustomize`` guard first.
The guard makes creating a socket, connecting, sending or resolving a name
raise, and logs the attempt, so neither a swallowed exception nor a worker
escapes the check.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

from conftest import FIXTURES, plugin_env, read_report

GUARD = textwrap.dedent('''
    import os, socket, sys

    _LOG = os.environ["MNN_PARITY_TEST_NET_LOG"]
    with open(_LOG + ".loaded", "a") as _f:
        _f.write(open("/proc/self/cmdline", "rb").read().replace(b"\\0", b" ").decode() + "\\n")

    def _blocked(what, args):
        with open(_LOG, "a") as f:
            f.write(f"{os.getpid()} {what} {args!r}\\n")
        raise OSError(f"network access blocked by the test: {what} {args!r}")

    _EVENTS = {"socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
               "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo"}

    def _hook(event, args):
        if event in _EVENTS:
            _blocked(event, args)

    sys.addaudithook(_hook)

    def _patched(name):
        def blocked(*args, **kwargs):
            _blocked(name, args)
        return blocked

    socket.socket.connect = _patched("socket.socket.connect")
    socket.socket.connect_ex = _patched("socket.socket.connect_ex")
    socket.create_connection = _patched("socket.create_connection")
''')

CONVERT_TEST = textwrap.dedent('''
    from pytest_mnn_parity import ParityEngine, RunConfig
    from pytest_mnn_parity.onnx.convert import convert_onnx

    def test_onnx_conversion_and_a_parity_check_of_the_result(tmp_path):
        converted = convert_onnx("multi_io.onnx", tmp_path / "multi_io.mnn")
        assert converted.target.stat().st_size > 0
        assert ParityEngine().check(converted.target, RunConfig("CPU", "high")).category.value == "ok"
''')


def test_a_full_run_with_conversion_and_isolation_opens_no_socket(tmp_path):
    guard_dir = tmp_path / "guard"
    guard_dir.mkdir()
    (guard_dir / "sitecustomize.py").write_text(GUARD)
    (tmp_path / "test_offline.py").write_text(CONVERT_TEST)
    (tmp_path / "lama_like.mnn").write_bytes((FIXTURES / "demo" / "lama_like.mnn").read_bytes())
    (tmp_path / "multi_io.onnx").write_bytes((FIXTURES / "onnx" / "multi_io.onnx").read_bytes())
    log = tmp_path / "net.log"
    env = plugin_env(MNN_PARITY_TEST_NET_LOG=str(log))
    env["PYTHONPATH"] = f"{guard_dir}:{env['PYTHONPATH']}"

    # The guard works: in a child Python, a connection attempt fails and is logged.
    probe = subprocess.run([sys.executable, "-c", "import socket; socket.create_connection(('127.0.0.1', 9))"],
                           env=env, capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0 and "network access blocked by the test" in probe.stderr
    assert "create_connection" in log.read_text()
    log.unlink()

    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "test_offline.py",
                          "--mnn-model", "lama_like.mnn", "--mnn-backends", "CPU,METAL", "--mnn-isolate",
                          "--mnn-report", "r.json", "-rs"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    assert "5 passed, 4 skipped" in out
    assert not log.exists(), log.read_text()
    loaded = (tmp_path / "net.log.loaded").read_text()
    assert " -m pytest " in loaded
    assert "pytest_mnn_parity.isolation.worker" in loaded  # the isolated workers ran guarded too
    report = read_report(tmp_path / "r.json")
    assert {r["worker"] is not None for r in report["results"] if r["outcome"] == "passed"} == {True}
