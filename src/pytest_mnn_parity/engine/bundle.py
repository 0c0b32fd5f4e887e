"""Output bundles: what one machine and MNN version computed, saved to compare elsewhere.

A bundle is a directory (layout in docs/bundles.md)::

    BUNDLE/mnn-bundle.json          marker + merged index (written by the pytest controller)
    BUNDLE/entries/ID.json          one manifest fragment per saved entry
    BUNDLE/entries/ID.npz           its outputs: ``A/<output>`` and ``B/<output>`` (input sets A and B)
    BUNDLE/entries/ID.layers.npz    optional: every op's tensors for input set A

An entry is one model x configuration (plus one ``reference`` entry per model:
the outputs that run compared against).  Readers scan ``entries/*.json``, so a
bundle written by several pytest-xdist workers, or by a run that was cut short,
reads the same; every file is written to a temporary name and renamed.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import zlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..core.files import atomic_write, json_safe
from ..mnn.model import ModelError

BUNDLE_FILE = "mnn-bundle.json"
SCHEMA = "pytest-mnn-parity-bundle/1"
ENTRIES = "entries"
REFERENCE = "reference"
SAME = "same"


class BundleError(ValueError):
    """A bundle (or a ``--mnn-reference DIR::SELECTOR``) that cannot be used as given."""


class BundleMismatch(ModelError):
    """The bundle holds nothing comparable for a model: other model bytes, other inputs, no such entry."""


def machine_info() -> dict[str, str]:
    return {"system": platform.system(), "release": platform.release(), "machine": platform.machine(),
            "python": platform.python_version()}


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def is_bundle(folder: os.PathLike | str) -> bool:
    return (Path(folder) / BUNDLE_FILE).is_file()


def entry_id(model_label: str, variant: str | None, config_id: str) -> str:
    """A file-system-safe, stable id; the checksum keeps ids of similar labels apart."""
    raw = f"{model_label}|{variant or ''}|{config_id}"
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", model_label.replace("../", "up_").replace("/", "__"))
    tail = f"@{variant}" if variant else ""
    # A leading dot would hide the file (and readers skip dot-files as another writer's temporaries).
    readable = readable[-80:].lstrip(".") or "model"
    return f"{readable}{tail}--{config_id}--{zlib.crc32(raw.encode()):08x}"


def array_sha256(array: np.ndarray) -> str:
    import hashlib

    a = np.ascontiguousarray(array)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


# -- writing -------------------------------------------------------------------------

def write_json(target: Path, data: dict[str, Any]) -> None:
    """Indented, with short lists (shapes, layer records) on one line: reviewable in a diff."""
    text = json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n"
    # JSON escapes newlines inside strings, so "[" + newline only ever opens a list.
    text = re.sub(r"\[\s*\n\s*([^\[\]{}]*?)\s*\n\s*\]",
                  lambda m: "[" + re.sub(r",\s*\n\s*", ", ", m.group(1)) + "]", text)
    atomic_write(target, text)


def save_npz(target: Path, arrays: Mapping[str, np.ndarray]) -> None:
    atomic_write(target, b"", lambda f: np.savez_compressed(f, **{k: np.asarray(v) for k, v in arrays.items()}))


def save_trace(target: Path, trace) -> dict[str, Any]:
    """Copy a ``trace.ReferenceTrace`` (tensors on disk) into one npz, one tensor in memory at a time."""
    import zipfile

    tensors = []

    def write(f):
        members: dict[Path, str] = {}  # the trace stores a tensor read by several ops once: so does the bundle
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
            for (key, kind, index), path in trace.files.items():
                if path not in members:
                    members[path] = f"t{len(members)}"
                    with zf.open(members[path] + ".npy", "w", force_zip64=True) as out:
                        np.lib.format.write_array(out, np.load(path), allow_pickle=False)
                tensors.append([key, kind, index, members[path]])

    atomic_write(target, b"", write)
    return {"file": target.name, "order": [list(o) for o in trace.order], "tensors": tensors}


class BundleWriter:
    """Writes entries into a bundle directory; safe with several writer processes at once."""

    def __init__(self, folder: os.PathLike | str):
        self.folder = Path(folder)

    def start(self) -> None:
        """Create the bundle, or reuse one (same-id entries are replaced, others kept)."""
        f = self.folder
        if f.exists() and not f.is_dir():
            raise BundleError(f"--mnn-save-outputs {f}: is a file; name a directory (it is created if missing)")
        if f.is_dir() and any(f.iterdir()) and not is_bundle(f):
            raise BundleError(f"--mnn-save-outputs {f}: the directory is not empty and is not an output bundle "
                              f"(no {BUNDLE_FILE}); name a new or empty directory")
        (f / ENTRIES).mkdir(parents=True, exist_ok=True)
        if not is_bundle(f):
            write_json(f / BUNDLE_FILE, {"schema": SCHEMA, "created": now(), "entries": []})

    def save_entry(self, manifest: dict[str, Any], outputs_a: Mapping[str, np.ndarray],
                   outputs_b: Mapping[str, np.ndarray], trace=None) -> Path:
        """Outputs first, manifest last: a manifest fragment on disk means its data is complete."""
        eid = manifest["id"]
        entries = self.folder / ENTRIES
        arrays = {f"A/{k}": v for k, v in outputs_a.items()} | {f"B/{k}": v for k, v in outputs_b.items()}
        save_npz(entries / f"{eid}.npz", arrays)
        manifest = dict(manifest, outputs_file=f"{eid}.npz",
                        outputs={name: {"shape": list(np.shape(a)), "dtype": str(np.asarray(a).dtype),
                                        "sha256_A": array_sha256(a)} for name, a in outputs_a.items()})
        manifest["layers"] = save_trace(entries / f"{eid}.layers.npz", trace) if trace is not None else None
        path = entries / f"{eid}.json"
        write_json(path, manifest)
        return path

    def finish(self) -> dict[str, Any]:
        """Merge every fragment into the index of ``mnn-bundle.json`` (the controller does this once)."""
        entries = read_entries(self.folder)
        old = _read_json(self.folder / BUNDLE_FILE) if is_bundle(self.folder) else {}
        index = {"schema": SCHEMA, "created": old.get("created", now()), "updated": now(),
                 "mnn_versions": sorted({e.get("mnn_version", "?") for e in entries}),
                 "entries": [{k: e.get(k) for k in ("id", "kind", "model", "model_sha256", "variant", "config",
                                                    "backend_used", "category", "mnn_version", "machine")}
                             for e in entries]}
        write_json(self.folder / BUNDLE_FILE, index)
        return index


# -- reading -------------------------------------------------------------------------

def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: unreadable ({exc})") from None


def read_entries(folder: os.PathLike | str) -> list[dict[str, Any]]:
    entries = []
    for path in sorted((Path(folder) / ENTRIES).glob("*.json")):
        if path.name.startswith("."):
            continue  # a temporary file another writer is still renaming
        data = _read_json(path)
        if data.get("schema") != SCHEMA:
            raise BundleError(f"{path}: schema {data.get('schema')!r}, expected {SCHEMA!r} (written by another "
                              f"version of pytest-mnn-parity?)")
        entries.append(data)
    return entries


def load_outputs(folder: os.PathLike | str, entry: dict[str, Any]) -> tuple[dict, dict]:
    """Input set A's and B's outputs of an entry, in the manifest's output order."""
    path = Path(folder) / ENTRIES / entry["outputs_file"]
    try:
        with np.load(path, allow_pickle=False) as data:
            a = {name: data[f"A/{name}"] for name in entry["outputs"]}
            b = {name: data[f"B/{name}"] for name in entry["outputs"] if f"B/{name}" in data.files}
    except (OSError, KeyError, ValueError) as exc:
        raise BundleError(f"{path}: cannot read the outputs of entry {entry['id']} ({exc})") from None
    for name, array in a.items():
        if array_sha256(array) != entry["outputs"][name]["sha256_A"]:
            raise BundleError(f"{path}: output {name!r} does not match the sha256 in its manifest: the file was "
                              f"changed or damaged after saving")
    return a, b


