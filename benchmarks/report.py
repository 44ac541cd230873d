"""The before/after report: run the deploy and throughput benchmarks on legacy and reference, write a table and a chart.

    python -m benchmarks.report                  # deploy latency (item 1) + throughput (item 3): ~2-3 minutes
    python -m benchmarks.report --all            # every benchmark in benchmarks/, so every target is judged
    python -m benchmarks.report --from-json F    # render a report from an earlier --benchmark-json file
    python -m benchmarks.report -- -k "1000"     # anything after -- goes to pytest

Writes ``benchmarks/report/`` (git-ignored): ``results.json`` (pytest-benchmark's JSON), ``report.md`` (tables:
deploy latency by registry size, throughput by processes, the issue's targets) and ``report.png`` (latency against
registry size, throughput against processes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from . import targets

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_OUT = HERE / "report"
DEFAULT_SELECTION = ["benchmarks/test_deploy.py", "benchmarks/test_throughput.py::test_throughput"]
WORKLOAD_ORDER = ("reference-update", "reference-mixed", "legacy-update", "flock-json-rmw", "sqlite-wal-full")


def run_benchmarks(out: Path, selection: Sequence[str], pytest_args: Sequence[str]) -> int:
    """Run pytest on *selection* with ``--benchmark-json``; return pytest's exit code."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pytest", *selection, f"--benchmark-json={out / 'results.json'}", "-q",
           *pytest_args]
    print("running:", shlex.join(cmd), flush=True)
    return subprocess.call(cmd, cwd=ROOT)


