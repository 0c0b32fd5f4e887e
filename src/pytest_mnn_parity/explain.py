"""Failure messages: what failed, by how much, where, and how to reproduce it.

A reviewer reading only this text in a CI log should not need to rerun
anything to know what went wrong.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .apis import api_lines, cross_api_lines
from .stream import stream_lines
from .verdict import OutputVerdict

if TYPE_CHECKING:  # pragma: no cover
    from .parity import ParityResult
    from .runner import LoadedModel

_COLUMNS = ("output", "category", "max_abs", "max_rel", "cosine", "snr_db", "outside", "zeros t/ref", "worst element")


def failure_message(result: "ParityResult", model: "LoadedModel", *, error: str = "", reproduce: str = "") -> str:
    config = result.config
    lines = [_headline(result, error)]
    lines.append(f"model:     {model.path} (sha256 {model.info.sha256[:12]})")
    if result.conversion:
        lines.append(f"converted: {result.conversion}")
    used = result.backend_used or "?"
    where = f"{used} (forward type {result.forward_type})"
    if result.api == "module" and result.forward_type is None:
        where = "a backend the Module API cannot report (see backend:)"
    lines.append(f"ran on:    {where}, precision {config.precision}, {config.threads} thread(s); "
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
        from .limits import describe_nonfinite

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
    from .trace import layer_table

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
    blame = "its inputs were within tolerance" if first.inputs_ok else "its inputs had already diverged"
    health = f" [{', '.join(first.health)}]" if first.health else ""
    lines.append(f"first divergent layer: {first.name} ({first.type}, #{first.index}){health}; {blame}")
    flip = trace.first_health_flip
    if flip is not None and flip is not first:
        lines.append(f"first health flip: {flip.name} ({flip.type}, #{flip.index}) became {', '.join(flip.health)}")
    lines.extend("  " + row for row in layer_table(trace))
    return lines


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
        return head
    first = bad[0]
    more = f" (and {len(bad) - 1} more output(s))" if len(bad) > 1 else ""
    return f"{head}: output {first.name!r}: {first.detail}{more}"


def output_table(verdicts: list[OutputVerdict]) -> list[str]:
    rows = [_COLUMNS]
    for v in verdicts:
        m = v.metrics
        if m is None:
            rows.append((v.name, v.category.value, "-", "-", "-", "-", "-", "-", v.detail))
            continue
        worst = "[" + ",".join(map(str, m.worst_index)) + f"]: {m.worst_target:.6g} vs ref {m.worst_reference:.6g}"
        rows.append((v.name, v.category.value, f"{m.max_abs:.4g}", f"{m.max_rel:.3g}", f"{m.cosine:.6f}",
                     f"{m.snr_db:.1f}", f"{m.outside_fraction:.2%}", f"{m.zero_fraction:.0%}/{m.ref_zero_fraction:.0%}",
                     worst))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(_COLUMNS) - 1)]
    return ["  ".join(str(c).ljust(w) for c, w in zip(r[:-1], widths)) + "  " + str(r[-1]) for r in rows]
