"""The field report of one run: JUnit XML for CI, Markdown for people, a PNG for both.

    <report>/<scenario>.xml     one testsuite, one testcase per check (failure / skipped)
    <report>/<scenario>.md      verdict, checks, figures, peers, timeline, daemon lives
    <report>/<scenario>.png     latency over time (capture -> receiver), backlog of unacked
                                events, fault windows shaded
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

from hil.checks import Analysis, Check
from hil.runner import RunData

WINDOW_COLORS = {"outage": "#f4a261", "power": "#e76f51", "disk": "#8ab17d", "stop": "#cccccc"}


def write_report(data: RunData, a: Analysis, out: Path, *, elapsed_s: float) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    name = data.scenario.name
    paths = {"junit": out / f"{name}.xml", "markdown": out / f"{name}.md", "json": out / f"{name}.json"}
    paths["junit"].write_bytes(junit(data, a, elapsed_s))
    png = out / f"{name}.png"
    if plot(data, a, png):
        paths["png"] = png
    paths["markdown"].write_text(markdown(data, a, png.name if "png" in paths else None, elapsed_s))
    doc = {"scenario": name, "target": data.target, "ok": a.ok and data.skipped is None, "skipped": data.skipped,
           "checks": [_check_dict(c) for c in a.checks],
           "figures": a.figures}  # fmt: skip
    paths["json"].write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return paths


def _check_dict(c: Check) -> dict[str, str]:
    return {"name": c.name, "status": c.status, "figure": c.figure, "expected": c.expected, "detail": c.detail}


def junit(data: RunData, a: Analysis, elapsed_s: float) -> bytes:
    name = data.scenario.name
    suites = ET.Element("testsuites")
    suite = ET.SubElement(suites, "testsuite", name=f"hil.{name}", timestamp="", time=f"{elapsed_s:.1f}")
    suite.set("hostname", data.target)
    cases = a.checks or []
    if data.skipped is not None:
        case = ET.SubElement(suite, "testcase", classname=f"hil.{name}", name="scenario", time="0")
        ET.SubElement(case, "skipped", message=data.skipped)
    for c in cases:
        case = ET.SubElement(suite, "testcase", classname=f"hil.{name}", name=c.name, time="0")
        text = f"measured: {c.figure}\nexpected: {c.expected}" + (f"\n{c.detail}" if c.detail else "")
        if c.status == "fail":
            ET.SubElement(case, "failure", message=f"{c.figure} (expected {c.expected})").text = text
        elif c.status == "skip":
            ET.SubElement(case, "skipped", message=c.detail or "not applicable")
        elif c.status == "known":
            ET.SubElement(case, "skipped", message=f"known issue: {c.detail}")
        ET.SubElement(case, "system-out").text = text
    total = len(cases) + (1 if data.skipped else 0)
    suite.set("tests", str(total))
    suite.set("failures", str(sum(c.status == "fail" for c in cases)))
    suite.set("skipped", str(sum(c.status in ("skip", "known") for c in cases) + (1 if data.skipped else 0)))
    suite.set("errors", "0")
    ET.indent(suites)
    return bytes(ET.tostring(suites, encoding="utf-8", xml_declaration=True))


def _t(data: RunData, ms: int) -> float:
    return (ms - data.t0_ms) / 1000


def plot(data: RunData, a: Analysis, path: Path) -> bool:
    """Latency over time and backlog, fault windows shaded; False without matplotlib or data."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    if not a.latency and not data.samples:
        return False
    fig, (ax1, ax2) = plt.subplots(2, 1, sharex=True, figsize=(10, 6.5))
    for ax in (ax1, ax2):
        for w in data.windows:
            ax.axvspan(_t(data, w.start_ms), _t(data, w.end_ms), color=WINDOW_COLORS[w.kind], alpha=0.35, lw=0)
    clean = [(_t(data, ts), lat) for ts, lat, ok in a.latency if ok]
    faulted = [(_t(data, ts), lat) for ts, lat, ok in a.latency if not ok]
    if clean:
        ax1.scatter(*zip(*clean, strict=True), s=3, color="#264653", label="outside faults")
    if faulted:
        ax1.scatter(*zip(*faulted, strict=True), s=3, color="#e76f51", label="captured in or near a fault")
    ax1.set_yscale("log")
    ax1.set_ylabel("capture -> receiver (ms)")
    ax1.legend(loc="upper left", fontsize=8)
    ax1.set_title(f"{data.scenario.name} ({data.target})")
    pts = [(_t(data, s.t_ms), s.backlog) for s in data.samples if s.backlog is not None]
    if pts:
        ax2.step(*zip(*pts, strict=True), where="post", color="#2a9d8f", label="backlog (stored, not acked)")
    rx = [(_t(data, s.t_ms), s.received) for s in data.samples]
    if rx:
        ax3 = ax2.twinx()
        ax3.plot(*zip(*rx, strict=True), color="#9b5de5", lw=1, label="received (cumulative)")
        ax3.set_ylabel("events at the receiver")
        ax3.legend(loc="upper right", fontsize=8)
    ax2.set_ylabel("events")
    ax2.set_xlabel("seconds since the daemon's first start (shaded: " +
                   ", ".join(f"{k}" for k in sorted({w.kind for w in data.windows})) + ")")
    ax2.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def markdown(data: RunData, a: Analysis, png: str | None, elapsed_s: float) -> str:
    sc, f = data.scenario, a.figures
    verdict = "SKIPPED" if data.skipped else "PASS" if a.ok else "FAIL"
    out = [f"# HIL: {sc.name} on {data.target}: {verdict}", "", sc.description.strip(), "",
           f"{elapsed_s:.0f} s wall clock; scenario {sc.duration:g} s then drain."]  # fmt: skip
    if data.skipped:
        out += ["", f"Skipped: {data.skipped}"]
        return "\n".join(out) + "\n"
    out += ["", "| check | result | measured | expected |", "| --- | --- | --- | --- |"]
    for c in a.checks:
        mark = {"pass": "pass" + (f" ({c.detail})" if c.detail else ""), "fail": "**FAIL**",
                "skip": f"skip ({c.detail})", "known": f"known issue ({c.detail})"}[c.status]
        out.append(f"| {c.name} | {mark} | {c.figure} | {c.expected} |")
    if png:
        out += ["", f"![latency and backlog]({png})"]
    lat = f.get("latency_ms", {})
    out += ["", "## Figures", "",
            f"- events: {f.get('events_received')} received of {f.get('events_assigned')} assigned ids; "
            f"{f.get('dropped')} reported dropped; by type {f.get('by_type')}",
            f"- batches: {f.get('batches_accepted')} accepted, {f.get('batches_resent_deduped')} resends deduped, "
            f"{f.get('wire_batches')} seen on the wire, {f.get('out_of_order')} arrived out of order",
            f"- latency outside faults: p50 {lat.get('p50')} ms, p99 {lat.get('p99')} ms, max {lat.get('max')} ms "
            f"({lat.get('n')} events); worst recovery {f.get('recovery_ms')} ms after a fault ended",
            f"- backlog: peak {f.get('backlog_peak')} during faults, {f.get('backlog_final')} at the end",
            f"- identifiers checked by the leak scan: {f.get('identifiers_checked')}; leaks: {len(f.get('leaks', []))}",
            "", "## Peers", ""]  # fmt: skip
    for kind, p in sorted(f.get("peers", {}).items()):
        out.append(f"- {kind}: **{p['mode']}**, {p['description']}")
    out += ["", "## Timeline", "", "| at | ran | step | outcome |", "| --- | --- | --- | --- |"]
    for s in sorted(data.steps, key=lambda s: s.at):
        note = f" ({s.outcome.note})" if s.outcome.note else ""
        out.append(f"| {s.at:g}s | {s.t:.1f}s | {s.do} | {s.outcome.applied}{note} |")
    out += ["", "Fault windows: " + (", ".join(f"{w.kind} {_t(data, w.start_ms):.1f}-{_t(data, w.end_ms):.1f}s"
                                               for w in data.windows) or "none")]  # fmt: skip
    out += ["", "Daemon lives: " + ", ".join(f"#{lf['n']} {lf['ended_by']} (exit {lf['exit']})"
                                             for lf in f.get("lives", []))]  # fmt: skip
    for note in data.notes:
        out.append(f"- note: {note}")
    return "\n".join(out) + "\n"
