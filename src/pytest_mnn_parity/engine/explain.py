"""Failure messages: what failed, by how much, where, and how to reproduce it.

A reviewer reading only this text in a CI log should not need to rerun
anything to know what went wrong.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..core.verdict import OutputVerdict
from ..mnn.module_runner import API_MODULE

if TYPE_CHECKING:  # pragma: no cover
    from ..mnn.runner import LoadedModel
    from .results import ParityResult

_COLUMNS = ("output", "category", "max_abs", "max_rel", "cosine", "snr_db", "outside", "zeros t/ref", "worst element")


def failure_message(result: "ParityResult", model: "LoadedModel", *, error: str = "", reproduce: str = "") -> str:
    config = result.config
    lines = [_headline(result, error)]
    if result.conversion and result.variant:  # the user's .onnx first: the cache file is named on converted:
        lines.append(f"model:     {result.model} (its {result.variant} conversion, sha256 {model.info.sha256[:12]})")
    else:
        lines.append(f"model:     {model.path} (sha256 {model.info.sha256[:12]})")
    if result.conversion:
        lines.append(f"converted: {result.conversion}")
    used = result.backend_used or "?"
    where = f"{used} (forward type {result.forward_type})"
    if result.api == "module" and result.forward_type is None:
        where = "a backend the Module API cannot report" + (" (see backend:)" if result.backend_note else "")
    lines.append(f"ran on:    {where}, precision {config.precision}, {config.how()}; "
                 f"requested {config.backend}")
    lines.extend(api_lines(result))
    if result.arithmetic is not None:
        lines.append(f"arithmetic: {result.arithmetic.describe()}")
    lines.append(f"reference: {result.reference}")
    if result.tolerance is not None:
        lines.append(f"tolerance: {result.tolerance.describe()}")
    lines.append("inputs:    " + result.input_set + " - " +
                 ", ".join(f"{s.name} {'x'.join(map(str, model.shapes[s.name]))} {s.dtype}" for s in model.info.inputs))
    if getattr(result, "input_detail", ""):
        lines.append("input set: " + result.input_detail)
    if getattr(result, "inputs_nonfinite", None):
        from ..mnn.limits import describe_nonfinite

        lines.append("           not finite (allowed; NaN/Inf outputs may follow from it): "
                     + describe_nonfinite(result.inputs_nonfinite))
    if error:
        lines.append("error:     " + error)
    if result.stream:
        lines.append("")
        lines.extend(stream_lines(result))
    if result.verdict is not None and result.verdict.outputs:
        lines.append("")
        lines.extend(output_table(result.verdict.outputs))
    if result.cross_api:
        lines.append("")
        lines.extend(cross_api_lines(result))
    if result.trace is not None:
        lines.append("")
        lines.extend(trace_lines(result))
    if result.op_sweep is not None:
        lines.append("")
        lines.extend(sweep_lines(result))
    if result.repro:
        lines.append("")
        lines.append(f"repro:     {result.repro.get('dir') or result.repro.get('error')}")
    reduced = config.precision in ("low", "Low_BF16") or (result.tolerance is not None
                                                         and result.tolerance.tier != "fp32")
    if result.fp16_risks and reduced:
        lines.append("")
        lines.append("fp16 risk (from the fp32 reference's activations; low precision cannot hold these):")
        lines.extend(f"  {risk.describe()}" for risk in result.fp16_risks[:5])
        if len(result.fp16_risks) > 5:
            lines.append(f"  ... and {len(result.fp16_risks) - 5} more (see the JSON report)")
    if result.weight_risks:
        lines.append("")
        lines.append("fp16 weight risk (what --fp16 conversion of the reference model would lose):")
        lines.extend(f"  {risk.describe()}" for risk in result.weight_risks[:5])
    if result.artifacts:
        lines.append("")
        lines.append(f"pictures:  {result.artifacts.get('error') or result.artifacts['folder']}")
    if reproduce:
        lines.append("")
        lines.append(f"reproduce: {reproduce}")
    return "\n".join(lines)


def trace_lines(result: "ParityResult") -> list[str]:
    from ..trace.compare import layer_table

    trace = result.trace
    first = trace.first_divergent
    unmatched = len(trace.unmatched_target) + len(trace.unmatched_reference)
    lines = [f"layers:    {trace.compared} compared ({trace.method}); {unmatched} without a counterpart"]
    lines.extend(f"note:      {note}" for note in getattr(trace, "notes", ()))
    hidden = getattr(trace, "not_observable", None)
    if hidden:
        lines.append(f"not observable: {', '.join(sorted(hidden))} (MNN's loop op hands these over unwritten; "
                     "not judged, not blamed, not risk-scanned)")
    if first is None:
        why = "see the notes above" if getattr(trace, "notes", None) else "every traced layer is within tolerance"
        lines.append(f"first divergent layer: none - {why}")
        return lines
    blame = "its inputs were within tolerance" if first.inputs_ok else _diverged_inputs(first)
    health = f" [{', '.join(first.health)}]" if first.health else ""
    proven = trace.proven_layer
    if proven is not None:
        # The sweep's verdict replaces the guess: the op proven wrong alone comes first, the guess after it.
        sweep = result.op_sweep.culprit if result.op_sweep is not None else None
        alone = f" [{sweep.category} alone]" if sweep is not None else ""
        lines.append(f"broken op: {proven.name} ({proven.type}, #{proven.index}){alone}; wrong when run alone on "
                     "the reference's exact inputs (op sweep, below)")
        if proven is not first:
            guess = next((row for row in result.op_sweep.rows if row.op == first.name
                          and row.occurrence == first.occurrence), None) if result.op_sweep else None
            said = f": the op sweep finds it {guess.verdict} ({guess.reason})" if guess is not None else ""
            lines.append(f"first out of tolerance in the graph: {first.name} ({first.type}, #{first.index}){health}; "
                         f"{blame}{said}")
    else:
        lines.append(f"first divergent layer: {first.name} ({first.type}, #{first.index}){health}; {blame}")
    flip = trace.first_health_flip
    if flip is not None and flip is not first and flip is not proven:
        lines.append(f"first health flip: {flip.name} ({flip.type}, #{flip.index}) became {', '.join(flip.health)}")
    lines.extend("  " + row for row in layer_table(trace))
    return lines


def sweep_lines(result: "ParityResult") -> list[str]:
    """The op sweep's part of a failure message: its conclusion, then its table of the flagged ops."""
    from ..core.verdict import session_made
    from ..trace.sweep import NOT_CUT, table_lines

    swept = result.op_sweep
    lines = [f"op sweep:  {swept.conclusion()}"]
    if swept.note:
        return lines
    flagged = swept.flagged()
    # MNN's session-time layout copies have no op in the file: a row each only hides the ops that matter.
    rows = [row for row in flagged if not (row.verdict == NOT_CUT and session_made(row.reason))]
    made = len(flagged) - len(rows)
    if not flagged:
        return lines
    lines.append(f"           {len(swept.rows)} op(s) swept: {swept.method}")
    shown = rows[:12]
    if shown:
        lines.extend("  " + row for row in table_lines(shown))
    if len(rows) > len(shown):
        lines.append(f"  ... and {len(rows) - len(shown)} more flagged op(s) (see the JSON report)")
    if made:
        lines.append(f"  and {made} flagged tensor(s) MNN made at session time (layout copies, parts of decomposed "
                     "ops): not in the file, so not run alone (the JSON report lists them)")
    return lines


