"""The checks a swarm's History and the final documents must pass, and the report a person can act on.

Each check is a function ``check(history, final) -> list[Problem]``.  Outcomes are read as in Jepsen: an ``ok``
operation happened, a ``fail`` did not, an ``info`` may or may not have; every check stays sound under ``info``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .adapter import promises_of
from .errors import OrchFailure
from .history import History, Op
from .linearize import Applied, Call, Refused, linearize, lost
from .spec import ALL_PROMISES, ORCHESTRATOR, AgentModel, Spec, spec_of

__all__ = ["CHECKS", "Final", "OrchViolation", "Problem", "Report", "check_history", "crashes", "global_agreement",
           "invariants", "limits", "lost_inserts", "lost_updates", "read_final", "real_concurrency", "session_leaks"]

#: Below this share of operations overlapping another process's, a passing run proves nothing.
MIN_OVERLAP = 0.2
#: States the per-agent linearizability search may explore before calling the agent inconclusive.
SEARCH_BUDGET = 100_000
#: Exception types that are a reader seeing a registry file that is not (yet) whole: a torn read.
PARSE_ERRORS = frozenset({"JSONDecodeError", "CorruptRegistry", "UnicodeDecodeError"})
#: Operations that write to a task; the "concurrent writes" of a lost update's report.
WRITES = ("deploy", "update", "kill", "reconcile")


@dataclass(frozen=True)
class Problem:
    check: str
    message: str
    agents: tuple[str, ...] = ()
    ops: tuple[Op, ...] = ()
    #: Operations of other processes that overlapped (for a lost update: the writes that may have clobbered it).
    context: tuple[Op, ...] = ()


@dataclass(frozen=True)
class Final:
    """The documents after the swarm, read through a freshly opened adapter, and the spec they are judged by.

    ``sessions`` are the tmux sessions alive after the swarm and ``sessions_before`` those alive before it (None when
    they were not listed); ``clock`` maps the wall clock onto the history's: ``(time.time(), monotonic_ns)`` taken
    together.
    """

    tasks: dict[str, dict[str, Any]]
    glob: dict[str, Any] | None
    promises: frozenset[str]
    errors: dict[str, str] = field(default_factory=dict)  # task id (or "global") -> why it could not be read
    spec: Spec | None = None
    sessions: Mapping[str, float] | None = None  # live session -> when tmux says it was created (epoch seconds)
    sessions_before: frozenset[str] = frozenset()
    clock: tuple[float, int] | None = None

    def __post_init__(self) -> None:
        if self.spec is None:
            object.__setattr__(self, "spec", Spec(promises=self.promises))

    @property
    def judge(self) -> Spec:
        assert self.spec is not None
        return self.spec


def read_final(adapter: Any, task_ids: Iterable[str], *, sessions: Mapping[str, float] | None = None,
               sessions_before: frozenset[str] = frozenset(), clock: tuple[float, int] | None = None) -> Final:
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
    promises = promises_of(adapter)
    return Final(tasks, glob, promises, errors, spec_of(adapter, promises), sessions, sessions_before, clock)


def _records(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every agent record of a document by id, tombstones included."""
    return {a["id"]: a for a in doc.get("agents", []) if isinstance(a, dict) and isinstance(a.get("id"), str)}


def _ok(op: Op) -> bool:
    return op.outcome == "ok"


def _maybe(op: Op) -> bool:
    return op.outcome in ("ok", "info")


def _overlapping(history: History, ops: Iterable[Op], task_id: str, besides: str | None) -> tuple[Op, ...]:
    """Writes to *task_id* by other processes that ran while one of *ops* did, other than those about *besides*."""
    ops = list(ops)
    out = []
    for other in history.calls:
        if other.name not in WRITES or other.task_id != task_id or not _maybe(other) or other.agent_id == besides:
            continue
        end = other.complete_ns if other.complete_ns is not None else history.end_ns
        for op in ops:
            op_end = op.complete_ns if op.complete_ns is not None else history.end_ns
            if other.process != op.process and other.invoke_ns < op_end and op.invoke_ns < end:
                out.append(other)
                break
    return tuple(out)


# --------------------------------------------------------------------------------------------------------------------
# 1. The documents parse and every invariant of the rules holds


