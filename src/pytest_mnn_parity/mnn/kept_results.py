"""What discovery and the arithmetic probes found, kept between runs.

A GPU's discovery and arithmetic probes take seconds every run (1.65 s + 3.58 s on the lent H100); what they find
changes only with the MNN build, the driver and the devices, or MNN_PARITY_DISABLE_BACKENDS.  The plugin keeps
it in pytest's cache under ``discovery_key()`` (plugin/run.py); everything here works without pytest.
"""
from __future__ import annotations

import os
from pathlib import Path

from .arithmetic import Arithmetic, known_arithmetic, remember_arithmetic
from .backends import BackendStatus, known_statuses, remember_status

DISCOVERY_FORMAT = 2  # 2: the arithmetic carries the kernel probes' errors and reduced kernels
# Environment variables that choose which devices a GPU runtime shows (and so what a probe finds).
_DEVICE_ENV = ("MNN_PARITY_DISABLE_BACKENDS", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES",
               "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "VK_ICD_FILENAMES", "VK_DRIVER_FILES",
               "OCL_ICD_VENDORS", "OCL_ICD_FILENAMES")
_DRIVER_FILES = ("/proc/driver/nvidia/version", "/sys/module/nvidia/version", "/sys/module/amdgpu/version")
_DRIVER_DIRS = ("/etc/OpenCL/vendors", "/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d", "/proc/driver/nvidia/gpus")


def discovery_key() -> dict[str, str]:
    """What can change what discovery and the arithmetic probes find, read without importing MNN (the point of
    keeping the results is not to pay for that either): the MNN build, the driver and devices, the environment
    variables that pick devices or disable backends.  Equal keys: the cached results stand; any change re-probes."""
    import hashlib
    import importlib.util
    import platform

    from ..core.version import __version__

    key = {"format": str(DISCOVERY_FORMAT), "plugin": __version__, "machine": platform.node()}
    try:
        spec = importlib.util.find_spec("_mnncengine")
    except (ImportError, ValueError):
        spec = None
    origin = getattr(spec, "origin", None)
    if origin:
        # The build: the extension's size, time and first 64 KiB (ELF headers and the build id): a rebuilt or
        # reinstalled MNN changes them; hashing all 24 MB would cost more than the probes do on a CPU machine.
        try:
            stat = os.stat(origin)
            with open(origin, "rb") as f:
                head = hashlib.sha256(f.read(1 << 16)).hexdigest()[:16]
            key["mnn"] = f"{origin}:{stat.st_size}:{stat.st_mtime_ns}:{head}"
        except OSError as exc:
            key["mnn"] = f"{origin}: {exc.strerror}"
    else:
        key["mnn"] = "not installed"
    for name in _DEVICE_ENV:
        if os.environ.get(name):
            key[f"env {name}"] = os.environ[name]
    for path in _DRIVER_FILES:
        try:
            key[path] = Path(path).read_text(errors="replace").strip()[:400]
        except OSError:
            pass
    for folder in _DRIVER_DIRS:
        try:
            key[folder] = ",".join(sorted(os.listdir(folder)))
        except OSError:
            pass
    drm = []
    for card in sorted(Path("/sys/class/drm").glob("card[0-9]*/device")):
        try:
            drm.append(f"{(card / 'vendor').read_text().strip()}:{(card / 'device').read_text().strip()}")
        except OSError:
            pass
    if drm:
        key["drm devices"] = ",".join(drm)
    return key


def known_results() -> dict:
    """This process's discovery and arithmetic results in JSON form (``remember_results`` reads it back).  A probe
    that crashed or hung a worker (``fault``) is left out: it is tried again next run, not believed forever."""
    return {"statuses": [status.as_dict() for status in known_statuses() if status.fault is None],
            "arithmetic": [[backend, precision, {"kind": a.kind, "errors": a.errors, "note": a.note,
                                                  "kernels": a.kernels}]
                           for (backend, precision), a in known_arithmetic().items()]}


def remember_results(data: dict) -> int:
    """Take in results kept by an earlier run (``known_results``) as if probed here; returns how many.  Whatever
    this process already found stands."""
    count = 0
    for status in data.get("statuses", []):
        remember_status(BackendStatus(**status), keep_known=True)
        count += 1
    for backend, precision, arithmetic in data.get("arithmetic", []):
        remember_arithmetic(backend, precision, Arithmetic(**arithmetic))
        count += 1
    return count