class BundleTrace:
    """A saved per-op trace, with the interface of ``trace.ReferenceTrace`` (order, keys, load, close)."""

    def __init__(self, folder: os.PathLike | str, layers: dict[str, Any]):
        self.path = Path(folder) / ENTRIES / layers["file"]
        self.order = [tuple(o) for o in layers["order"]]
        # As ``ReferenceTrace.files``: (op key, "in"/"out", index) -> where the tensor is (shared when equal).
        self.files = {(key, kind, int(index)): member for key, kind, index, member in layers["tensors"]}
        self._npz = None

    def keys(self) -> set[str]:
        return {f"{name}#{occurrence}" for name, _, occurrence in self.order}

    def load(self, key: str, kind: str, index: int) -> np.ndarray | None:
        member = self.files.get((key, kind, index))
        if member is None:
            return None
        if self._npz is None:
            self._npz = np.load(self.path, allow_pickle=False)
        return self._npz[member]

    def close(self) -> None:
        if self._npz is not None:
            self._npz.close()
            self._npz = None


def describe_entry(entry: dict[str, Any]) -> str:
    """``entry CPU-low: m.mnn on CPU low, 4 threads (ran on CPU, fp32), MNN 3.4.0 on Linux x86_64``."""
    m = entry.get("machine") or {}
    arith = (entry.get("arithmetic") or {}).get("kind")
    name = REFERENCE if entry["kind"] == REFERENCE else entry["config"]["id"]
    return (f"entry {name}: {entry.get('description') or entry['model']} (ran on {entry.get('backend_used') or '?'}"
            f"{', ' + arith if arith else ''}), MNN {entry.get('mnn_version', '?')} on {m.get('system', '?')} "
            f"{m.get('machine', '?')}")