def invariants(history: History, final: Final) -> list[Problem]:
    problems = [Problem("corruption", f"reading {'the global registry' if key == 'global' else 'task ' + key}"
                                      f" failed after the swarm: {error}") for key, error in final.errors.items()]
    for task_id, doc in final.tasks.items():
        shape = final.judge.shape_problems(doc)
        if shape:
            problems.append(Problem("corruption", f"task {task_id} has the wrong shape: {'; '.join(shape)}"))
            continue
        problems += [Problem("invariants", v.message, (v.agent_id,) if v.agent_id else ())
                     for v in final.judge.task_violations(task_id, doc)]
    return problems


# --------------------------------------------------------------------------------------------------------------------
# 2. No lost insert


def _may_hide(spec: Spec, ops: Iterable[Op]) -> bool:
    """Whether one of *ops* may have turned an agent into a tombstone (so that it reads as absent)."""
    r = spec.rules
    for op in ops:
        if not _maybe(op):
            continue
        if (op.name == "kill" and spec.is_hidden(r.killed_to)) or (op.name == "reconcile"
                                                                  and spec.is_hidden(r.reaped_to)):
            return True
        if op.name == "update" and spec.is_hidden(op.args.get("status")):
            return True
    return False


def _agent_ops(history: History, spec: Spec, task_id: str) -> tuple[dict[str, list[Op]], list[Op]]:
    """The updates and kills of each agent of *task_id*, and the reconciles that reach the task."""
    by_agent: dict[str, list[Op]] = defaultdict(list)
    reconciles = []
    for op in history.ops:
        if op.name in ("update", "kill") and op.task_id == task_id and op.agent_id:
            by_agent[op.agent_id].append(op)
        elif op.name == "reconcile" and (op.task_id == task_id or spec.rules.reconcile_scope == "registry"):
            reconciles.append(op)
    return by_agent, reconciles


def _created(history: History) -> dict[str, list[Op]]:
    """The ok create_task calls of the swarm, by the task id they returned."""
    out: dict[str, list[Op]] = {}
    for op in history.calls:
        if op.name == "create_task" and _ok(op) and isinstance(op.result, str):
            out.setdefault(op.result, []).append(op)
    return out


def duplicate_tasks(history: History) -> list[Problem]:
    """Two ok creates that returned one task id.  (A created task that cannot be read is reported by invariants,
    with the error its read raised: a missing task and a corrupt one look alike from here; one missing from the
    global registry is global_agreement's.)"""
    return [Problem("duplicate", f"{len(ops)} ok create_task calls returned the same task id {task_id}", (),
                    tuple(ops)) for task_id, ops in _created(history).items() if len(ops) > 1]


def lost_inserts(history: History, final: Final) -> list[Problem]:
    spec = final.judge
    problems = duplicate_tasks(history)
    for task_id, doc in final.tasks.items():
        deploys = [op for op in history.calls if op.name == "deploy" and op.task_id == task_id]
        ok = [op for op in deploys if _ok(op)]
        info = [op for op in deploys if op.outcome == "info"]
        initial = set(_records(history.initial.get(task_id, {})))
        records = _records(doc)
        by_agent, reconciles = _agent_ops(history, spec, task_id)
        g_agents = set((final.glob or {}).get("agents") or {})
        for op in ok:
            record = records.get(op.result)
            if record is None:
                if spec.rules.hidden and _may_hide(spec, by_agent.get(op.result, []) + reconciles):
                    continue  # a tombstone that reads as absent: lost_updates judges whether one was possible
                problems.append(Problem("lost_insert", f"agent {op.result} was deployed (ok) by p{op.process} but is"
                                                       f" missing from task {task_id}", (op.result,), (op,),
                                        _overlapping(history, [op], task_id, op.result)))
            elif final.glob is not None and op.result not in g_agents and not spec.is_hidden(record.get("status")):
                problems.append(Problem("lost_insert", f"agent {op.result} of task {task_id} was deployed (ok) but"
                                                       " is missing from the global registry", (op.result,), (op,)))
        acked = [op.result for op in ok]
        for agent_id in {a for a in acked if acked.count(a) > 1}:
            twins = tuple(op for op in ok if op.result == agent_id)
            problems.append(Problem("duplicate", f"{len(twins)} ok deploys returned the same id {agent_id}",
                                    (agent_id,), twins))
        unexplained = set(records) - initial - set(acked)
        if len(unexplained) > len(info):
            problems.append(Problem(
                "lost_insert", f"task {task_id} holds {len(unexplained)} agents that no ok deploy returned, but only"
                               f" {len(info)} deploys had an unknown outcome", tuple(sorted(unexplained)),
                tuple(info)))
        if not spec.rules.counters:
            continue
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