def _diverged_inputs(layer) -> str:
    """Which of the layer's inputs had diverged, with the judgement's own numbers (the one source the table's
    rows also come from), so the sentence can never disagree with what is shown."""
    parts = []
    for tensor in layer.inputs:
        if not tensor.failed:
            continue
        m = tensor.metrics
        numbers = (f"max_abs {m.max_abs:.4g}, cosine {m.cosine:.6f}" if m is not None else tensor.note or "failed")
        parts.append(f"input #{tensor.index} ({numbers})")
    return "its inputs had already diverged: " + "; ".join(parts) if parts else "its inputs had already diverged"


def _headline(result: "ParityResult", error: str) -> str:
    head = f"{result.category.value} on {result.config.id}"
    if result.api and result.api != "session":
        head += f" ({result.api} API)"
    if result.stream and result.stream.get("first_failing_step") is not None:
        head += f" at stream step {result.stream['first_failing_step']} (of 0..{result.stream['steps'] - 1})"
    if result.category.value == "api_mismatch" and result.cross_api:
        bad = [(n, o) for n, o in result.cross_api["outputs"].items() if o["category"] != "ok"]
        return f"{head}: output {bad[0][0]!r} vs the session API: {bad[0][1]['detail']}" if bad else head
    if error or result.verdict is None:
        return head + (": " + error.splitlines()[0] if error else "")
    bad = [v for v in result.verdict.outputs if not v.passed]
    if not bad:
        return head + (f": {result.verdict.detail}" if result.verdict.detail else "")
    first = bad[0]
    more = f" (and {len(bad) - 1} more output(s))" if len(bad) > 1 else ""
    return f"{head}: output {first.name!r}: {first.detail}{more}"


