"""Tests that a wrong answer cannot slip past (issue 20): each guards one check of the verdict that hand-made
mutations showed no other test caught, on real MNN runs where one is possible.

- the cosine bound: an output inside every element's allowance that is still wrong as a whole;
- fallback detection: a session (or Module API runtime) asked for a backend that silently runs on the CPU, in the
  generated items and in users' own tests, must fail, never pass. A real fallback of an available backend cannot
  happen on the CPU wheel, so discovery is told METAL (never in a Linux build) is available, as it would be on a
  GPU box whose backend breaks after discovery; MNN then really falls back to the CPU;
- --mnn-require-backends and MNN_PARITY_REQUIRE_GPU: a missing backend that is demanded fails instead of skipping;
- which tests count as "on a GPU build" is read from the installed MNN, never from discovery (the code under test);
- input set B: a real fixture that only set B breaks fails, and says so with set B's numbers.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_mnn_parity import ParityEngine, RunConfig, backends
from pytest_mnn_parity.core.tolerances import resolve
from pytest_mnn_parity.core.verdict import Category, judge_output
from pytest_mnn_parity.engine.user_inputs import MnnRunError, ModelUnderTest

import conftest
from conftest import DEMO, read_report, results_by_nodeid

# METAL is in no Linux build of MNN: a session asked for it always runs on the CPU.
FAKE_METAL = backends.BackendStatus("METAL", True, backends.FORWARD_TYPES["METAL"],
                                    "FAKE: METAL probed fine (as a GPU backend that breaks after discovery)")


def _fake_available(monkeypatch, *names: str) -> None:
    for name in names:
        monkeypatch.setitem(backends._CACHE, name, backends.BackendStatus(
            name, True, backends.FORWARD_TYPES[name], f"FAKE: {name} probed fine"))


def _fallback_backends() -> list[str]:
    """Backends whose sessions really fall back here: METAL always, OPENCL too on the CPU-only wheel."""
    return ["METAL"] + ([] if conftest.gpu_build() else ["OPENCL"])


# -- 1. the cosine bound --------------------------------------------------------------------------------------------

def _peaky(n: int, small: float) -> np.ndarray:
    """A detector-like output: one strong response, every other element small and positive."""
    ref = np.full(n, small, np.float32)
    ref[n // 2] = 1.0
    return ref


def test_only_the_cosine_bound_catches_small_elements_whose_sign_flipped():
    """A user's loose atol (a layer of tolerances.resolve, as a sidecar or marker gives it) holds every element;
    the output is still wrong: every small response has the wrong sign. Only the cosine sees it."""
    tol = resolve("CPU", "low", ("sidecar", {"atol": 0.05, "abs_floor": 0.0}), arithmetic="fp32")
    small = 0.45 * tol.atol  # a flip moves each element by 0.9 x atol x scale: inside its allowance
    ref = _peaky(1000, small)
    tgt = ref.copy()
    tgt[ref == np.float32(small)] *= -1
    v = judge_output("scores", tgt, ref, tol)
    assert v.metrics.outside_fraction == 0 and v.metrics.cosine < tol.min_cosine
    assert v.category is Category.MISMATCH and v.decided_by == "cosine"
    assert "decided by: cosine" in v.detail
    # The same output judged without the flips passes: the failure is the cosine's alone.
    assert judge_output("scores", ref.copy(), ref, tol).passed


@settings(max_examples=40, deadline=None)
@given(st.integers(50, 3000), st.floats(0.05, 0.95), st.floats(0.0, 1.0), st.sampled_from(["fp32", "fp16", "bf16"]))
def test_an_output_inside_every_allowance_passes_exactly_when_its_cosine_is_high_enough(n, share, flip_share, tier):
    """Whatever the tier: with no element outside its allowance, the cosine alone decides, and is named."""
    tol = resolve("CPU", "high", ("marker", {"atol": 0.1, "abs_floor": 0.0}), arithmetic=tier)
    small = share * tol.atol / 2
    ref = _peaky(n, small)
    tgt = ref.copy()
    rng = np.random.default_rng(n)
    flipped = (ref == np.float32(small)) & (rng.random(n) < flip_share)
    tgt[flipped] *= -1
    v = judge_output("y", tgt, ref, tol)
    assert v.metrics.outside_fraction == 0
    if v.metrics.cosine >= tol.min_cosine:
        assert v.passed, v.detail
    else:
        assert not v.passed and v.decided_by == "cosine", v.detail


def test_a_loose_tolerance_does_not_pass_a_wrong_output_the_cosine_catches_it(pytester, models):
    """The docs' --mnn-min-cosine example, as a user runs it: the input-blind fp16 build is within --mnn-atol 0.6
    everywhere; its cosine 0.91 fails it at --mnn-min-cosine 0.99, and passes it at 0.9."""
    models("collapse/stale.fp16.mnn", "collapse/stale.mnn")
    base = ["--mnn-only", "--mnn-model", "stale.fp16.mnn", "--mnn-reference", "stale.mnn", "--mnn-backends", "CPU",
            "--mnn-precisions", "high", "--mnn-atol", "0.6", "--mnn-isolate", "never", "--mnn-layers", "off",
            "--mnn-report", "r.json"]
    strict = pytester.runpytest(*base, "--mnn-min-cosine", "0.99")
    strict.assert_outcomes(failed=1)
    out = results_by_nodeid(read_report(pytester.path / "r.json"))["stale.fp16.mnn::parity[CPU-high]"]["outputs"]["out"]
    assert out["outside_fraction"] == 0 and out["cosine"] < 0.99 and out["decided_by"] == "cosine"
    strict.stdout.fnmatch_lines([f"mismatch on CPU-high: output 'out': 0.00% of elements outside tolerance, * "
                                 f"cosine {out['cosine']:.6f} (decided by: cosine)"])
    loose = pytester.runpytest(*base, "--mnn-min-cosine", f"{out['cosine'] - 0.01:.4f}")
    loose.assert_outcomes(passed=1)


# -- 2. fallback detection ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", _fallback_backends())
def test_a_users_run_on_a_backend_that_falls_back_raises_backend_fallback(monkeypatch, backend):
    """ModelUnderTest.run, the engine of mnn_run: the session's own forward type is read, never discovery's word."""
    _fake_available(monkeypatch, backend)
    mut = ModelUnderTest(ParityEngine(), DEMO, label="demo")
    inputs = {"image": np.random.default_rng(0).random((1, 3, 32, 32), dtype=np.float32),
              "mask": np.zeros((1, 1, 32, 32), np.float32)}
    with pytest.raises(MnnRunError) as info:
        mut.run(RunConfig(backend, "high"), inputs)
    assert info.value.category is Category.BACKEND_FALLBACK
    assert (f"demo on {backend}-high: {backend} was available at discovery but this session runs on CPU"
            in str(info.value)) and "fell back silently" in str(info.value)


def test_a_users_test_whose_backend_falls_back_fails_and_is_reported_as_a_fallback(pytester, models, monkeypatch):
    backends_asked = _fallback_backends()
    _fake_available(monkeypatch, *backends_asked)
    models("demo/lama_like.mnn")
    pytester.makepyfile(test_user=f'''
        import numpy as np
        import pytest

        @pytest.mark.mnn_parity(model="lama_like.mnn", backends="{','.join(backends_asked)}", precisions="high")
        def test_inpaint(mnn_run, mnn_parity):
            rng = np.random.default_rng(0)
            out = mnn_run({{"image": rng.random((1, 3, 32, 32), dtype=np.float32),
                           "mask": np.zeros((1, 1, 32, 32), np.float32)}})
            mnn_parity(out)
    ''')
    result = pytester.runpytest("--mnn-report", "r.json")
    result.assert_outcomes(failed=len(backends_asked))
    records = results_by_nodeid(read_report(pytester.path / "r.json"))
    for backend in backends_asked:
        rec = records[f"test_user.py::test_inpaint[{backend}-high]"]
        assert (rec["outcome"], rec["category"]) == ("failed", "backend_fallback"), rec
        assert "this session runs on CPU" in rec["message"] and "fell back silently" in rec["message"]


@pytest.mark.parametrize("isolate", ["never", "auto"])
def test_generated_items_that_fall_back_fail_on_the_session_and_the_module_api(pytester, models, monkeypatch,
                                                                               isolate):
    """--mnn-api both: one session item and one Module API item per configuration, in process and in the isolated
    worker that auto gives a non-CPU backend (the parent's discovery travels there)."""
    _fake_available(monkeypatch, "METAL")
    models("demo/lama_like.mnn")
    result = pytester.runpytest("--mnn-only", "--mnn-model", "lama_like.mnn", "--mnn-backends", "METAL",
                                "--mnn-precisions", "high", "--mnn-api", "both", "--mnn-isolate", isolate,
                                "--mnn-layers", "off", "--mnn-report", "r.json")
    records = results_by_nodeid(read_report(pytester.path / "r.json"))
    assert {(r["outcome"], r["category"]) for r in records.values()} == {("failed", "backend_fallback")}, records
    assert set(records) == {"lama_like.mnn::parity[session-METAL-high]", "lama_like.mnn::parity[module-METAL-high]"}
    assert "this module runs on CPU" in records["lama_like.mnn::parity[module-METAL-high]"]["message"]
    assert "this session runs on CPU" in records["lama_like.mnn::parity[session-METAL-high]"]["message"]
    assert result.ret == 1


# -- 3. "a GPU build" is read from the installed MNN ----------------------------------------------------------------

def test_a_gpu_build_is_recognised_from_its_files_and_metadata_never_from_discovery(tmp_path, monkeypatch):
    def site(name: str, version: str, gpu_libs: bool = False):
        package = tmp_path / name / "MNN"
        package.mkdir(parents=True)
        meta = tmp_path / name / f"mnn-{version}.dist-info"
        meta.mkdir()
        (meta / "METADATA").write_text(f"Metadata-Version: 2.4\nName: mnn\nVersion: {version}\n")
        if gpu_libs:
            (tmp_path / name / "mnn_gpu_libs").mkdir()
        return package

    assert conftest.gpu_build_files(site("registry", "3.6.1")) == ""
    assert conftest.gpu_build_files(site("gpu", "3.6.1+gpu")) == "mnn-3.6.1+gpu.dist-info is version 3.6.1+gpu"
    assert "mnn_gpu_libs exists" in conftest.gpu_build_files(site("libs", "3.6.1", gpu_libs=True))
    # A discovery that wrongly finds GPUs (the bug the CPU-wheel tests guard against) changes nothing.
    monkeypatch.delenv(conftest.GPU_BUILD_ENV, raising=False)
    real = conftest.gpu_build()
    _fake_available(monkeypatch, *conftest.GPU_BUILD_BACKENDS)
    assert conftest.gpu_build() == real
    if not real:
        assert conftest.gpu_backends_present() == []
    # The GPU job says so itself.
    monkeypatch.setenv(conftest.GPU_BUILD_ENV, "1")
    assert conftest.gpu_build() == f"{conftest.GPU_BUILD_ENV}=1"


# -- 4. demanding backends ------------------------------------------------------------------------------------------

def test_a_required_backend_that_is_missing_fails_its_items_and_the_run(pytester, models):
    models("multi_io.mnn")
    result = pytester.runpytest("--mnn-only", "--mnn-model", "multi_io.mnn", "--mnn-backends", "CPU",
                                "--mnn-precisions", "high", "--mnn-require-backends", "metal", "--mnn-report",
                                "r.json")
    # Required means tested: METAL joins --mnn-backends CPU, and its item fails instead of skipping.
    result.assert_outcomes(passed=1, failed=1)
    assert result.ret == 1
    reason = backends.discover(["METAL"])["METAL"].reason
    rec = results_by_nodeid(read_report(pytester.path / "r.json"))["multi_io.mnn::parity[METAL-high]"]
    assert (rec["outcome"], rec["category"]) == ("failed", "backend_unavailable")
    assert rec["message"].startswith(f"METAL is required (--mnn-require-backends METAL) but unavailable: {reason}")
    result.stdout.fnmatch_lines(["*MNN parity*", f"required backend missing: METAL is required "
                                                  f"(--mnn-require-backends METAL) but unavailable: {reason}*"])


def test_a_run_without_models_that_requires_a_missing_backend_exits_non_zero_with_the_reason(pytester):
    pytester.makepyfile(test_plain="def test_nothing_about_mnn():\n    assert True\n")
    ini = pytester.makeini("[pytest]\nmnn_require_backends = CPU,METAL\n")
    result = pytester.runpytest()
    result.assert_outcomes(passed=1)
    assert result.ret == 1
    result.stdout.fnmatch_lines([f"required backend missing: METAL is required (mnn_require_backends in "
                                 f"{ini} CPU,METAL) but unavailable: *"])
    assert "required backend missing: CPU" not in result.stdout.str()
    # A backend that is there satisfies the demand: nothing changes.
    assert pytester.runpytest("--mnn-require-backends", "CPU").ret == 0


def test_a_users_test_on_a_required_missing_backend_fails_instead_of_skipping(pytester, models):
    models("demo/lama_like.mnn")
    pytester.makepyfile(test_user='''
        import pytest

        @pytest.mark.mnn_parity(model="lama_like.mnn", backends="CPU,METAL", precisions="high")
        def test_config(mnn_config):
            pass

        @pytest.mark.mnn_requires_backend("METAL")
        def test_needs_metal():
            pass
    ''')
    skipping = pytester.runpytest()
    skipping.assert_outcomes(passed=1, skipped=2)
    required = pytester.runpytest("--mnn-require-backends", "METAL", "-rf")
    required.assert_outcomes(passed=1, failed=2)
    required.stdout.fnmatch_lines(["FAILED test_user.py::test_config?METAL-high? - METAL is required *",
                                   "FAILED test_user.py::test_needs_metal - *METAL is required *"])


def test_the_test_suites_gpu_demand_fails_a_missing_backend_instead_of_skipping(monkeypatch):
    """MNN_PARITY_REQUIRE_GPU (set by the device run) turns tests/test_gpu.py's skips into failures."""
    monkeypatch.delenv(conftest.REQUIRE_GPU_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="METAL: not in this MNN build"):
        conftest.require_backend("METAL")
    monkeypatch.setenv(conftest.REQUIRE_GPU_ENV, "opencl,METAL")
    with pytest.raises(pytest.fail.Exception, match=r"METAL is required \(MNN_PARITY_REQUIRE_GPU=OPENCL,METAL\) but "
                                                    r"unavailable: METAL: not in this MNN build"):
        conftest.require_backend("METAL")
    conftest.require_backend("CPU")  # there: nothing happens


# -- 6. input set B -------------------------------------------------------------------------------------------------

def test_a_fixture_broken_on_input_set_b_alone_fails_with_set_bs_numbers(pytester, models):
    """threshold/dark_gate.fp16.mnn is bit-identical to its fp32 build on set A (seed 0) and dimmed on set B
    (seed 1): the item fails, and the message and the JSON show set B's numbers, not set A's zeros."""
    models("threshold/dark_gate.fp16.mnn", "threshold/dark_gate.mnn")
    result = pytester.runpytest("--mnn-only", "--mnn-model", "dark_gate.fp16.mnn", "--mnn-reference",
                                "dark_gate.mnn", "--mnn-backends", "CPU", "--mnn-precisions", "high",
                                "--mnn-isolate", "never", "--mnn-report", "r.json")
    result.assert_outcomes(failed=1)
    rec = results_by_nodeid(read_report(pytester.path / "r.json"))["dark_gate.fp16.mnn::parity[CPU-high]"]
    out = rec["outputs"]["out"]
    assert (rec["outcome"], rec["category"], out["failing_set"]) == ("failed", "mismatch", "B")
    assert out["max_abs"] == 0 and out["set_b"]["max_abs"] > 0.1  # set A exact, set B broken
    assert out["set_b"]["outside_fraction"] > 0.5
    shown_b = f"max abs {out['set_b']['max_abs']:.4g}"
    assert rec["message"].startswith("mismatch on CPU-high: output 'out': input set B: ")
    assert shown_b in rec["message"] and "(set A passes)" in rec["message"]
    result.stdout.fnmatch_lines([f"*input set B: *{shown_b}*(set A passes)"])
    # Run on set B's seed as set A, the same failure is set A's.
    again = pytester.runpytest("--mnn-only", "--mnn-model", "dark_gate.fp16.mnn", "--mnn-reference",
                               "dark_gate.mnn", "--mnn-backends", "CPU", "--mnn-precisions", "high", "--mnn-seed", "1",
                               "--mnn-isolate", "never", "--mnn-layers", "off", "--mnn-report", "r.json")
    again.assert_outcomes(failed=1)
    out_a = results_by_nodeid(read_report(pytester.path / "r.json"))["dark_gate.fp16.mnn::parity[CPU-high]"]
    assert out_a["outputs"]["out"]["failing_set"] == "A"
    assert out_a["outputs"]["out"]["max_abs"] == pytest.approx(out["set_b"]["max_abs"])


# -- 8. a release that cannot be installed -------------------------------------------------------------------------

FETCH = "mnn 3.4.0: not in the environment cache /c, and pip could not fetch it (No matching distribution found)"


@pytest.mark.parametrize(("reachable", "listed", "action", "words"), [
    (False, None, "skip", "package registry unreachable: "),
    # pip's "No matching distribution found" with the registry answering: no wheel for this Python.
    (True, ["3.6.1", "3.5.0"], "skip", "mnn 3.4.0 has no wheel for Python "),
    # Reachable and listed, yet not installed: a real failure, never a skip.
    (True, ["3.6.1", "3.4.0"], "fail", "the package registry is reachable and lists mnn 3.4.0 for Python "),
])
def test_a_release_that_cannot_be_installed_skips_only_offline_or_without_a_wheel_for_this_python(
        reachable, listed, action, words):
    got, message = conftest.release_env_problem("3.4.0", FETCH, reachable=reachable, listed=listed)
    assert (got, message.startswith(words), message.endswith(FETCH)) == (action, True, True), message


def test_an_install_that_failed_for_another_reason_fails():
    reason = "mnn 3.4.0 installed but cannot be used on Linux x86_64: import MNN failed (ImportError)"
    assert conftest.release_env_problem("3.4.0", reason, reachable=True, listed=None)[0] == "fail"