#: The observed state of an agent that reads as absent (a tombstone, or no record at all).
ABSENT = "(absent)"


def _agent_step(spec: Spec) -> Callable[[AgentModel, Call], Applied[AgentModel] | Refused]:
    """What one operation does to one agent, by the specification."""

    def step(state: AgentModel, call: Call) -> Applied[AgentModel] | Refused:
        op: Op = call.op
        if op.name in ("tmux_kill", "tmux_server_sigkill"):
            return Applied(spec.lose_session(state))
        if op.name == "reconcile":
            return Applied(spec.reap(state))
        if op.name == "kill":
            after = spec.kill(state)
        else:
            after = spec.update(state, op.args["status"], op.args.get("progress", 0))
        return after if isinstance(after, Refused) else Applied(after)

    return step


def _takes_session(op: Op, session: str, born_ns: int) -> bool:
    """Whether fault *op* may have killed *session*, of an agent whose deploy began at *born_ns*."""
    if op.name == "tmux_server_sigkill":  # every session the server had: not those of agents deployed after it
        return op.complete_ns is None or op.complete_ns > born_ns
    return op.name == "tmux_kill" and op.args.get("session") == session


def _observed(spec: Spec, record: dict[str, Any] | None) -> tuple[Any, Any]:
    if record is None or spec.is_hidden(record.get("status")):
        return (ABSENT, None)
    return (record.get("status"), record.get("progress") if spec.rules.progress else None)


def _shown(spec: Spec, state: tuple[Any, Any]) -> str:
    if state[0] == ABSENT:
        return "absent (a tombstone or no record)"
    return f"{state[0]}/{state[1]}" if spec.rules.progress else str(state[0])


def _start_of(spec: Spec, agent_id: str, record: dict[str, Any] | None, born: Op | None) -> AgentModel:
    if record is not None:
        progress: Any = record.get("progress") if spec.rules.progress else 0
        return AgentModel(agent_id, str(record.get("type")), "", 0, str(record.get("status")), progress)
    assert born is not None
    return spec.new_agent(agent_id, str(born.args.get("type")), "", 0)


def lost_updates(history: History, final: Final) -> list[Problem]:
    spec = final.judge
    step = _agent_step(spec)
    problems = []
    for task_id, doc in final.tasks.items():
        records = _records(doc)
        initial = _records(history.initial.get(task_id, {}))
        born = {op.result: op for op in history.calls if op.name == "deploy" and _ok(op) and op.task_id == task_id}
        by_agent, reconciles = _agent_ops(history, spec, task_id)
        for agent_id in sorted(set(records) | set(born)):
            record = records.get(agent_id)
            own = by_agent.get(agent_id, [])
            if record is None and not (spec.rules.hidden and _may_hide(spec, own + reconciles)):
                continue  # missing, and nothing could have hidden it: lost_inserts reports it
            if agent_id not in initial and agent_id not in born:
                continue  # an unknown deploy's agent: lost_inserts accounts for it
            start = _start_of(spec, agent_id, initial.get(agent_id), born.get(agent_id))
            session = spec.session_of(record or initial.get(agent_id) or {"id": agent_id})
            born_ns = born[agent_id].invoke_ns if agent_id in born else history.start_ns
            faults = [op for op in history.ops if _takes_session(op, session, born_ns)]
            ops = own
            if faults or any(op.name == "kill" for op in ops) or spec.rules.unknown_status == "stored" \
                    or not spec.rules.terminal_is_final:
                ops = ops + faults + reconciles
            want = _observed(spec, record)
            problem = _judge_agent(history, spec, step, task_id, agent_id, start, want, ops, born.get(agent_id))
            if problem is not None:
                problems.append(problem)
    return problems


