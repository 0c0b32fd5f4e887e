"""Per-model sidecars: ``<model file name>.toml`` beside the model, or a pyproject table.

A sidecar (``lama.mnn.toml`` for ``lama.mnn``, or ``[tool.mnn-parity.models."lama.mnn"]``
in the rootdir's ``pyproject.toml``) declares, for one model:

* ``[shapes]``: concrete shapes for dynamic input dimensions;
* ``[input_sets.NAME]``: named input sets (see ``input_sets``);
* ``[tolerance]``, ``[tolerance.outputs.NAME]``, ``[tolerance.layers.NAME]``:
  tolerance overrides for the whole model, one output, one traced layer;
* ``[[xfail]]``: configurations expected to fail, with the reason;
* ``[stream]``: a streaming model's state (``state = {h_out = "h"}``, ``steps``),
  as ``--mnn-stream`` declares it (see ``stream``);
* ``test_data``: ONNX test-data folders (``test_data_set_N/input_*.pb``,
  ``output_*.pb``), each an input set whose stored outputs are its reference
  (see ``test_data``).  Without the key, the ``test_data_set_N`` folders beside
  the model are read, also when the model has no sidecar.

Paths are relative to the file that declares them.  Everything that needs no
model is checked when the file is read; errors name the file, the key and the fix.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..core.tolerances import OVERRIDABLE, resolve
from ..mnn.backends import canonical_backend, canonical_precision, did_you_mean
from . import test_data as onnx_test_data
from .generate import parse_input_shape
from .sets import InputSet, SidecarError, Where, parse_source
from .stream_spec import StreamSpec

TOP_KEYS = ("shapes", "input_sets", "tolerance", "xfail", "stream", "test_data")
PYPROJECT_TABLE = "tool.mnn-parity.models"
_SET_NAME = re.compile(r"^[A-Za-z0-9_.+]+(?:-[A-Za-z0-9_.+]+)*$")


@dataclass(frozen=True)
class XFail:
    """Configurations (backend x precision x input set) expected to fail; empty means any."""

    reason: str
    backends: tuple[str, ...] = ()
    precisions: tuple[str, ...] = ()
    input_sets: tuple[str, ...] = ()

    def matches(self, backend: str, precision: str, input_set: str | None) -> bool:
        return ((not self.backends or backend in self.backends)
                and (not self.precisions or precision in self.precisions)
                and (not self.input_sets or input_set in self.input_sets))


@dataclass
class Sidecar:
    file: Path
    table: str  # "" for a sidecar file; 'tool.mnn-parity.models."lama.mnn"' in a pyproject
    label: str  # the file as shown in messages and tolerance sources
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    input_sets: list[InputSet] = field(default_factory=list)
    tolerance: dict[str, float] = field(default_factory=dict)
    output_tolerances: dict[str, dict[str, float]] = field(default_factory=dict)
    layer_tolerances: dict[str, dict[str, float]] = field(default_factory=dict)
    xfails: list[XFail] = field(default_factory=list)
    stream: StreamSpec | None = None

    @property
    def source(self) -> str:
        return f"sidecar {self.label}"

    @property
    def base(self) -> Path:
        return self.file.parent

    def where(self, table: str = "", key: str = "") -> Where:
        return Where(self.file, ".".join(p for p in (self.table, table) if p), key)

    def input_set(self, name: str) -> InputSet | None:
        return next((s for s in self.input_sets if s.name == name), None)

    def xfail_for(self, backend: str, precision: str, input_set: str | None) -> XFail | None:
        return next((x for x in self.xfails if x.matches(backend, precision, input_set)), None)

    def tolerance_layer(self) -> tuple[str, Mapping[str, float]]:
        return self.source, self.tolerance

    def output_layer(self, output: str) -> tuple[str, Mapping[str, float]] | None:
        given = self.output_tolerances.get(output)
        return (f"{self.source} outputs.{output}", given) if given else None

    def layer_layer(self, layer: str) -> tuple[str, Mapping[str, float]] | None:
        given = self.layer_tolerances.get(layer)
        return (f"{self.source} layers.{layer}", given) if given else None

    def check_model(self, model, label: str | None = None, layer_names: Sequence[str] | None = None) -> None:
        """What needs the loaded model: every name the sidecar gives ([shapes], [tolerance.outputs],
        [tolerance.layers] when ``layer_names`` is known) is one of the model's, or one error lists them all.

        ``label`` is how the model is named (the user's ``.onnx`` rather than its hash-named conversion)."""
        name = label or model.path.name
        inputs = [s.name for s in model.info.inputs]
        outputs = list(model.info.output_names)
        problems: list[tuple[str, str, str]] = []  # (key as written, kind of name, what is wrong)
        for table, given, kind, known in (("shapes", self.shapes, "input", inputs),
                                          ("tolerance.outputs", self.output_tolerances, "output", outputs),
                                          ("tolerance.layers", self.layer_tolerances, "layer", layer_names)):
            if known is None:
                continue  # the model's layers could not be read: nothing to check them against
            for key in given:
                if key not in known:
                    where = f"[{table}] {key}" if table == "shapes" else f"[{table}.{_quote(key)}]"
                    problems.append((where, kind, f"no {kind} {key!r}{did_you_mean(key, known)}"))
        if not problems:
            return
        has = {"input": ", ".join(inputs), "output": ", ".join(outputs),
               "layer": f"{_some(layer_names or ())}; the names of the layer table, see docs/layers.md"}
        if len(problems) == 1:
            where, kind, wrong = problems[0]
            reason = f"{where}: the model {name} has {wrong} (its {kind}s: {has[kind]})"
        else:
            reason = (f"{len(problems)} names that the model {name} does not have:\n    "
                      + "\n    ".join(f"{where}: {wrong}" for where, _, wrong in problems) + "\n  "
                      + "; ".join(f"its {kind}s: {has[kind]}" for kind in dict.fromkeys(k for _, k, _ in problems)))
        if self.table:  # a pyproject table: the keys are inside it
            reason = f"[{self.table}] {reason}"
        fixes = {"input": "rename the key to one of the model's inputs", "output": "name one of the model's outputs",
                 "layer": "name one of the model's layers (a tolerance for a layer no op has would apply to nothing)"}
        raise SidecarError(self.file, reason, "; ".join(fixes[k] for k in dict.fromkeys(k for _, k, _ in problems)))


def _some(names: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def find_sidecar(model_path: Path, rootpath: Path) -> Sidecar | None:
    """The sidecar of ``model_path``: ``<name>.toml`` beside it or a table in ``rootpath/pyproject.toml``."""
    model_path = Path(model_path)
    beside = model_path.with_name(model_path.name + ".toml")
    found: list[tuple[Path, str, dict]] = []
    if beside.is_file():
        found.append((beside, "", _read_toml(beside)))
    pyproject = Path(rootpath) / "pyproject.toml"
    if pyproject.is_file():
        models = _read_toml(pyproject).get("tool", {}).get("mnn-parity", {}).get("models", {})
        if not isinstance(models, dict):
            raise SidecarError(pyproject, f"[{PYPROJECT_TABLE}] must be a table of model names",
                               f'write [{PYPROJECT_TABLE}."model.mnn".input_sets.NAME] tables')
        for key, table in models.items():
            if key == model_path.name or _same_file(pyproject.parent / key, model_path):
                found.append((pyproject, f'{PYPROJECT_TABLE}.{_quote(key)}', table))
    if not found:
        if not onnx_test_data.beside(model_path):
            return None
        # Test-data sets beside the model and no sidecar: the sets alone, as if a sidecar declared them.
        return parse_sidecar(model_path, "", {}, _label(model_path, rootpath), model_path)
    if len(found) > 1:
        places = [f"{f.name} [{t}]" if t else str(f) for f, t, _ in found]
        raise SidecarError(found[0][0], f"{model_path.name} is configured in {len(found)} places: {', '.join(places)}",
                           "keep one of them")
    file, table, data = found[0]
    return parse_sidecar(file, table, data, _label(file, rootpath), model_path)


def parse_sidecar(file: Path, table: str, data: Any, label: str, model_path: Path | None = None) -> Sidecar:
    """``model_path``: the model the sidecar is for, whose ONNX test-data sets (declared by ``test_data``, or
    beside it) join the input sets."""
    sidecar = Sidecar(Path(file), table, label)
    if not isinstance(data, dict):
        raise sidecar.where().error(f"expected a table, got {type(data).__name__}",
                                    "see docs/inputs.md for the sidecar's tables")
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise sidecar.where(key=unknown[0]).error(f"unknown key {unknown[0]!r}",
                                                  f"known keys: {', '.join(TOP_KEYS)} (see docs/inputs.md)")
    sidecar.shapes = _shapes(sidecar, _table(sidecar, data, "shapes"))
    for name, value in _table(sidecar, data, "input_sets").items():
        sidecar.input_sets.append(_input_set(sidecar, name, value))
    if model_path is not None or "test_data" in data:
        sidecar.input_sets += _test_data(sidecar, data.get("test_data"), model_path)
    _tolerances(sidecar, _table(sidecar, data, "tolerance"))
    xfails = data.get("xfail", [])
    if not isinstance(xfails, list) or not all(isinstance(x, dict) for x in xfails):
        raise sidecar.where(key="xfail").error("expected [[xfail]] tables",
                                               '[[xfail]] with precision = "low" and reason = "..."')
    sidecar.xfails = [_xfail(sidecar, i, x) for i, x in enumerate(xfails)]
    if "stream" in data:
        sidecar.stream = _stream(sidecar, _table(sidecar, data, "stream"))
    return sidecar


def _test_data(sidecar: Sidecar, value: Any, model_path: Path | None) -> list[InputSet]:
    """The ONNX test-data sets: the folders ``test_data`` names (each a ``test_data_set_N`` folder or a
    folder holding some), or, without the key, the ``test_data_set_N`` folders beside the model."""
    if value is None:
        folders = onnx_test_data.beside(model_path) if model_path is not None else []
    else:
        where = sidecar.where(key="test_data")
        given = [value] if isinstance(value, str) else value
        if not isinstance(given, list) or not given or not all(isinstance(v, str) and v for v in given):
            raise where.error(f"expected a folder or a list of folders, got {value!r}",
                              'write test_data = "test_data_set_0" or test_data = ["sets/a", "sets/b"]')
        folders = []
        for text in given:
            folder = Path(text) if Path(text).is_absolute() else sidecar.base / text
            found = onnx_test_data.set_folders(folder)
            if not found:
                what = "no such folder" if not folder.is_dir() else "no test_data_set_N folder (with input_*.pb) in it"
                raise where.error(f"{text}: {what} ({folder})",
                                  "name a test_data_set_N folder holding input_*.pb (and output_*.pb), or the folder "
                                  "that holds them; paths are relative to the sidecar")
            folders += found
    sets = onnx_test_data.read_sets(folders, model_path, sidecar.label) if model_path is not None else [
        onnx_test_data.read_set(f, None, sidecar.label) for f in folders]
    declared = {s.name for s in sidecar.input_sets}
    for input_set in sets:
        if input_set.name in declared:
            raise sidecar.where(key="test_data").error(
                f"two input sets are called {input_set.name!r} (a test-data folder is named after itself)",
                "rename one of the folders or the [input_sets] table")
        declared.add(input_set.name)
    return sets


def _stream(sidecar: Sidecar, table: dict) -> StreamSpec:
    if "model" in table:
        raise sidecar.where("stream", "model").error("a sidecar's [stream] is for its own model",
                                                     "drop the model key")
    try:
        spec = StreamSpec.from_mapping(table)
    except ValueError as exc:
        raise sidecar.where("stream").error(str(exc), 'write [stream] with state = { h_out = "h" } and steps = 8'
                                            ) from None
    return replace(spec, origin=f"{sidecar.source} [stream]")


# -- sections -------------------------------------------------------------------------


def _table(sidecar: Sidecar, data: Mapping[str, Any], key: str) -> dict:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise sidecar.where(key=key).error(f"expected a table, got {value!r}", f"write it as [{key}]")
    return value


def _shapes(sidecar: Sidecar, table: dict) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for name, value in table.items():
        text = "x".join(str(v) for v in value) if isinstance(value, list) else value
        try:
            if not isinstance(text, str) or isinstance(value, list) and not all(
                    isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise ValueError
            shapes[name] = parse_input_shape(f"{name}={text}")[1]
        except ValueError:
            raise sidecar.where("shapes", name).error(
                f"expected a shape of positive integers, got {value!r}",
                f'write {name} = [1, 3, 512, 512] or {name} = "1x3x512x512"') from None
    return shapes


def _input_set(sidecar: Sidecar, name: str, value: Any) -> InputSet:
    where = sidecar.where(f"input_sets.{_quote(name)}")
    if not _SET_NAME.match(name):
        raise where.error(f"input set name {name!r} cannot be part of a test id",
                          "use letters, digits, '_', '.', '+' and single '-' between them")
    if not isinstance(value, dict):
        raise where.error(f"expected a table of input sources, got {value!r}",
                          f'[input_sets.{name}] with a line per input, e.g. image = {{ image = "photo.png" }}')
    seed = value.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise where.at("seed").error(f"expected an integer, got {seed!r}", "write seed = 3 (no quotes)")
    sources, error = {}, None
    for key, spec in value.items():
        if key == "seed":
            continue
        try:
            sources[key] = parse_source(spec, where.at(key), sidecar.base)
        except SidecarError as exc:
            # A broken input set fails only its own items; the model's other sets still run.
            error = error or exc
    return InputSet(name, sources, where, seed, error, origin=sidecar.label)


def _tolerances(sidecar: Sidecar, table: dict) -> None:
    model = {k: v for k, v in table.items() if k not in ("outputs", "layers")}
    sidecar.tolerance = _overrides(sidecar, "tolerance", model)
    for kind in ("outputs", "layers"):
        section = table.get(kind, {})
        if not isinstance(section, dict) or not all(isinstance(v, dict) for v in section.values()):
            raise sidecar.where("tolerance", kind).error(f"expected [tolerance.{kind}.NAME] tables",
                                                         f"[tolerance.{kind}.NAME] with atol = 0.01")
        parsed = {name: _overrides(sidecar, f"tolerance.{kind}.{_quote(name)}", v) for name, v in section.items()}
        setattr(sidecar, "output_tolerances" if kind == "outputs" else "layer_tolerances", parsed)


def _overrides(sidecar: Sidecar, table: str, values: dict) -> dict[str, float]:
    for key, value in values.items():
        where = sidecar.where(table, key)
        if key not in OVERRIDABLE:
            raise where.error(f"unknown tolerance field {key!r}", f"known fields: {', '.join(OVERRIDABLE)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise where.error(f"expected a number, got {value!r}", f"write {key} = 0.01 (no quotes)")
        try:
            resolve("CPU", "high", (key, {key: value}))
        except ValueError as exc:
            raise where.error(str(exc).split(": ", 1)[-1], "see docs/verdicts.md for the fields' ranges") from None
    return {k: float(v) for k, v in values.items()}


def _xfail(sidecar: Sidecar, index: int, table: dict) -> XFail:
    where = sidecar.where(f"xfail #{index + 1}")
    unknown = sorted(set(table) - {"backend", "precision", "input_set", "reason"})
    if unknown:
        raise where.at(unknown[0]).error(f"unknown key {unknown[0]!r}",
                                         "known keys: backend, precision, input_set, reason")
    reason = table.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        raise where.at("reason").error("every xfail needs a reason", 'add reason = "why it is expected to fail"')

    def names(key: str, canon) -> tuple[str, ...]:
        value = table.get(key, [])
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise where.at(key).error(f"expected a name or a list of names, got {value!r}",
                                      f'write {key} = "NAME" or {key} = ["A", "B"]')
        try:
            return tuple(canon(v) for v in values)
        except ValueError as exc:
            raise where.at(key).error(str(exc), f"use one of the names listed, in {key}") from None

    sets = names("input_set", str)
    declared = [s.name for s in sidecar.input_sets]
    for name in sets:
        if name not in declared:
            raise where.at("input_set").error(f"no input set {name!r} in this sidecar (declared: "
                                              f"{', '.join(declared) or 'none'})", "name a declared input set")
    return XFail(reason.strip(), names("backend", canonical_backend), names("precision", canonical_precision), sets)


# -- files ----------------------------------------------------------------------------


def _read_toml(path: Path) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise SidecarError(path, "reading TOML needs Python 3.11+ or the tomli package",
                               "pip install tomli (a dependency of pytest-mnn-parity on Python 3.10)") from None
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise SidecarError(path, f"not valid TOML: {exc}", "fix the syntax at that line") from None
    except OSError as exc:
        raise SidecarError(path, f"cannot read it ({exc.strerror})", "fix the file's permissions") from None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _label(file: Path, rootpath: Path) -> str:
    try:
        return Path(os.path.relpath(Path(file).resolve(), Path(rootpath).resolve())).as_posix()
    except ValueError:  # another drive on Windows
        return str(file)


def _quote(key: str) -> str:
    """A TOML key as written in a table header: bare when it can be, quoted otherwise."""
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else '"' + key.replace('"', '\\"') + '"'
