"""The checks a swarm's History and the final documents must pass, and the report a person can act on.

Each check is a function ``check(history, final) -> list[Problem]``.  Outcomes are read as in Jepsen: an ``ok``
operation happened, a ``fail`` did not, an ``info`` may or may not have; every check stays sound under ``info``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from registry.model import ACTIVE, ORCHESTRATOR, TERMINAL, global_violations, task_shape_problems, task_violations

from .adapter import promises_of
from .history import History, Op
from .linearize import Applied, Call, Refused, linearize

__all__ = ["CHECKS", "Final", "OrchViolation", "Problem", "Report", "check_history", "global_agreement",
           "invariants", "limits", "lost_inserts", "lost_updates", "read_final", "real_concurrency"]

#: Below this share of operations overlapping another process's, a passing run proves nothing.
MIN_OVERLAP = 0.2
#: States the per-agent linearizability search may explore before calling the agent inconclusive.
SEARCH_BUDGET = 100_000


@dataclass(frozen=True)
class Problem:
    check: str
    message: str
    agents: tuple[str, ...] = ()
    ops: tuple[Op, ...] = ()


@dataclass(frozen=True)
class Final:
    """The documents after the swarm, read through a freshly opened adapter."""

    tasks: dict[str, dict[str, Any]]
    glob: dict[str, Any] | None
    promises: frozenset[str]
    errors: dict[str, str] = field(default_factory=dict)  # task id (or "global") -> why it could not be read


def read_final(adapter: Any, task_ids: Iterable[str]) -> Final:
    tasks: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    for task_id in task_ids:
        try:
            tasks[task_id] = adapter.read_task(task_id)
        except Exception as exc:
            errors[task_id] = f"{type(exc).__name__}: {exc}"
    glob = None
    try:
        glob = adapter.read_global()
    except Exception as exc:
        errors["global"] = f"{type(exc).__name__}: {exc}"
    return Final(tasks, glob, promises_of(adapter), errors)


def _agents(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {a["id"]: a for a in doc.get("agents", []) if isinstance(a, dict) and "id" in a}


def _ok(op: Op) -> bool:
    return op.outcome == "ok"


def _maybe(op: Op) -> bool:
    return op.outcome in ("ok", "info")


# --------------------------------------------------------------------------------------------------------------------
# 1. The documents parse and every registry invariant holds

_LIMIT_RULES = {"max_agents": "max_agents", "max_concurrent": "max_concurrent", "max_depth": "max_depth"}


def invariants(history: History, final: Final) -> list[Problem]:
    problems = [Problem("corruption", f"reading {'the global registry' if key == 'global' else 'task ' + key}"
                                      f" failed after the swarm: {error}") for key, error in final.errors.items()]
    for task_id, doc in final.tasks.items():
        shape = task_shape_problems(doc)
        if shape:
            problems.append(Problem("corruption", f"task {task_id} has the wrong shape: {'; '.join(shape)}"))
            continue
        for v in task_violations(doc):
            if v.rule in _LIMIT_RULES and _LIMIT_RULES[v.rule] not in final.promises:
                continue
            problems.append(Problem("invariants", v.message, (v.agent_id,) if v.agent_id else ()))
    return problems


# --------------------------------------------------------------------------------------------------------------------
# 2. No lost insert


def lost_inserts(history: History, final: Final) -> list[Problem]:
    problems = []
    for task_id, doc in final.tasks.items():
        deploys = [op for op in history.calls if op.name == "deploy" and op.task_id == task_id]
        ok = [op for op in deploys if _ok(op)]
        info = [op for op in deploys if op.outcome == "info"]
        initial = set(_agents(history.initial.get(task_id, {})))
        present = set(_agents(doc))
        g_agents = set((final.glob or {}).get("agents", {}))
        for op in ok:
            if op.result not in present:
                problems.append(Problem("lost_insert", f"agent {op.result} was deployed (ok) by p{op.process} but is"
                                                       f" missing from task {task_id}", (op.result,), (op,)))
            elif final.glob is not None and op.result not in g_agents:
                problems.append(Problem("lost_insert", f"agent {op.result} of task {task_id} was deployed (ok) but"
                                                       " is missing from the global registry", (op.result,), (op,)))
        acked = [op.result for op in ok]
        for agent_id in {a for a in acked if acked.count(a) > 1}:
            twins = tuple(op for op in ok if op.result == agent_id)
            problems.append(Problem("duplicate", f"{len(twins)} ok deploys returned the same id {agent_id}",
                                    (agent_id,), twins))
        unexplained = present - initial - set(acked)
        if len(unexplained) > len(info):
            problems.append(Problem(
                "lost_insert", f"task {task_id} holds {len(unexplained)} agents that no ok deploy returned, but only"
                               f" {len(info)} deploys had an unknown outcome", tuple(sorted(unexplained)),
                tuple(info)))
        low, high = len(initial) + len(set(acked)), len(initial) + len(set(acked)) + len(info)
        spawned = doc.get("total_spawned")
        if not isinstance(spawned, int) or not low <= spawned <= high:
            bound = f"exactly {low}" if low == high else f"between {low} and {high}"
            problems.append(Problem("count_drift", f"task {task_id} has total_spawned {spawned!r}; its {len(ok)} ok"
                                                   f" and {len(info)} unknown deploys (on {len(initial)} agents"
                                                   f" before the swarm) allow {bound}", (), tuple(info)))
    return problems


# --------------------------------------------------------------------------------------------------------------------
# 3. No lost update: each agent's final state is one some order of its operations produces

AgentState = tuple[Any, Any, bool]  # status, progress, session alive


def _agent_step(state: AgentState, call: Call) -> Applied[AgentState] | Refused:
    status, progress, alive = state
    op: Op = call.op
    if op.name in ("tmux_kill", "tmux_server_sigkill"):
        return Applied((status, progress, False))
    if op.name == "reconcile":
        return Applied(("terminated", progress, alive) if status in ACTIVE and not alive else state)
    if status not in ACTIVE:
        return Refused(f"agent is {status}")
    if op.name == "kill":
        return Applied(("terminated", progress, False))
    return Applied((op.args["status"], op.args["progress"], alive))  # update


def _takes_session(op: Op, session: str, born_ns: int) -> bool:
    """Whether fault *op* may have killed *session*, of an agent whose deploy began at *born_ns*."""
    if op.name == "tmux_server_sigkill":  # every session the server had: not those of agents deployed after it
        return op.complete_ns is None or op.complete_ns > born_ns
    return op.name == "tmux_kill" and op.args.get("session") == session


def _ends_in(want: tuple[Any, Any]) -> Callable[[AgentState], bool]:
    return lambda state: (state[0], state[1]) == want


def lost_updates(history: History, final: Final) -> list[Problem]:
    problems = []
    for task_id, doc in final.tasks.items():
        agents = _agents(doc)
        initial = _agents(history.initial.get(task_id, {}))
        born = {op.result: op for op in history.calls if op.name == "deploy" and _ok(op) and op.task_id == task_id}
        by_agent: dict[str, list[Op]] = defaultdict(list)
        reconciles = []
        for op in history.ops:
            if op.name in ("update", "kill") and op.task_id == task_id and op.agent_id:
                by_agent[op.agent_id].append(op)
            elif op.name == "reconcile" and op.task_id == task_id:
                reconciles.append(op)
        for agent_id, agent in agents.items():
            if agent_id in initial:
                start = initial[agent_id]
                state: AgentState = (start.get("status"), start.get("progress"), True)
            elif agent_id in born:
                state = ("running", 0, True)
            else:
                continue  # an unknown deploy's agent: lost_inserts accounts for it
            session = agent.get("tmux_session") or f"agent_{agent_id}"
            born_ns = born[agent_id].invoke_ns if agent_id in born else history.start_ns
            faults = [op for op in history.ops if _takes_session(op, session, born_ns)]
            ops = by_agent.get(agent_id, [])
            if faults or any(op.name == "kill" for op in ops):
                ops = ops + faults + reconciles
            if not ops:
                if (agent.get("status"), agent.get("progress")) != state[:2]:
                    problems.append(Problem("lost_update", f"agent {agent_id} of task {task_id} is"
                                                           f" {agent.get('status')}/{agent.get('progress')} but was"
                                                           f" {state[0]}/{state[1]} and nothing changed it",
                                            (agent_id,)))
                continue
            want = (agent.get("status"), agent.get("progress"))
            # A failed operation changed nothing and may sit anywhere: leaving it out loses no order.
            calls = [Call(i, op, op.invoke_ns, op.complete_ns, op.outcome) for i, op in enumerate(ops)
                     if op.outcome != "fail"]
            search = linearize(calls, state, _agent_step, _ends_in(want), strict_fail=False, budget=SEARCH_BUDGET)
            if search.ok:
                continue
            if search.explored >= SEARCH_BUDGET:
                problems.append(Problem("unchecked", f"agent {agent_id}: {len(ops)} operations were too many to"
                                                        " search for an order; its final state was not checked",
                                        (agent_id,)))
                continue
            ends = sorted({f"{s[0]}/{s[1]}" for s in search.final_states})
            acked = sum(1 for op in ops if _ok(op) and not op.fault)
            problems.append(Problem(
                "lost_update", f"agent {agent_id} of task {task_id} ends {want[0]}/{want[1]} (status/progress), which"
                               f" no order of its {acked} acknowledged operations produces; orders end in"
                               f" {', '.join(ends) or 'no complete order (an ok operation was impossible)'}",
                (agent_id,), tuple(op for op in ops if not (op.name == "reconcile" and op.outcome == "fail"))
                + ((born[agent_id],) if agent_id in born else ())))
    return problems


# --------------------------------------------------------------------------------------------------------------------
# 4. Limits and deduplication


def _terminators(history: History, task_id: str, agent_id: str, session: str) -> list[Op]:
    """Operations that may have made *agent_id* terminal."""
    born = next((op.invoke_ns for op in history.calls if op.name == "deploy" and op.outcome == "ok"
                 and op.result == agent_id), history.start_ns)
    killed = any(_takes_session(op, session, born) for op in history.ops)
    out = []
    for op in history.calls:
        if not _maybe(op) or op.task_id != task_id:
            continue
        if (op.agent_id == agent_id and (op.name == "kill" or (op.name == "update" and op.args.get("status")
                                                                in TERMINAL))) or (op.name == "reconcile" and killed):
            out.append(op)
    return out


def limits(history: History, final: Final) -> list[Problem]:
    problems = []
    for task_id, doc in final.tasks.items():
        deploys = [op for op in history.calls if op.name == "deploy" and op.task_id == task_id and _ok(op)]
        initial = _agents(history.initial.get(task_id, {}))
        agents = _agents(doc)
        if "max_agents" in final.promises:
            total, cap = len(initial) + len(deploys), doc.get("max_agents")
            if isinstance(cap, int) and total > cap:
                problems.append(Problem("limits", f"task {task_id}: {len(deploys)} ok deploys on {len(initial)}"
                                                  f" agents make {total}, over max_agents {cap}",
                                        tuple(op.result for op in deploys), tuple(deploys)))
        if "max_concurrent" in final.promises:
            finishing = [op for op in history.calls if op.task_id == task_id and _maybe(op) and (
                op.name in ("kill", "reconcile") or (op.name == "update" and op.args.get("status") in TERMINAL))]
            active = sum(1 for a in initial.values() if a.get("status") in ACTIVE) + len(deploys)
            cap = doc.get("max_concurrent")
            if not finishing and isinstance(cap, int) and active > cap:
                problems.append(Problem("limits", f"task {task_id}: {active} agents were active at once (nothing"
                                                  f" finished), over max_concurrent {cap}",
                                        tuple(op.result for op in deploys), tuple(deploys)))
        if "max_depth" in final.promises:
            cap = doc.get("max_depth")
            for op in deploys:
                parent = agents.get(op.args.get("parent", ORCHESTRATOR))
                if parent is not None and isinstance(cap, int) and isinstance(parent.get("depth"), int) \
                        and parent["depth"] + 1 > cap:
                    problems.append(Problem("limits", f"task {task_id}: agent {op.result} was deployed (ok) under"
                                                      f" {parent['id']} at depth {parent['depth'] + 1}, over"
                                                      f" max_depth {cap}", (op.result,), (op,)))
        if "unique_type" in final.promises:
            problems += _duplicates(history, task_id, deploys, initial, agents)
    return problems


def _duplicates(history: History, task_id: str, deploys: list[Op], initial: dict[str, dict[str, Any]],
                agents: dict[str, dict[str, Any]]) -> list[Problem]:
    """Two ok deploys of one type with no way for either agent to have finished before the other was deployed."""

    def finished_before(agent_id: str, deadline: int) -> bool:
        session = agents.get(agent_id, {}).get("tmux_session") or f"agent_{agent_id}"
        return any(t.invoke_ns < deadline for t in _terminators(history, task_id, agent_id, session))

    problems = []
    by_type: dict[str, list[tuple[str, int]]] = defaultdict(list)  # type -> (agent, when its deploy completed)
    for agent_id, agent in initial.items():
        if agent.get("status") in ACTIVE:
            by_type[agent.get("type", "")].append((agent_id, history.start_ns))
    for op in deploys:
        by_type[op.args.get("type", "")].append((op.result, op.complete_ns or history.end_ns))
    ops_of = {op.result: op for op in deploys}
    for agent_type, born in by_type.items():
        for i, (a, a_done) in enumerate(born):
            for b, b_done in born[i + 1:]:
                if not finished_before(a, b_done) and not finished_before(b, a_done):
                    problems.append(Problem(
                        "duplicate", f"task {task_id} had two active {agent_type} agents, {a} and {b}: both deploys"
                                     " succeeded and neither agent could have finished before the other was deployed",
                        (a, b), tuple(ops_of[x] for x in (a, b) if x in ops_of)))
    return problems


# --------------------------------------------------------------------------------------------------------------------
# 5. Task and global registries agree


def global_agreement(history: History, final: Final) -> list[Problem]:
    if final.glob is None:
        return []
    complete = set(final.glob.get("tasks", {})) <= set(final.tasks)
    return [Problem("global_agreement", v.message, (v.agent_id,) if v.agent_id else ())
            for v in global_violations(final.glob, final.tasks, complete=complete)]


# --------------------------------------------------------------------------------------------------------------------
# 6. Real concurrency happened


def real_concurrency(history: History, final: Final) -> list[Problem]:
    if history.concurrency < 2 or not history.calls:
        return []
    overlap = history.overlap()
    if overlap >= MIN_OVERLAP:
        return []
    return [Problem("inconclusive", f"only {overlap:.0%} of the operations overlapped another process's (need"
                                    f" {MIN_OVERLAP:.0%}): the run was nearly serial, so passing would prove nothing."
                                    " Give the workload more operations or more processes.")]


Check = Callable[[History, Final], list[Problem]]
CHECKS: dict[str, Check] = {
    "invariants": invariants,
    "lost_inserts": lost_inserts,
    "lost_updates": lost_updates,
    "limits": limits,
    "global_agreement": global_agreement,
    "real_concurrency": real_concurrency,
}


# --------------------------------------------------------------------------------------------------------------------
# The report


@dataclass(frozen=True)
class Report:
    history: History
    problems: tuple[Problem, ...]
    notes: tuple[str, ...]
    replay: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems

    def render(self) -> str:
        h = self.history
        head = (f"orch: {len(self.problems)} problem(s) against {h.impl}, {h.concurrency} processes x"
                f" {h.ops_per_process} ops, seed {h.seed}: {h.count('ok')} ok, {h.count('fail')} fail,"
                f" {h.count('info')} info")
        lines = [head]
        by_check: dict[str, list[Problem]] = defaultdict(list)
        for problem in self.problems:
            by_check[problem.check].append(problem)
        for check, found in by_check.items():
            agents = sorted({a for p in found for a in p.agents if a})
            named = f": {', '.join(agents[:8])}{' ...' if len(agents) > 8 else ''}" if agents else ""
            lines.append(f"  {check}: {len(found)}{named}")
        faults = self.faults()
        if faults:
            lines.append("\nfaults injected, in time order, and the operations they hit:")
            lines += faults
        for problem in self.problems[:20]:
            lines.append(f"\n[{problem.check}] {problem.message}")
            if problem.ops:
                lines.append("  timeline (ms from the swarm's start):")
                lines.append(h.timeline(problem.ops, limit=12))
        if len(self.problems) > 20:
            lines.append(f"\n... and {len(self.problems) - 20} more problems")
        lines += [f"\nnote: {n}" for n in self.notes]
        if self.replay:
            lines.append(f"\nreplay: {self.replay}")
        return "\n".join(lines)


    def faults(self, limit: int = 30) -> list[str]:
        """One line a fault: when, what, and the operation it cut short (for a SIGKILL) or the session it took."""
        h = self.history
        out = []
        for fault in [op for op in h.ops if op.fault][:limit]:
            if fault.name in ("sigkill", "crash"):
                victim = fault.args.get("process", fault.process)
                hit = [op for op in h.ops if op.process == victim and op.complete_ns is None and not op.fault]
                what = (f"SIGKILL p{victim}" if fault.name == "sigkill" else
                        f"crash of p{victim} at {fault.args.get('point')} ({fault.args.get('file', 'a file')})")
                what += f": cut short {hit[0].describe()}" if hit else " between operations"
            else:
                who = "harness" if fault.process < 0 else f"p{fault.process}"
                what = f"{fault.describe()} by {who}"
            out.append(f"  {h.ms(fault.invoke_ns):>8} ms  {what}")
        return out


class OrchViolation(AssertionError):
    """A swarm broke a promise of the registry; the message is the report."""

    def __init__(self, report: Report) -> None:
        super().__init__(report.render())
        self.report = report


def check_history(history: History, final: Final, *, checks: Sequence[str] | None = None,
                  replay: str = "") -> Report:
    """Run *checks* (default: all of :data:`CHECKS`) and return the Report; it does not raise."""
    notes = []
    if final.glob is None and "global" not in final.errors:
        notes.append("read_global returned None: the global registry checks were skipped")
    missing = sorted({"unique_type", "max_agents", "max_concurrent", "max_depth"} - final.promises)
    if missing:
        notes.append(f"the registry does not promise {', '.join(missing)}: those checks were skipped")
    problems: list[Problem] = []
    for name in checks or list(CHECKS):
        problems += CHECKS[name](history, final)
    notes += [p.message for p in problems if p.check == "unchecked"]
    return Report(history, tuple(p for p in problems if p.check != "unchecked"), tuple(notes), replay)