def _judge_agent(history: History, spec: Spec, step: Any, task_id: str, agent_id: str, start: AgentModel,
                 want: tuple[Any, Any], ops: list[Op], born: Op | None) -> Problem | None:
    """A lost update of one agent, if no order of its operations *ops* takes *start* to *want*."""

    def ends(state: AgentModel) -> bool:
        if want[0] == ABSENT:
            return spec.is_hidden(state.status)
        return state.status == want[0] and (not spec.rules.progress or state.progress == want[1])

    if not ops:
        if ends(start):
            return None
        return Problem("lost_update", f"agent {agent_id} of task {task_id} is {_shown(spec, want)} but was"
                                      f" {_shown(spec, (start.status, start.progress))} and no operation could change"
                                      " it: none was about it, and its session was never lost, so no reconcile"
                                      " could reap it", (agent_id,), (born,) if born is not None else ())
    # A failed operation changed nothing and may sit anywhere: leaving it out loses no order.
    calls = [Call(i, op, op.invoke_ns, op.complete_ns, op.outcome) for i, op in enumerate(ops) if op.outcome != "fail"]
    search = linearize(calls, start, step, ends, strict_fail=False, budget=SEARCH_BUDGET)
    if search.ok:
        return None
    if search.exhausted:
        return Problem("unchecked", f"agent {agent_id}: {len(ops)} operations were too many to search for an order;"
                                    " its final state was not checked", (agent_id,))
    acked = sum(1 for op in ops if _ok(op) and not op.fault)
    shown = [op for op in ops if not (op.name == "reconcile" and op.outcome == "fail")]
    own_ok = [c.op for c in calls if c.outcome == "ok" and not c.op.fault and c.op.name != "reconcile"]
    if search.final_states:
        ends_in = ", ".join(sorted({_shown(spec, (s.status, s.progress)) for s in search.final_states}))
        gone = _explaining(calls, start, step, ends)
        why = f"orders end in {ends_in}"
        if gone:
            why += "; it is what they leave if " + " or ".join(f"{op.describe()} by p{op.process}" for op in gone) \
                   + " never ran, yet it returned ok"
    else:
        impossible = _explaining(calls, start, step, lambda s: True)
        gone = impossible
        named = " or ".join(f"{op.describe()} by p{op.process}" for op in impossible) or "an ok operation"
        why = (f"no order completes: {named} returned ok where the rules refuse it in every order"
               f" ({'; '.join(spec.rules.differences()) or 'the reference rules'})")
    unit = "status/progress" if spec.rules.progress else "status"
    return Problem("lost_update", f"agent {agent_id} of task {task_id} ends {_shown(spec, want)} ({unit}), which no"
                                  f" order of its {acked} acknowledged operations produces; {why}",
                   (agent_id,), tuple(shown) + ((born,) if born is not None else ()),
                   _overlapping(history, gone or own_ok, task_id, agent_id))


#: Beyond this many operations of one agent a report does not search which one's absence explains the outcome (each
#: candidate is a search of its own).
EXPLAIN_LIMIT = 200


def _explaining(calls: list[Call], start: AgentModel, step: Any, ends: Callable[[AgentModel], bool]) -> list[Op]:
    """The ok operations whose absence alone explains the outcome: the lost (or impossible) ones."""
    if len(calls) > EXPLAIN_LIMIT:
        return []
    by_id = {c.id: c.op for c in calls}
    return [by_id[i] for i in lost(calls, start, step, ends, strict_fail=False, budget=SEARCH_BUDGET)]


# --------------------------------------------------------------------------------------------------------------------
# 4. Limits and deduplication


def _terminators(history: History, spec: Spec, task_id: str, agent_id: str, session: str) -> list[Op]:
    """Operations that may have made *agent_id* no longer active."""
    born = next((op.invoke_ns for op in history.calls if op.name == "deploy" and op.outcome == "ok"
                 and op.result == agent_id), history.start_ns)
    killed = any(_takes_session(op, session, born) for op in history.ops)
    out = []
    for op in history.calls:
        if not _maybe(op) or not (op.task_id == task_id or (op.name == "reconcile"
                                                            and spec.rules.reconcile_scope == "registry")):
            continue
        finishes = op.name == "kill" or (op.name == "update" and not spec.rules.is_active(op.args.get("status")))
        if (op.agent_id == agent_id and finishes) or (op.name == "reconcile" and killed):
            out.append(op)
    return out


