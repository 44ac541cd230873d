"""A stand-in for a coding agent, run in each agent's tmux session by default.

    python -m registry.stub_agent --base DIR --task TASK --agent ID [--report 25,50,75] [--then sleep|complete|exit]

It reports each progress value through :meth:`registry.Registry.update`, ``--interval`` seconds apart, then sleeps
until its session is killed (``sleep``, the default), reports ``completed`` and exits (``complete``), or exits
without a word (``exit``: its session disappears and the agent becomes a zombie for ``reconcile`` to find).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from .ops import Registry


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m registry.stub_agent")
    parser.add_argument("--base", required=True)
    parser.add_argument("--task", required=True)
    parser.add_argument("--agent", required=True)
    parser.add_argument("--report", default="", help="comma-separated progress values to report, e.g. 25,50,75")
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--then", choices=("sleep", "complete", "exit"), default="sleep")
    args = parser.parse_args(argv)
    registry = Registry(args.base, heal=False)
    for value in filter(None, args.report.split(",")):
        time.sleep(args.interval)
        registry.update(args.task, args.agent, "working", f"progress {value}%", int(value))
    if args.then == "complete":
        registry.update(args.task, args.agent, "completed", "done", 100)
    elif args.then == "sleep":
        while True:
            time.sleep(3600)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
