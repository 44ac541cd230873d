"""``orch-registry status|check|repair``: look at a workspace, and mend it.

Exit status: 0 healthy, 1 problems found, 2 usage or I/O error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import model
from .errors import CorruptRegistry, RegistryError
from .health import check, plural, repair
from .ops import Registry, default_base

HEALTHY, PROBLEMS, ERROR = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--base", default=None,
                        help="workspace directory (default: $ORCH_WORKSPACE or ./.agent-workspace)")
    common.add_argument("--json", action="store_true", help="print a JSON document instead of text")
    parser = argparse.ArgumentParser(prog="orch-registry", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("status", parents=[common], help="counts per task, read only (never writes, never asks tmux)")
    sub.add_parser("check", parents=[common],
                   help="invariants, task/global agreement, zombies and leaked sessions; read only")
    rep = sub.add_parser("repair", parents=[common], help="back up, then reap zombies, fix counters, rebuild the"
                                                          " global registry")
    rep.add_argument("--dry-run", action="store_true", help="say what would be done, change nothing")
    rep.add_argument("--restore", action="store_true",
                     help="replace a corrupt task registry with its last good copy (its .bak), or else rebuild it from"
                          " the global registry (prompts and progress are lost); rebuild a corrupt global registry"
                          " from the task registries. The corrupt file is kept in the backup")
    rep.add_argument("--kill-leaks", action="store_true", help="kill agent_* sessions that no registry knows")
    return parser


def _status(base: Path) -> tuple[int, dict[str, Any], str]:
    reg = Registry(base, heal=False)
    rows, lines, code = [], [], HEALTHY
    for task_id in reg.task_ids():
        try:
            task = reg.task_file(task_id).read()
        except CorruptRegistry as exc:
            rows.append({"task_id": task_id, "error": str(exc)})
            lines.append(f"  {task_id}  CORRUPT: {exc}")
            code = PROBLEMS
            continue
        agents = task["agents"]
        row = {"task_id": task_id, "status": task.get("status"), "agents": len(agents),
               "active": sum(1 for a in agents if model.is_active(a)),
               "completed": sum(1 for a in agents if a.get("status") == "completed"),
               "violations": [v.message for v in model.task_violations(task)]}
        rows.append(row)
        lines.append(f"  {task_id}  {row['status']}  {row['agents']} agents, {row['active']} active,"
                     f" {row['completed']} completed" + (f"  ({plural(len(row['violations']), 'problem')})"
                                                        if row["violations"] else ""))
        code = PROBLEMS if row["violations"] else code
    header = f"{reg.base}: {plural(len(rows), 'task')}"
    text = "\n".join([header, *lines, "" if code == HEALTHY else "run `orch-registry check` for details"]).rstrip()
    return code, {"base": str(reg.base), "tasks": rows}, text


def _not_a_workspace(base: Path) -> str | None:
    """Why *base* cannot be a workspace, or None."""
    try:
        if not base.is_dir():
            return f"no workspace at {base}"
    except OSError as exc:  # a name too long for the file system, say
        return f"no workspace at {str(base)[:100]}...: {exc.strerror or exc}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.base == "":
        print("orch-registry: error: --base is empty; name the workspace directory", file=sys.stderr)
        return ERROR
    base = Path(args.base) if args.base is not None else default_base()
    problem = _not_a_workspace(base)
    if problem is not None:
        print(f"orch-registry: error: {problem} (pass --base DIR or set ORCH_WORKSPACE)", file=sys.stderr)
        return ERROR
    try:
        if args.command == "status":
            code, doc, text = _status(base)
        elif args.command == "check":
            report = check(base)
            code, doc, text = (HEALTHY if report.healthy else PROBLEMS), report.to_json(), report.render()
        else:
            done = repair(base, dry_run=args.dry_run, restore=args.restore, kill_leaks=args.kill_leaks)
            after = check(base)
            healthy = after.healthy and not done.refused
            code = HEALTHY if healthy and not (args.dry_run and done.actions) else PROBLEMS
            doc = {"repair": done.to_json(), "after": after.to_json()}
            text = "\n".join(line for line in (
                done.render(), ("after:" if not args.dry_run else "now:"),
                after.render(hint=args.dry_run or not done.refused), done.hint()) if line)
    except (RegistryError, OSError) as exc:
        print(f"orch-registry: error: {exc}", file=sys.stderr)
        return ERROR
    print(json.dumps(doc, indent=2) if args.json else text)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