def limits(history: History, final: Final) -> list[Problem]:
    spec = final.judge
    problems = []
    for task_id, doc in final.tasks.items():
        deploys = [op for op in history.calls if op.name == "deploy" and op.task_id == task_id and _ok(op)]
        initial = _records(history.initial.get(task_id, {}))
        if "max_agents" in spec.promises:
            total, cap = len(initial) + len(deploys), doc.get("max_agents")
            if isinstance(cap, int) and total > cap:
                problems.append(Problem("limits", f"task {task_id}: {len(deploys)} ok deploys on {len(initial)}"
                                                  f" agents make {total}, over max_agents {cap}",
                                        tuple(op.result for op in deploys), tuple(deploys)))
        if "max_concurrent" in spec.promises:
            finishing = [op for op in history.calls if _maybe(op) and (op.task_id == task_id or op.name == "reconcile")
                         and (op.name in ("kill", "reconcile")
                              or (op.name == "update" and not spec.rules.is_active(op.args.get("status"))))]
            active = sum(1 for a in initial.values() if spec.rules.is_active(a.get("status"))) + len(deploys)
            cap = doc.get("max_concurrent")
            if not finishing and isinstance(cap, int) and active > cap:
                problems.append(Problem("limits", f"task {task_id}: {active} agents were active at once (nothing"
                                                  f" finished), over max_concurrent {cap}",
                                        tuple(op.result for op in deploys), tuple(deploys)))
        if "max_depth" in spec.promises and spec.rules.hierarchy:
            problems += _too_deep(spec, task_id, doc, deploys)
        if "unique_type" in spec.promises:
            problems += _duplicates(history, spec, task_id, deploys, initial, _records(doc))
    return problems


def _too_deep(spec: Spec, task_id: str, doc: dict[str, Any], deploys: list[Op]) -> list[Problem]:
    """Ok deploys whose agent sits below max_depth, by the chain of parents in the document (not stored depths)."""
    cap = doc.get("max_depth")
    if not isinstance(cap, int):
        return []
    depths = spec.depths(a for a in doc.get("agents", []) if isinstance(a, dict))
    problems = []
    for op in deploys:
        parent = op.args.get("parent", ORCHESTRATOR)
        depth = depths.get(op.result)
        if depth is None:  # the agent itself went missing: judge by its parent
            above = 0 if parent == ORCHESTRATOR else depths.get(parent)
            depth = None if above is None else above + 1
        if depth is not None and depth > cap:
            problems.append(Problem("limits", f"task {task_id}: agent {op.result} was deployed (ok) under {parent} at"
                                              f" depth {depth} by its chain of parents, over max_depth {cap}",
                                    (op.result,), (op,)))
    return problems


def _duplicates(history: History, spec: Spec, task_id: str, deploys: list[Op], initial: dict[str, dict[str, Any]],
                agents: dict[str, dict[str, Any]]) -> list[Problem]:
    """Ok deploys of one type with no way for one agent to have finished before another was deployed.

    One problem per type and overlapping group (the agents that were active together, directly or through one
    another), not one per pair.
    """

    def finished_before(agent_id: str, deadline: int) -> bool:
        session = spec.session_of(agents.get(agent_id) or {"id": agent_id})
        return any(t.invoke_ns < deadline for t in _terminators(history, spec, task_id, agent_id, session))

    problems = []
    by_type: dict[str, list[tuple[str, int]]] = defaultdict(list)  # type -> (agent, when its deploy completed)
    for agent_id, agent in initial.items():
        if spec.rules.is_active(agent.get("status")):
            by_type[agent.get("type", "")].append((agent_id, history.start_ns))
    for op in deploys:
        by_type[op.args.get("type", "")].append((op.result, op.complete_ns or history.end_ns))
    ops_of = {op.result: op for op in deploys}
    for agent_type, born in by_type.items():
        group = {a: a for a, _ in born}

        def root(a: str, group: dict[str, str] = group) -> str:
            while group[a] != a:
                a = group[a]
            return a

        for i, (a, a_done) in enumerate(born):
            for b, b_done in born[i + 1:]:
                if not finished_before(a, b_done) and not finished_before(b, a_done):
                    group[root(b)] = root(a)
        members: dict[str, list[str]] = defaultdict(list)
        for a, _ in born:
            members[root(a)].append(a)
        for together in (m for m in members.values() if len(m) > 1):
            ops = tuple(ops_of[x] for x in together if x in ops_of)
            window = (f" between {history.ms(min(op.invoke_ns for op in ops))} and"
                      f" {history.ms(max(op.complete_ns or history.end_ns for op in ops))} ms") if ops else ""
            problems.append(Problem(
                "duplicate", f"task {task_id} had {len(together)} active {agent_type} agents at once{window}:"
                             f" {', '.join(together)}; their deploys succeeded and none of them could have finished"
                             " before the next was deployed", tuple(together), ops))
    return problems