def load(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The benchmarks' extra_info (with the median added as ``_median_s``) and the run's metadata."""
    data = json.loads(path.read_text())
    infos = []
    for bench in data.get("benchmarks", []):
        info = dict(bench.get("extra_info", {}))
        info["_median_s"] = bench.get("stats", {}).get("median")
        info["_name"] = bench.get("name")
        infos.append(info)
    meta = {"datetime": data.get("datetime"), "machine": data.get("machine_info", {}),
            "commit": data.get("commit_info", {})}
    return infos, meta


def _f(value: Any, fmt: str = ",.1f") -> str:
    if isinstance(value, int | float) and not (isinstance(value, float) and math.isnan(value)):
        return format(value, fmt)
    return "-"


def _pick(infos: Iterable[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    for info in infos:
        if all(info.get(k) == v for k, v in match.items()):
            return info
    return None


def deploy_table(infos: list[dict[str, Any]]) -> list[str]:
    sizes = sorted({i["agents"] for i in infos if i.get("bench") == "deploy"})
    if not sizes:
        return []
    lines = ["## Deploy latency by registry size (item 1)", "",
             "Median of one deploy (a sub-agent) into a task registry of the given size, real tmux on a private"
             " server; `registry` = that minus the tmux start; `registry-only` = tmux stubbed out entirely. Reads"
             " and bytes are of the task registry, per deploy.", "",
             "| agents | task file | legacy ms | reference ms | speedup | legacy registry ms"
             " | reference registry ms | legacy registry-only ms | reference registry-only ms"
             " | legacy reads (bytes) | reference reads (bytes) |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    def reads(real: dict[str, Any], stubbed: dict[str, Any]) -> str:
        info = real or stubbed
        return f"{info.get('task_reads', '-')} ({_f(info.get('task_bytes_read'), ',.0f')})"

    for size in sizes:
        lr = _pick(infos, bench="deploy", impl="legacy", agents=size, tmux="real") or {}
        rr = _pick(infos, bench="deploy", impl="reference", agents=size, tmux="real") or {}
        ls = _pick(infos, bench="deploy", impl="legacy", agents=size, tmux="stubbed") or {}
        rs = _pick(infos, bench="deploy", impl="reference", agents=size, tmux="stubbed") or {}
        any_info = lr or rr or ls or rs
        speed = (lr.get("median_ms", math.nan) / rr["median_ms"]) if rr.get("median_ms") else math.nan
        lines.append(
            f"| {size:,} | {_f(any_info.get('task_file_bytes', math.nan) / 1e3, ',.0f')} KB"
            f" | {_f(lr.get('median_ms'), ',.2f')} | {_f(rr.get('median_ms'), ',.2f')} | {_f(speed, '.2f')}x"
            f" | {_f(lr.get('registry_median_ms'), ',.2f')} | {_f(rr.get('registry_median_ms'), ',.2f')}"
            f" | {_f(ls.get('median_ms'), ',.2f')} | {_f(rs.get('median_ms'), ',.2f')}"
            f" | {reads(lr, ls)} | {reads(rr, rs)} |")
    return lines


def throughput_table(infos: list[dict[str, Any]]) -> list[str]:
    rows = [i for i in infos if i.get("bench") == "throughput"]
    if not rows:
        return []
    procs = sorted({i["procs"] for i in rows})
    workloads = [w for w in WORKLOAD_ORDER if any(i["workload"] == w for i in rows)]
    lines = ["## Throughput by processes (item 3)", "",
             "Operations per second over a round (median round), 20 KB task registry, durable writes; per-op p99 in"
             " brackets. `legacy-update` counts only operations that succeeded (torn reads fail).", "",
             "| processes | " + " | ".join(workloads) + " |", "| ---: |" + " ---: |" * len(workloads)]
    for n in procs:
        cells = []
        for w in workloads:
            info = _pick(rows, workload=w, procs=n)
            if info is None:
                cells.append("-")
                continue
            ops = info.get("ok_ops_per_s", info.get("ops_per_s"))
            extra = f" ({info['error_rate']:.0%} failed)" if info.get("error_rate") else ""
            cells.append(f"{_f(ops, ',.0f')} [{_f(info.get('op_p99_ms'), '.1f')} ms]{extra}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    alternatives = [i for i in infos if i.get("bench") == "throughput-alternative"]
    if alternatives:
        lines += ["", "### reference-update with the store's knobs and what-if store variants", "",
                  "| variant | processes | ops/s | op p99 ms | lock-wait p50 ms | lock-wait p99 ms |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for i in alternatives:
            failed = f" ({i['error_rate']:.0%} failed)" if i.get("error_rate") else ""
            lines.append(f"| {i['alternative']} | {i['procs']} | {_f(i.get('ops_per_s'), ',.0f')}{failed}"
                         f" | {_f(i.get('op_p99_ms'), '.1f')} | {_f(i.get('lock_wait_p50_ms'), '.2f')}"
                         f" | {_f(i.get('lock_wait_p99_ms'), '.1f')} |")
    return lines


def history_table(infos: list[dict[str, Any]]) -> list[str]:
    rows = [i for i in infos if i.get("bench") == "history"]
    if not rows:
        return []
    sizes = sorted({i["agents"] for i in rows})
    lines = ["## Cost against the workspace's history (issue 14)", "",
             "Median of one deploy (real tmux) and one status change in a current task, with the given number of"
             " agents run before in old tasks; `before: no archive` is the reference with its archive turned off"
             " (the global registry keeps every agent), measured in the same run. Growth is against 100 agents.", "",
             "| agents | variant | GLOBAL_REGISTRY.json | archive | deploy ms | deploy growth | deploy registry ms"
             " | status change ms | status growth |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for variant in ("reference", "before: no archive"):
        base = {op: (_pick(rows, op=op, variant=variant, agents=sizes[0]) or {}).get("median_ms") for op in
                ("deploy", "status")}
        for size in sizes:
            d = _pick(rows, op="deploy", variant=variant, agents=size) or {}
            st = _pick(rows, op="status", variant=variant, agents=size) or {}
            info = d or st
            if not info:
                continue

            def growth(cell: dict[str, Any], op: str, base: dict[str, Any] = base) -> str:
                first = base[op]
                return _f(cell["median_ms"] / first, ".2f") + "x" if cell.get("median_ms") and first else "-"

            lines.append(f"| {size:,} | {variant} | {_f(info.get('global_file_bytes', math.nan) / 1e6, ',.2f')} MB"
                         f" | {_f(info.get('archive_bytes', math.nan) / 1e6, ',.2f')} MB"
                         f" | {_f(d.get('median_ms'), ',.2f')} | {growth(d, 'deploy')}"
                         f" | {_f(d.get('registry_median_ms'), ',.2f')} | {_f(st.get('median_ms'), ',.2f')}"
                         f" | {growth(st, 'status')} |")
    return lines


def lock_table(infos: list[dict[str, Any]]) -> list[str]:
    rows = [i for i in infos if i.get("bench") == "lock-contention"]
    if not rows:
        return []
    lines = ["## Lock wait under contention (item 2)", "",
             "| lock | processes | ops/s | wait p50 ms | wait p95 ms | wait p99 ms |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for i in rows:
        lines.append(f"| {i['lock']} | {i['procs']} | {_f(i.get('ops_per_s'), ',.0f')}"
                     f" | {_f(i.get('lock_wait_p50_ms'), '.2f')} | {_f(i.get('lock_wait_p95_ms'), '.1f')}"
                     f" | {_f(i.get('lock_wait_p99_ms'), '.1f')} |")
    return lines


def chart(infos: list[dict[str, Any]], path: Path) -> bool:
    """Latency against registry size and throughput against processes, side by side; False if nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    deploys = [i for i in infos if i.get("bench") == "deploy"]
    through = [i for i in infos if i.get("bench") == "throughput"]
    hist = [i for i in infos if i.get("bench") == "history"]
    if not deploys and not through and not hist:
        return False
    fig, axes = plt.subplots(1, 3 if hist else 2, figsize=(19 if hist else 13, 5))
    left, right = axes[0], axes[1]
    if hist:
        panel = axes[2]
        for variant, colour in (("reference", "tab:blue"), ("before: no archive", "tab:red")):
            for op, style in (("deploy", "-o"), ("status", "--s")):
                points = sorted((i["agents"], i["median_ms"]) for i in hist
                                if i["variant"] == variant and i["op"] == op
                                and not math.isnan(i.get("median_ms", math.nan)))
                if points:
                    panel.plot(*zip(*points, strict=True), style, color=colour, label=f"{op}, {variant}")
        panel.set(xscale="log", yscale="log", xlabel="agents in the workspace's history",
                  ylabel="median latency (ms)", title="Deploy and status change against history (issue 14)")
        panel.grid(True, which="both", alpha=0.3)
        panel.legend(loc="best")
    for impl, colour in (("legacy", "tab:red"), ("reference", "tab:blue")):
        for tmux, style, label in (("real", "-o", "real tmux"), ("stubbed", "--s", "registry-only")):
            points = sorted((i["agents"], i["median_ms"]) for i in deploys
                            if i["impl"] == impl and i["tmux"] == tmux and not math.isnan(i.get("median_ms", math.nan)))
            if points:
                left.plot(*zip(*points, strict=True), style, color=colour, label=f"{impl}, {label}")
    left.set(xscale="log", yscale="log", xlabel="agents in the task registry", ylabel="deploy latency, median (ms)",
             title="Deploy latency against registry size")
    left.grid(True, which="both", alpha=0.3)
    if deploys:
        left.legend(loc="best")
    for workload in WORKLOAD_ORDER:
        points = sorted((i["procs"], i.get("ok_ops_per_s", i["ops_per_s"])) for i in through
                        if i["workload"] == workload)
        if points:
            right.plot(*zip(*points, strict=True), "-o", label=workload)
    right.axhline(1500, color="grey", linestyle=":", label="target: 1,500 ops/s at 10 processes")
    right.set(xlabel="processes", ylabel="successful operations per second", title="Throughput against processes")
    right.set_xticks(sorted({i["procs"] for i in through}) or [1, 2, 4, 10])
    right.grid(True, alpha=0.3)
    if through:
        right.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def render(infos: list[dict[str, Any]], meta: dict[str, Any], command: str) -> str:
    machine = meta.get("machine", {})
    commit = meta.get("commit", {})
    loads = [i["loadavg_1m"] for i in infos if isinstance(i.get("loadavg_1m"), int | float)]
    lines = ["# pytest-orch benchmarks: legacy against reference", "",
             f"- produced by: `{command}`",
             f"- when: {meta.get('datetime') or datetime.datetime.now().isoformat()}",
             f"- commit: {commit.get('id', '?')[:12]}{' (dirty)' if commit.get('dirty') else ''}",
             f"- machine: {machine.get('cpu', {}).get('brand_raw', platform.processor() or '?')},"
             f" {os.cpu_count()} CPUs, Python {machine.get('python_version', platform.python_version())}",
             f"- 1-minute load average during the run: {min(loads):.1f} to {max(loads):.1f} (the machine is shared;"
             " judge noise by it)" if loads else "- load average: not recorded", ""]
    for table in (deploy_table(infos), history_table(infos), throughput_table(infos), lock_table(infos)):
        if table:
            lines += [*table, ""]
    lines += ["## Targets of issues 6 and 14", "", *targets.render(targets.evaluate(infos)), "",
              "Targets are reported, never asserted; a target that needs a benchmark this run did not include"
              " says `not measured` (run `python -m benchmarks.report --all`).", ""]
    if any(i.get("bench") in ("deploy", "throughput", "history") for i in infos):
        lines += ["![latency against registry size, throughput against processes](report.png)", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pytest_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, pytest_args = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write (default: %(default)s)")
    parser.add_argument("--all", action="store_true", help="run every benchmark, not only deploy and throughput")
    parser.add_argument("--from-json", type=Path, help="render from this --benchmark-json file; run nothing")
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    code = 0
    if args.from_json:
        source = args.from_json
        command = f"python -m benchmarks.report --from-json {source}"
    else:
        selection = ["benchmarks"] if args.all else DEFAULT_SELECTION
        code = run_benchmarks(out, selection, pytest_args)
        source = out / "results.json"
        command = "python -m benchmarks.report" + (" --all" if args.all else "") + (
            " -- " + shlex.join(pytest_args) if pytest_args else "")
        if not source.exists():
            print(f"pytest exited {code} and wrote no {source}", file=sys.stderr)
            return code or 2
    infos, meta = load(source)
    (out / "report.md").write_text(render(infos, meta, command))
    drew = chart(infos, out / "report.png")
    print(f"wrote {out / 'report.md'}" + (f" and {out / 'report.png'}" if drew else ""))
    return code


if __name__ == "__main__":
    raise SystemExit(main())
