"""Interleaved A/B runs of store variants, for evidence on a shared, noisy machine.

    python -m benchmarks.ab                      # the default cases, 5 passes of 500 ops each
    python -m benchmarks.ab --passes 9 --json out.json
    python -m benchmarks.ab --cases "reference x1" "reference x10" "what-if flock x10"

Sequential benchmarks compare runs made minutes apart, while the load of other jobs comes and goes.  Here every pass
runs one round of every case, in a new random order each pass, so each case sees the same load on average; the table
gives the median over passes of ops/s and the pooled lock-wait percentiles, and each case's ops/s relative to the
reference at the same number of processes.  Every case runs ``reference-update`` (progress reports on distinct
agents) on its own copy of the 20 KB sample, except the named baselines.  The "what-if" cases are benchmark-only
variants of the store (:mod:`benchmarks.workloads`); ``registry/`` is never modified.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .stats import summary_ms
from .workers import Factory, Workers
from .workloads import flock_json_rmw, reference_update, store_rmw
from .workspace import Workspace, sample_task, with_active, write_workspace

Builder = Callable[[Workspace], Factory]

CASES: dict[str, tuple[Builder, int]] = {
    "reference x1": (reference_update, 1),
    "reference x10": (reference_update, 10),
    "before: filelock x1": (lambda ws: reference_update(ws, variant="filelock"), 1),
    "before: filelock x10": (lambda ws: reference_update(ws, variant="filelock"), 10),
    "what-if flock x1": (lambda ws: reference_update(ws, variant="flock"), 1),
    "what-if flock x10": (lambda ws: reference_update(ws, variant="flock"), 10),
    "what-if link-bak x1": (lambda ws: reference_update(ws, variant="link-bak"), 1),
    "what-if link-bak x10": (lambda ws: reference_update(ws, variant="link-bak"), 10),
    "what-if flock+link-bak x1": (lambda ws: reference_update(ws, variant="flock+link-bak"), 1),
    "what-if flock+link-bak x10": (lambda ws: reference_update(ws, variant="flock+link-bak"), 10),
    "what-if itimer x1": (lambda ws: reference_update(ws, variant="itimer"), 1),
    "what-if itimer x10": (lambda ws: reference_update(ws, variant="itimer"), 10),
    "what-if itimer+link-bak x1": (lambda ws: reference_update(ws, variant="itimer+link-bak"), 1),
    "what-if itimer+link-bak x10": (lambda ws: reference_update(ws, variant="itimer+link-bak"), 10),
    "what-if flock+no-bak x10": (lambda ws: reference_update(ws, variant="flock+no-bak"), 10),
    "baseline flock-json-rmw x10": (flock_json_rmw, 10),
    "lock: store x10": (lambda ws: store_rmw(ws, "store"), 10),
    "lock: flock x10": (lambda ws: store_rmw(ws, "flock"), 10),
    "lock: filelock x10": (lambda ws: store_rmw(ws, "filelock"), 10),
}


def run(cases: Sequence[str], passes: int, ops: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    base = Path(tempfile.mkdtemp(prefix="orch-ab-"))
    spaces = {name: write_workspace(base / f"ws{i}", with_active(sample_task(), 10)) for i, name in enumerate(cases)}
    rates: dict[str, list[float]] = {name: [] for name in cases}
    latencies: dict[str, list[int]] = {name: [] for name in cases}
    waits: dict[str, list[int]] = {name: [] for name in cases}
    for n in range(passes):
        order = list(cases)
        rng.shuffle(order)
        for name in order:
            build, procs = CASES[name]
            ws = spaces[name]
            with Workers(procs, build(ws), ops // procs) as pool:
                ws.restore()
                pool.round()  # warm-up
                pool.reset()
                ws.restore()
                t0 = time.perf_counter()
                pool.round()
                elapsed = time.perf_counter() - t0
            rates[name].append(procs * (ops // procs) / elapsed)
            latencies[name] += pool.totals.latencies_ns
            waits[name] += pool.totals.waits_ns
        print(f"pass {n + 1}/{passes} done", file=sys.stderr, flush=True)
    rows = []
    for name in cases:
        row: dict[str, Any] = {"case": name, "procs": CASES[name][1], "ops_per_s": rates[name],
                               "median_ops_per_s": round(statistics.median(rates[name]), 1)}
        row.update(summary_ms(latencies[name], "op"))
        if waits[name]:
            row.update(summary_ms(waits[name], "lock_wait"))
        rows.append(row)
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    ref = {r["procs"]: r["median_ops_per_s"] for r in rows if r["case"].startswith("reference x")}
    lines = ["| case | processes | ops/s (median of passes) | vs reference | min-max | op p99 ms | wait p50 ms"
             " | wait p99 ms |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        vs = r["median_ops_per_s"] / ref[r["procs"]] if r["procs"] in ref else math.nan
        lines.append(f"| {r['case']} | {r['procs']} | {r['median_ops_per_s']:,.0f} | {vs:.2f}x"
                     f" | {min(r['ops_per_s']):,.0f}-{max(r['ops_per_s']):,.0f} | {r['op_p99_ms']:.1f}"
                     f" | {r.get('lock_wait_p50_ms', math.nan):.2f} | {r.get('lock_wait_p99_ms', math.nan):.1f} |")
    if 1 in ref and 10 in ref:
        lines.append(f"\nreference: 10 processes / 1 process = {ref[10] / ref[1]:.0%}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ab", description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES), metavar="CASE")
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--ops", type=int, default=500, help="operations per round, split over the processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    rows = run(args.cases, args.passes, args.ops, args.seed)
    print(render(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