# --------------------------------------------------------------------------------------------------------------------
# 5. Task and global registries agree


def global_agreement(history: History, final: Final) -> list[Problem]:
    if final.glob is None:
        return []
    complete = set(final.glob.get("tasks") or {}) <= set(final.tasks)
    return [Problem("global_agreement", v.message, (v.agent_id,) if v.agent_id else ())
            for v in final.judge.global_violations(final.glob, final.tasks, complete=complete)]


# --------------------------------------------------------------------------------------------------------------------
# 6. Real concurrency happened


def real_concurrency(history: History, final: Final) -> list[Problem]:
    if history.concurrency < 2 or not history.calls:
        return []
    if history.schedule is not None and history.schedule.steps:  # the scheduler decided the interleaving
        return list(history.schedule.concurrency_problems())
    overlap = history.overlap()
    if overlap >= MIN_OVERLAP:
        return []
    return [Problem("inconclusive", f"only {overlap:.0%} of the operations overlapped another process's (need"
                                    f" {MIN_OVERLAP:.0%}): the run was nearly serial, so passing would prove nothing."
                                    " Give the workload more operations or more processes.")]


# --------------------------------------------------------------------------------------------------------------------
# 7. Crashes are findings: an exception the registry raised is not silent


def _errors_by_kind(ops: Iterable[Op]) -> dict[tuple[str, str], list[Op]]:
    """Operations that raised, grouped by (operation, exception type), in time order."""
    groups: dict[tuple[str, str], list[Op]] = defaultdict(list)
    for op in ops:
        if op.outcome == "info" and op.error_type is not None:
            groups[(op.name, op.error_type)].append(op)
    return groups


def describe_errors(ops: Iterable[Op]) -> list[str]:
    """One line per operation and exception type: ``deploy: 312 x JSONDecodeError: ... (myorch/reg.py:88)``."""
    out = []
    for (name, _etype), group in sorted(_errors_by_kind(ops).items(), key=lambda kv: -len(kv[1])):
        first = group[0]
        where = f" ({first.where})" if first.where else ""
        declared = " [declared in expected_errors]" if all(op.expected for op in group) else ""
        out.append(f"{name}: {len(group)} x {(first.error or '')[:160]}{where}{declared}")
    return out


def crashes(history: History, final: Final) -> list[Problem]:
    """Each kind of exception the registry raised and did not declare: ``torn_read`` for a parse error of a registry
    file (a reader saw a partial file), ``crash`` for anything else.  They stay ``info`` for every other check."""
    problems = []
    for (name, etype), group in _errors_by_kind(op for op in history.calls if op.crashed).items():
        first = group[0]
        where = f" at {first.where}" if first.where else ""
        if etype in PARSE_ERRORS:
            problems.append(Problem("torn_read", f"{name} raised {etype} in {len(group)} of"
                                                 f" {sum(1 for op in history.calls if op.name == name)} calls{where}:"
                                                 f" a reader saw a registry file that was not whole. First: "
                                                 f"{(first.error or '')[:200]}", (), tuple(group[:5])))
        else:
            problems.append(Problem("crash", f"{name} raised {etype} in {len(group)} of"
                                             f" {sum(1 for op in history.calls if op.name == name)} calls{where}:"
                                             f" {(first.error or '')[:200]}. A registry that throws under concurrency"
                                             " is broken for its users; if this exception is raised by design when"
                                             " an outcome is unknown, declare it: expected_errors ="
                                             f" ({etype},)", (), tuple(group[:5])))
    return problems


# --------------------------------------------------------------------------------------------------------------------
# 8. No leaked session: every live session is one an agent record names