def output_table(verdicts: list[OutputVerdict]) -> list[str]:
    rows = [_COLUMNS]
    for v in verdicts:
        # An output that failed on input set B alone is shown with set B's numbers (set A's passed).
        on_b = v.failing_set == "B" and v.stale_metrics is not None
        m = v.stale_metrics if on_b else v.metrics
        name = f"{v.name} (set B)" if on_b else v.name
        if m is None:
            rows.append((name, v.category.value, "-", "-", "-", "-", "-", "-", v.detail))
            continue
        worst = "[" + ",".join(map(str, m.worst_index)) + f"]: {m.worst_target:.6g} vs ref {m.worst_reference:.6g}"
        rows.append((name, v.category.value, f"{m.max_abs:.4g}", f"{m.max_rel:.3g}", f"{m.cosine:.6f}",
                     f"{m.snr_db:.1f}", f"{m.outside_fraction:.2%}", f"{m.zero_fraction:.0%}/{m.ref_zero_fraction:.0%}",
                     worst))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(_COLUMNS) - 1)]
    return ["  ".join(str(c).ljust(w) for c, w in zip(r[:-1], widths)) + "  " + str(r[-1]) for r in rows]


def api_lines(result: "ParityResult") -> list[str]:
    """The API part of a failure message: which API ran, why, and what is known of its backend."""
    lines = []
    if result.api:
        label = "Module API (MNN.nn.load_module_from_file)" if result.api == API_MODULE else "session API"
        lines.append(f"api:       {label}; {result.api_reason}")
    if result.backend_note:
        lines.append(f"backend:   {result.backend_note}")
    if result.trace_note:
        lines.append(f"layers:    {result.trace_note}")
    return lines


def cross_api_lines(result: "ParityResult") -> list[str]:
    data = result.cross_api
    if not data:
        return []
    if not data["compared"]:
        return [f"vs session API: not compared: {data['reason']}"]
    lines = [f"vs session API: {data['category']} (Module API outputs against the {data['against']}, "
             "same input set, same tolerance)"]
    rows = [("output", "category", "max_abs", "cosine", "detail")]
    for name, o in data["outputs"].items():
        rows.append((name, o["category"], f"{o['max_abs']:.4g}" if "max_abs" in o else "-",
                     f"{o['cosine']:.6f}" if "cosine" in o else "-", o.get("detail", "")))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]) - 1)]
    lines.extend("  " + "  ".join(str(c).ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows)
    return lines


def stream_lines(result: "ParityResult") -> list[str]:
    """The stream part of a failure message: what was declared, where it broke, the steps around it."""
    data = result.stream
    if not data:
        return []
    pairs = ", ".join(f"{o}->{i}" for o, i in data["state"].items())
    lines = [f"stream:    {data['steps']} steps, state {pairs} (reference and target each feed back their own "
             "state; state starts at zeros; step k's other inputs use seed + k)"]
    first = data["first_failing_step"]
    if first is None:
        lines.append(f"first failing step: none of steps 0..{data['steps_run'] - 1}")
    else:
        what = f", output {data['first_failing_output']!r}" if data["first_failing_output"] else ""
        lines.append(f"first failing step: {first} (of steps 0..{data['steps'] - 1}){what}")
    # One row per step, its worst output; every output of every step is in the JSON report.
    rows = [("step", "category", "worst output", "max_abs", "of ref scale", "cosine")]
    last = first if first is not None else len(data["per_step"]) - 1
    for step in data["per_step"][max(0, last - 6):last + 2]:
        name, o = _worst(step["outputs"])
        rows.append((str(step["step"]), step["category"], name, _num(o["max_abs"], "{:.4g}"),
                     _num(o["scaled_max_abs"], "{:.3g}"), _num(o["cosine"], "{:.6f}")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines.extend("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
    return lines


def _worst(outputs: dict[str, dict]) -> tuple[str, dict]:
    """The failing output, else the one farthest from its reference relative to its own range."""
    failing = [(n, o) for n, o in outputs.items() if o["category"] != "ok"]
    if failing:
        return failing[0]
    return max(outputs.items(), key=lambda item: item[1]["scaled_max_abs"] or 0.0)


def _num(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)
