"""Everything about a swarm on disk, for CI: ``--orch-report=DIR`` (ini ``orch_report``, env ``ORCH_REPORT``).

For every swarm of a failing check (every swarm with ``--orch-report-all``) it writes, under
``DIR/<test>/swarm-<n>/``:

- ``history.jsonl``: one operation a line (process, operation, arguments, invoke and complete ns, outcome, result or
  error, the exception's type and source line);
- ``final.json``: the documents after the swarm, the global registry and the live sessions;
- ``report.txt``: the full report, nothing truncated;
- ``timeline.html``: a self-contained page (no network access) with one lane per process, each operation a bar
  coloured by outcome, the operations of each problem highlighted, details on hover.  Porcupine's linearizability
  visualisation and Jepsen's ``timeline.html`` are the anchors.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

from .checks import Final, Report
from .history import HARNESS, History, Op

__all__ = ["op_record", "timeline_html", "write_artifacts"]


def op_record(op: Op) -> dict[str, Any]:
    """One operation as a JSON object (a line of ``history.jsonl``)."""
    return {"process": op.process, "index": op.index, "op": op.name, "args": op.args, "invoke_ns": op.invoke_ns,
            "complete_ns": op.complete_ns, "outcome": op.outcome, "result": op.result, "error": op.error,
            "error_type": op.error_type, "where": op.where, "expected": op.expected, "fault": op.fault}


def _slug(nodeid: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid).strip("_")[-150:] or "test"


def write_artifacts(directory: Path, nodeid: str, number: int, history: History, final: Final,
                    report: Report) -> Path:
    """Write the four files of one swarm; return the folder."""
    folder = directory / _slug(nodeid) / f"swarm-{number}"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "history.jsonl", "w") as fh:
        for op in history.ops:
            fh.write(json.dumps(op_record(op), default=str) + "\n")
    documents = {"tasks": final.tasks, "global": final.glob, "errors": final.errors,
                 "sessions": sorted(final.sessions or {}), "initial": history.initial}
    (folder / "final.json").write_text(json.dumps(documents, indent=1, default=str))
    (folder / "report.txt").write_text(report.render(full=True) + "\n")
    (folder / "timeline.html").write_text(timeline_html(history, report, title=nodeid))
    return folder


def _bars(history: History, report: Report) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    index = {id(op): i for i, op in enumerate(history.ops)}
    bars = []
    for i, op in enumerate(history.ops):
        end = op.complete_ns if op.complete_ns is not None else history.end_ns
        detail = op.result if op.outcome == "ok" and op.result is not None else op.error
        bars.append({"i": i, "p": op.process, "name": op.name, "what": op.describe(), "outcome": op.outcome,
                     "fault": op.fault, "start": (op.invoke_ns - history.start_ns) / 1e6,
                     "end": (end - history.start_ns) / 1e6, "open": op.complete_ns is None,
                     "detail": "" if detail is None else str(detail)[:300], "where": op.where or ""})
    problems = []
    for n, problem in enumerate(report.problems):
        ops = [index[id(op)] for op in (*problem.ops, *problem.context) if id(op) in index]
        problems.append({"n": n, "check": problem.check, "message": problem.message, "ops": ops,
                         "context": [index[id(op)] for op in problem.context if id(op) in index]})
    return bars, problems


def timeline_html(history: History, report: Report, *, title: str = "") -> str:
    """The self-contained timeline page of one swarm."""
    bars, problems = _bars(history, report)
    processes = sorted({b["p"] for b in bars})
    data = {"bars": bars, "problems": problems, "processes": processes, "harness": HARNESS,
            "span": max([b["end"] for b in bars] + [1.0]),
            "head": report.render().splitlines()[0] if bars or report.problems else ""}
    payload = json.dumps(data, default=str).replace("</", "<\\/")
    return _PAGE.replace("{{TITLE}}", html.escape(title or "orch swarm")).replace("{{DATA}}", payload)


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{TITLE}}</title>
<style>
body { font: 13px/1.4 system-ui, sans-serif; margin: 16px; color: #222; }
h1 { font-size: 15px; margin: 0 0 4px; }
#head { font-family: monospace; margin-bottom: 8px; }
#problems { max-height: 30vh; overflow: auto; margin-bottom: 10px; }
.problem { cursor: pointer; padding: 3px 6px; border-left: 4px solid #c00; margin: 2px 0; background: #fff4f4; }
.problem.selected { background: #ffd9d9; }
.check { font-weight: bold; font-family: monospace; }
#legend span { display: inline-block; margin-right: 12px; }
.swatch { display: inline-block; width: 12px; height: 12px; vertical-align: middle; margin-right: 4px; }
#chart { border: 1px solid #ccc; overflow-x: auto; }
.lane-label { font: 12px monospace; fill: #333; }
.lane { fill: #fafafa; stroke: #eee; }
.bar { stroke: #333; stroke-width: 0.5; }
.bar.ok { fill: #6c6; } .bar.fail { fill: #bbb; } .bar.info { fill: #f4b942; } .bar.fault { fill: #8a5cd1; }
.bar.open { stroke-dasharray: 3 2; }
.bar.problem-op { stroke: #c00; stroke-width: 2.5; }
.bar.dim { opacity: 0.25; }
#tip { position: fixed; pointer-events: none; background: #222; color: #fff; padding: 6px 8px; border-radius: 4px;
       font: 12px monospace; max-width: 640px; white-space: pre-wrap; display: none; }
</style></head>
<body>
<h1>{{TITLE}}</h1>
<div id="head"></div>
<div id="legend"><span><i class="swatch" style="background:#6c6"></i>ok</span>
<span><i class="swatch" style="background:#bbb"></i>fail (refused)</span>
<span><i class="swatch" style="background:#f4b942"></i>info (unknown)</span>
<span><i class="swatch" style="background:#8a5cd1"></i>fault</span>
<span><i class="swatch" style="border:2px solid #c00"></i>in a problem</span></div>
<div id="problems"></div>
<div id="chart"></div>
<div id="tip"></div>
<script>
const D = {{DATA}};
const SVG = "http://www.w3.org/2000/svg";
const laneH = 22, left = 70, width = Math.max(900, window.innerWidth - 60);
const x = t => left + (t / D.span) * (width - left - 10);
document.getElementById("head").textContent = D.head;
const inProblem = new Set(D.problems.flatMap(p => p.ops));
const svg = document.createElementNS(SVG, "svg");
svg.setAttribute("width", width);
svg.setAttribute("height", (D.processes.length + 1) * laneH + 10);
const laneOf = {};
D.processes.forEach((p, k) => {
  laneOf[p] = k;
  const y = k * laneH + 4;
  const lane = document.createElementNS(SVG, "rect");
  lane.setAttribute("class", "lane"); lane.setAttribute("data-process", p);
  lane.setAttribute("x", 0); lane.setAttribute("y", y); lane.setAttribute("width", width);
  lane.setAttribute("height", laneH - 2);
  svg.appendChild(lane);
  const label = document.createElementNS(SVG, "text");
  label.setAttribute("class", "lane-label"); label.setAttribute("x", 4); label.setAttribute("y", y + 15);
  label.textContent = p === D.harness ? "harness" : "p" + p;
  svg.appendChild(label);
});
const tip = document.getElementById("tip");
const rects = [];
D.bars.forEach(b => {
  const r = document.createElementNS(SVG, "rect");
  const cls = ["bar", b.fault ? "fault" : b.outcome];
  if (b.open) cls.push("open");
  if (inProblem.has(b.i)) cls.push("problem-op");
  r.setAttribute("class", cls.join(" "));
  r.setAttribute("data-op", b.i);
  r.setAttribute("x", x(b.start)); r.setAttribute("y", laneOf[b.p] * laneH + 7);
  r.setAttribute("width", Math.max(2, x(b.end) - x(b.start))); r.setAttribute("height", laneH - 8);
  const text = `${b.p === D.harness ? "harness" : "p" + b.p}  ${b.what}\\n${b.start.toFixed(1)} → ` +
    `${b.open ? "never returned" : b.end.toFixed(1) + " ms"}  ${b.outcome}` +
    (b.detail ? `\\n${b.detail}` : "") + (b.where ? `\\nat ${b.where}` : "");
  r.addEventListener("mousemove", e => { tip.style.display = "block"; tip.textContent = text;
    tip.style.left = (e.clientX + 12) + "px"; tip.style.top = (e.clientY + 12) + "px"; });
  r.addEventListener("mouseleave", () => { tip.style.display = "none"; });
  svg.appendChild(r);
  rects.push(r);
});
document.getElementById("chart").appendChild(svg);
const list = document.getElementById("problems");
D.problems.forEach(p => {
  const div = document.createElement("div");
  div.className = "problem"; div.setAttribute("data-problem", p.n);
  div.innerHTML = `<span class="check">[${p.check}]</span> `;
  div.appendChild(document.createTextNode(p.message));
  div.addEventListener("click", () => {
    const on = !div.classList.contains("selected");
    document.querySelectorAll(".problem").forEach(d => d.classList.remove("selected"));
    const mine = new Set(p.ops);
    rects.forEach(r => r.classList.toggle("dim", on && !mine.has(+r.getAttribute("data-op"))));
    if (on) div.classList.add("selected");
  });
  list.appendChild(div);
});
if (!D.problems.length) list.textContent = "no problems";
</script></body></html>
"""