def session_leaks(history: History, final: Final) -> list[Problem]:
    """Live sessions that no agent record of any task names and that were not there before the swarm: one problem,
    listing them, with the deploys that did not succeed while they appeared (tmux dates a session to the second)."""
    if final.sessions is None:
        return []
    spec = final.judge
    named = {spec.session_of(a) for doc in [*final.tasks.values(), *history.initial.values()]
             for a in doc.get("agents", []) if isinstance(a, dict)}
    leaked = sorted(set(final.sessions) - named - final.sessions_before)
    if not leaked:
        return []
    cut_short = [op for op in history.calls if op.name == "deploy" and op.complete_ns is None]
    if cut_short and len(leaked) <= len(cut_short):
        return []  # deploys cut short by a fault (SIGKILL) may leave their sessions: nobody was left to clean up
    times = [t for t in (_appeared_ns(final, name) for name in leaked) if t is not None]
    suspects = [op for op in history.calls if op.name == "deploy" and op.outcome != "ok"
                and (not times or any(op.invoke_ns - 1_000_000_000 <= t <= (op.complete_ns or history.end_ns)
                                      + 1_000_000_000 for t in times))]
    shown = ", ".join(leaked[:12]) + (f" and {len(leaked) - 12} more" if len(leaked) > 12 else "")
    why = f"; {len(suspects)} deploys failed or raised meanwhile (below)" if suspects else ""
    return [Problem("session_leak", f"{len(leaked)} tmux session{'s are' if len(leaked) != 1 else ' is'} alive that"
                                    f" no agent record of any task names: {shown}{why}", (), tuple(suspects))]


def _appeared_ns(final: Final, session: str) -> int | None:
    """When *session* was created, on the history's clock (tmux says it to the second)."""
    if final.clock is None or final.sessions is None:
        return None
    created = final.sessions.get(session) if isinstance(final.sessions, dict) else None
    if not created:
        return None
    wall, mono = final.clock
    return mono + int((created - wall) * 1e9)


# --------------------------------------------------------------------------------------------------------------------
# 9. The operations a test exercises did work


def exercised(history: History, final: Final, operations: Sequence[str], *, at_least: int = 0) -> list[Problem]:
    """``inconclusive`` when an operation of *operations* never returned ok, when reconcile never reaped an agent
    whose session the workload had killed, or when fewer than *at_least* operations succeeded: a test proves nothing
    about an operation it never saw work."""
    problems = []
    errors = describe_errors(history.calls)
    shown = ("; errors: " + "; ".join(errors[:6])) if errors else ""
    for name in operations:
        calls = [op for op in history.calls if op.name == name]
        if calls and not any(_ok(op) for op in calls):
            mine = describe_errors(calls)
            fails = sorted({(op.error or "")[:100] for op in calls if op.outcome == "fail"})[:3]
            problems.append(Problem("inconclusive", f"{name} never returned ok in {len(calls)} calls, so this test"
                                                    f" proves nothing about it"
                                                    + (f"; it raised: {'; '.join(mine)}" if mine else "")
                                                    + (f"; refusals: {'; '.join(fails)}" if fails else ""),
                                    (), tuple(calls[:5])))
    if "reconcile" in operations and final.judge.rules.reaped and not problems:
        problems += _never_reaped(history, final)
    ok = history.count("ok")
    if ok < at_least:
        problems.append(Problem("inconclusive", f"only {ok} of {len(history.calls)} operations succeeded (needed"
                                                f" {at_least}); the registry refused or lost the rest, so this run"
                                                f" checks nothing{shown}"))
    return problems


def _never_reaped(history: History, final: Final) -> list[Problem]:
    spec = final.judge
    lost_sessions = [op for op in history.ops if op.name in ("tmux_kill", "tmux_server_sigkill") and _ok(op)]
    reconciles = [op for op in history.calls if op.name == "reconcile" and _ok(op)]
    if not lost_sessions or not reconciles:
        return []
    for task_id, doc in final.tasks.items():
        by_agent, _ = _agent_ops(history, spec, task_id)
        for agent_id, record in _records(doc).items():
            reaped = record.get("status") == spec.rules.reaped_to
            if not reaped:
                continue
            session = spec.session_of(record)
            others = [op for op in by_agent.get(agent_id, []) if _maybe(op) and (
                op.name == "kill" or op.args.get("status") == spec.rules.reaped_to)]
            if not others and any(_takes_session(op, session, history.start_ns) for op in lost_sessions):
                return []
    return [Problem("inconclusive", f"reconcile returned ok {len(reconciles)} times after the workload killed"
                                    f" {len(lost_sessions)} sessions, but no agent ends reaped to"
                                    f" {spec.rules.reaped_to!r} by it: nothing shows reconcile reaps",
                    (), tuple(reconciles[:5]))]


Check = Callable[[History, Final], list[Problem]]
CHECKS: dict[str, Check] = {
    "invariants": invariants,
    "lost_inserts": lost_inserts,
    "lost_updates": lost_updates,
    "limits": limits,
    "global_agreement": global_agreement,
    "real_concurrency": real_concurrency,
    "crashes": crashes,
    "session_leaks": session_leaks,
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

    def render(self, *, full: bool = False) -> str:
        """The report; *full* shows every problem and every operation of each (``-vv``), else the first 20 and 12."""
        h = self.history
        head = (f"orch: {len(self.problems)} problem{'s' if len(self.problems) != 1 else ''} against {h.impl},"
                f" {h.concurrency} processes x {h.ops_per_process} ops, seed {h.seed}: {h.count('ok')} ok,"
                f" {h.count('fail')} fail, {h.count('info')} info")
        lines = [head]
        by_check: dict[str, list[Problem]] = defaultdict(list)
        for problem in self.problems:
            by_check[problem.check].append(problem)
        for check, found in by_check.items():
            agents = sorted({a for p in found for a in p.agents if a})
            named = f": {', '.join(agents[:8])}{' ...' if len(agents) > 8 and not full else ''}" if agents else ""
            lines.append(f"  {check}: {len(found)}{named}")
        errors = describe_errors(h.calls)
        if errors:
            lines.append("\nexceptions raised (info outcomes), by operation and type:")
            lines += [f"  {e}" for e in errors]
        faults = self.faults(limit=None if full else 30)
        if faults:
            lines.append("\nfaults injected, in time order, and the operations they hit:")
            lines += faults
        shown = self.problems if full else self.problems[:20]
        for problem in shown:
            lines.append(f"\n[{problem.check}] {problem.message}")
            if problem.ops:
                lines.append("  timeline (ms from the swarm's start):")
                lines.append(h.timeline(problem.ops, limit=None if full else 12))
            if problem.context:
                lines.append("  writes by other processes to the same task that overlapped it:")
                lines.append(h.timeline(problem.context, limit=None if full else 8))
        if len(self.problems) > len(shown):
            lines.append(f"\n... and {len(self.problems) - len(shown)} more problems (-vv shows every one)")
        lines += [f"\nnote: {n}" for n in self.notes]
        if self.replay:
            lines.append(f"\nreplay: {self.replay}")
        return "\n".join(lines)

    def faults(self, limit: int | None = 30) -> list[str]:
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


class OrchViolation(OrchFailure):
    """A swarm broke a promise of the registry; the message is the report."""

    def __init__(self, report: Report, *, full: bool = False) -> None:
        super().__init__(report.render(full=full))
        self.report = report


def check_history(history: History, final: Final, *, checks: Sequence[str] | None = None,
                  replay: str = "", exercises: Sequence[str] = (), at_least: int = 0) -> Report:
    """Run *checks* (default: all of :data:`CHECKS`) and return the Report; it does not raise.

    *exercises* names the operations the test exists to exercise, and *at_least* how many operations must succeed:
    see :func:`exercised`.
    """
    spec = final.judge
    notes = []
    if final.glob is None and "global" not in final.errors:
        notes.append("read_global returned None: the global registry checks were skipped")
    missing = sorted(ALL_PROMISES - spec.promises)
    if missing:
        notes.append(f"the registry does not promise {', '.join(missing)}: those checks were skipped")
    if not spec.rules.counters:
        notes.append("the registry stores no counters (Rules(counters=False)): the count checks were skipped")
    differences = spec.rules.differences()
    if differences or type(spec) is not Spec:
        notes.append(f"judged by {type(spec).__name__} with the rules the registry declares:"
                     f" Rules({', '.join(differences)})")
    problems: list[Problem] = []
    for name in checks or list(CHECKS):
        problems += CHECKS[name](history, final)
    problems += exercised(history, final, exercises, at_least=at_least)
    notes += [p.message for p in problems if p.check == "unchecked"]
    return Report(history, tuple(p for p in problems if p.check != "unchecked"), tuple(notes), replay)
