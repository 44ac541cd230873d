"""Hypothesis stateful testing of a registry: a pure model next to the real thing, and concurrent bursts checked for
linearizability.

:class:`RegistryMachine` drives a :class:`~pytest_orch.adapter.RegistryAdapter` (the one ``--orch-impl`` names) and
:class:`Specification`, a pure model of what a registry must do, side by side.  Its rules create tasks, deploy agents
(top-level, and as children of known agents drawn from the ``agents`` Bundle), update them to every status (the
illegal transitions too, which must be refused), kill them, kill their tmux sessions behind the registry's back and
reconcile.  The ``burst`` rule draws 2..N operations and runs them at the same instant in N worker processes
(:mod:`pytest_orch.burst`); the outcome is accepted only if some order of the burst that respects real time and the
ok/fail/info outcomes, applied to the model, leaves exactly the documents the registry holds
(:func:`pytest_orch.linearize.linearize`).  After every step the documents must equal the model's prediction and
every registry invariant must hold.

A serial step is the special case of a burst of one, checked by the same code.

Handles, not ids.  The registry picks agent and task ids at random, so the model names agents by *handles* (``a0``,
``a1``...; tasks ``t0``...) given in the order the operations were drawn, and the machine keeps the handle -> id map.
Every Bundle holds handles whose existence depends only on the drawn program, never on process timing (a refused
deploy's handle stays in the Bundle and stands for an agent the registry does not know), so Hypothesis replays and
shrinks a program the same way whatever the timing did.  Timing decides only outcomes.

Timing.  Process timing is the one input Hypothesis does not control.  A burst that fails is re-run from the same
start (workspace and tmux sessions restored) and counts as failing only if it fails in most of its runs, so that what
Hypothesis shrinks reproduces; the report says how often it failed.  The verdict on each check of a program is fixed
the first time that program runs, so Hypothesis sees the same program behave the same way while it shrinks and when
it replays the result.  See :meth:`RegistryMachine.run_burst` and :meth:`RegistryMachine.check`.

Scheduling.  With ``--orch-schedule=random|pct[:DEPTH]`` (:mod:`pytest_orch.schedule`) timing is taken out of it:
the burst's workers take turns at every file-system event, in an order the scheduler picks.  The burst rule draws
the schedule with the operations, so it is part of the program: with ``pct`` the operations' order in the burst is
their PCT priority and each comes with the step of its own after which that priority drops
(:class:`~pytest_orch.schedule.Turn`), so that Hypothesis shrinks a failing burst to fewer operations and fewer
priority changes while the rest keep their interleaving; with ``random`` the burst draws the scheduler's seed.  The
same example replays the same interleaving, so a burst whose schedule the scheduler alone decided runs once, and its
report prints the steps it took.

Subclass it to add rules, and run it with :func:`run_machine` (or ``MyMachine.TestCase``)::

    class MyMachine(RegistryMachine):
        @rule(task=RegistryMachine.tasks)
        def reconcile_twice(self, task):
            self.run_serial(Command("reconcile", task))
            self.run_serial(Command("reconcile", task))

    def test_my_registry():
        run_machine(MyMachine)          # pytest --orch-impl=myorch.testing:adapter
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import os
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, Phase, currently_in_test_context, note, settings
from hypothesis import core as hypothesis_core
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

from . import options
from .adapter import load_factory, promises_of
from .burst import MAX_WORKERS, Op, Record, shared_pool, timed
from .conformance import verdict_for
from .errors import OrchFailure
from .linearize import Applied, Call, Search, linearize, lost
from .options import orch_args
from .replay import current_test, replay_command
from .schedule import EVENTS_PER_OP, ScheduleRun, ScheduleSpec, Turn
from .spec import (
    ALL_PROMISES,
    ORCHESTRATOR,
    AgentModel,
    Command,
    RegistryModel,
    Rules,
    Spec,
    TaskModel,
    spec_of,
)
from .tmux import QUIET_AGENT_COMMAND, kill_server, kill_session, private_env
from .tmux import apply as apply_env

__all__ = ["AGENT_TYPES", "AgentModel", "BurstFailure", "Command", "LostUpdate", "ModelMismatch", "RegistryMachine",
           "RegistryModel", "Specification", "StepFailure", "TaskModel", "Verdict", "close_tmux_server",
           "machine_settings", "register_profiles", "run_machine", "select_profile"]

#: Few types, so that deduplication has something to refuse.
AGENT_TYPES = ("investigator", "builder", "fixer", "tester")
#: A status outside every vocabulary, drawn beside the registry's own: refused, or stored (``unknown_status``).
UNKNOWN_STATUS = "paused"
#: Operations a burst draws from, the ones Hypothesis shrinks towards first.
BURST_KINDS = ("update", "deploy", "kill", "reconcile", "lose_session")
#: The first task: generous limits, and two agents from the start (see RegistryMachine.first_agents).
FIRST_TASK_LIMITS = (20, 10, 4)
FIRST_AGENTS = ("investigator", "builder")
#: Limits of further tasks: generous ones first (what Hypothesis shrinks towards), then small ones that bind.
MAX_AGENTS = (20, 1, 2, 3, 5)
MAX_CONCURRENT = (10, 1, 2, 3)
MAX_DEPTH = (4, 1, 2, 3)
KEEPALIVE_SESSION = "orch-keepalive"
#: The limits of a task, in the order the views show them.
LIMITS = ("max_agents", "max_concurrent", "max_depth")

# --------------------------------------------------------------------------------------------------------------------
# Settings profiles


def register_profiles() -> None:
    """Register the Hypothesis profiles ``dev`` (fast), ``ci`` (more, derandomized) and ``soak`` (long).

    All three have no deadline: a registry step waits on locks and fsync, which no deadline should judge.  Call it at
    import time (the plugin does); registering again is harmless.
    """
    quiet = [HealthCheck.too_slow]
    # The explain phase re-runs the failing example under a line tracer: minutes for a search-heavy burst.
    phases = [p for p in Phase if p is not Phase.explain]
    settings.register_profile("dev", max_examples=10, stateful_step_count=10, deadline=None,
                              suppress_health_check=quiet, phases=phases)
    settings.register_profile("ci", max_examples=100, stateful_step_count=8, deadline=None, derandomize=True,
                              print_blob=True, suppress_health_check=quiet, phases=phases)
    settings.register_profile("soak", max_examples=500, stateful_step_count=40, deadline=None, print_blob=True,
                              suppress_health_check=quiet, phases=phases)


def select_profile(config: pytest.Config) -> str | None:
    """Load ``ci`` when the ``CI`` environment variable is set and ``--hypothesis-profile`` was not given.

    Set means present, whatever its value, as Hypothesis itself decides (it loads its own ``ci`` profile then, which
    :func:`register_profiles` replaces).  The plugin calls it from ``pytest_configure``.  Returns the profile it
    loaded, or None.
    """
    if config.getoption("hypothesis_profile", None):
        return None
    if "CI" not in os.environ:
        return None
    register_profiles()
    settings.load_profile("ci")
    return "ci"


def machine_settings() -> settings:
    """The settings :func:`run_machine` uses: the loaded profile (``dev`` when none was chosen), with no deadline."""
    register_profiles()
    current = settings.get_current_profile_name()
    base = settings.get_profile("dev") if current == "default" else settings()
    phases = [p for p in base.phases if p is not Phase.explain]
    # One failure is shrunk, not one per exception type: the kinds of failure of a burst vary with timing.
    return settings(base, deadline=None, suppress_health_check=list(HealthCheck), phases=phases,
                    report_multiple_bugs=False)


def run_machine(machine: type[RegistryMachine], *, settings: settings | None = None) -> None:
    """Run *machine* as a Hypothesis test with :func:`machine_settings` (or *settings*).

    Raises what Hypothesis raises (the shrunk failure), or BurstFailure for a burst that failed too rarely to shrink.
    A first pass looks for a lost update, setting other reliable burst failures aside for a while (see
    :attr:`RegistryMachine.lost_first_seconds`); if it ends with one set aside and no failure shrunk, a second pass
    with the same seed (the same programs) takes the first failure of any kind and shrinks it.
    """
    verdict = verdict_for(machine.impl or options.current().impl)
    if not verdict.rules_hold:
        first = verdict.mismatches[0] if verdict.mismatches else verdict.error
        pytest.skip(f"the registry does not follow its declared rules (see test_the_registry_does_what_its_rules_say):"
                    f" [contract] {first}")
    forced: int | None = hypothesis_core.global_force_seed  # --hypothesis-seed, if given
    seed = forced if forced is not None else random.randrange(2**32)
    machine._started = time.monotonic()
    for lost_first in (True, False):
        _reset(machine, lost_first)
        # Hypothesis' own pytest plugin sets this for --hypothesis-seed: the same seed replays the same programs.
        setattr(hypothesis_core, "global_force_seed", seed)  # noqa: B010 - typed as None in hypothesis
        try:
            run_state_machine_as_test(machine, settings=settings or machine_settings())
        except Exception as exc:  # a failure (pytest's skip and fail outcomes are BaseExceptions and pass through)
            if machine._shrink_stopped:
                exc.add_note(f"(shrinking stopped after {machine.shrink_seconds:g} s with smaller programs still"
                             " untried: set ORCH_SHRINK_SECONDS or RegistryMachine.shrink_seconds higher for a"
                             " smaller one)")
            exc.add_note(_replay_note(machine, seed))
            raise
        finally:
            setattr(hypothesis_core, "global_force_seed", forced)  # noqa: B010
            close_tmux_server()
        if not _aside.pop(machine, []):
            break
        options.progress(f"stateful {machine.__name__}: no lost update found; the same programs again, to shrink the"
                         " first failure of another kind")
    rare = _rare.pop(machine, [])
    if rare:
        failure = BurstFailure("Hypothesis found no burst that fails reliably, but this one did fail:\n\n" + rare[0])
        if len(rare) > 1:
            failure.add_note(f"({len(rare) - 1} more bursts failed as rarely.)")
        failure.add_note(_replay_note(machine, seed))
        raise failure


def _reset(machine: type[RegistryMachine], lost_first: bool) -> None:
    """Forget every verdict of an earlier run of *machine*."""
    machine._failure_seen = machine._lost_seen = machine._shrink_stopped = False
    machine._lost_ops = 0
    machine._failure_at = machine._aside_at = None
    machine._lost_first = lost_first
    machine._programs = machine._bursts = 0
    machine._told = time.monotonic()
    for key in [k for k in _verdicts if k[0] is machine]:
        del _verdicts[key]
    _rare.pop(machine, None)
    _aside.pop(machine, None)


def _replay_note(machine: type[RegistryMachine], seed: int) -> str:
    """The seed of the run and the command that replays it (the same programs; process timing aside)."""
    opts = replace(options.current(), impl=machine.impl or options.current().impl)
    args = [*orch_args(opts), f"--hypothesis-seed={seed}",
            f"--hypothesis-profile={settings.get_current_profile_name()}"]
    test = current_test()
    line = replay_command(*test, args) if test is not None else "pytest <this test> " + " ".join(args)
    return f"hypothesis seed {seed}\nreplay: {line}"


# --------------------------------------------------------------------------------------------------------------------
# The model


class Specification(Spec):
    """:class:`~pytest_orch.spec.Spec` made from *promises* and *rules* in that order (kept for code written against
    the machine's own model before the specification moved to :mod:`pytest_orch.spec`)."""

    def __init__(self, promises: frozenset[str] = ALL_PROMISES, rules: Rules | None = None) -> None:
        super().__init__(rules or Rules(), promises)


def update_statuses(rules: Rules) -> tuple[str, ...]:
    """The statuses the machine sends updates to: active ones first (Hypothesis shrinks towards them), then the
    terminal and refused ones of the registry's vocabulary, then one outside it."""
    r = rules
    order = sorted(r.commanded & r.active) + sorted(r.commanded - r.active)
    return (*order, UNKNOWN_STATUS)


@st.composite
def burst_commands(draw: st.DrawFn, task: str, known: tuple[str, ...], rules: Rules | None = None) -> Command:
    """One operation of a burst on *task*, on one of the *known* agent handles (a deploy's handle comes later)."""
    rules = rules or Rules()
    kind = draw(st.sampled_from(BURST_KINDS if known else ("deploy", "reconcile")))
    return _command(draw, kind, task, known, rules)


@st.composite
def scheduled_burst_commands(draw: st.DrawFn, task: str, known: tuple[str, ...],
                             rules: Rules | None = None) -> tuple[Command, Turn]:
    """One operation of a burst under PCT, with its turn: the number of its own steps after which its priority drops
    (0: never); its priority is its place in the burst (the first runs first).

    The kind and the drop are one choice, so that an operation and its turn stay within five choices (an update's
    other three, and the list's own): Hypothesis's shrinker deletes at most five consecutive choices at once, and
    with a sixth it could no longer take out an operation between the two that race.  An update's progress is at
    least 1: every agent starts at 0, and an update to 0 that is lost shows nothing, so a burst shrunk to it needs a
    third operation (an earlier update) to show the loss where two would do."""
    rules = rules or Rules()
    kinds = BURST_KINDS if known else ("deploy", "reconcile")
    kind, drop = draw(st.sampled_from([(k, d) for d in range(EVENTS_PER_OP + 1) for k in kinds]))
    return _command(draw, kind, task, known, rules, least_progress=1), Turn(0, drop)


def _command(draw: st.DrawFn, kind: str, task: str, known: tuple[str, ...], rules: Rules,
             least_progress: int = 0) -> Command:
    if kind == "deploy":
        parents = (ORCHESTRATOR, *known) if rules.hierarchy else (ORCHESTRATOR,)
        return Command("deploy", task, "", draw(st.sampled_from(AGENT_TYPES)), parent=draw(st.sampled_from(parents)))
    if kind == "reconcile":
        return Command("reconcile", task)
    agent = draw(st.sampled_from(known))
    if kind == "update":
        return Command("update", task, agent, status=draw(st.sampled_from(update_statuses(rules))),
                       progress=draw(st.integers(least_progress, 100)))
    return Command(kind, task, agent)


# --------------------------------------------------------------------------------------------------------------------
# What the registry holds, and what the model predicts, in one comparable shape


@dataclass(frozen=True)
class Snapshot:
    """The documents (by real task id), the global document (None if the registry keeps none) and live sessions."""

    tasks: Mapping[str, Mapping[str, Any]]
    glob: Mapping[str, Any] | None
    alive: frozenset[str]
    #: Documents that could not be read or do not have the expected shape: task id (or "global") -> why.
    errors: Mapping[str, str] = field(default_factory=dict)


def _session_of(agent: Mapping[str, Any], rules: Rules | None = None) -> str:
    return Spec(rules or Rules()).session_of(agent)


@dataclass(frozen=True)
class Naming:
    """Real ids <-> handles.  Ids the machine does not know are shown as ``?``."""

    task_handles: Mapping[str, str]  # task id -> handle
    agent_handles: Mapping[str, str]  # agent id -> handle

    def agent(self, agent_id: object) -> str:
        if agent_id == ORCHESTRATOR:
            return ORCHESTRATOR
        return self.agent_handles.get(str(agent_id), "?")

    def task(self, task_id: object) -> str:
        return self.task_handles.get(str(task_id), "?")


@dataclass(frozen=True)
class ViewOptions:
    """What the documents and the model are compared on.

    ``limits``: the limits compared (those the registry promises); ``agent_hierarchy``: the documents have
    one (it is optional everywhere); the rest follows the registry's declared ``rules``.
    """

    progress: bool = True
    sessions: bool = True
    has_global: bool = True
    rules: Rules = field(default_factory=Rules)
    limits: frozenset[str] = frozenset({"max_agents", "max_concurrent", "max_depth"})
    agent_hierarchy: bool = True

    def limit_values(self, limits: tuple[Any, Any, Any]) -> tuple[Any, ...]:
        return tuple(v if k in self.limits else None for k, v in zip(LIMITS, limits, strict=True))

    def active(self, status: object) -> bool:
        return self.rules.is_active(status)

    def counters(self, agents: Sequence[AgentModel]) -> tuple[Any, ...] | None:
        return Spec(self.rules).counters(agents) if self.rules.counters else None


AgentRow = tuple[str, str, str, Any, str, int, str]  # handle, type, parent, depth, status, progress, session


def _session_mark(active: bool, alive: bool, opts: ViewOptions) -> str:
    if not (opts.sessions and active):
        return "-"
    return "alive" if alive else "gone"


def observed_view(snap: Snapshot, naming: Naming, opts: ViewOptions) -> tuple[Any, ...]:
    """The documents in the model's terms, as a comparable value (see :func:`model_view`).

    A document that could not be read, or is not shaped as expected, appears as ``("unreadable", why)`` in place of
    its limits, which no model state matches.
    """
    tasks = []
    for task_id, doc in snap.tasks.items():
        if task_id in snap.errors:
            tasks.append((naming.task(task_id), ("unreadable", snap.errors[task_id]), None, (), None))
            continue
        try:
            tasks.append(_task_view(task_id, doc, snap, naming, opts))
        except Exception as exc:
            tasks.append((naming.task(task_id), ("unreadable", f"{type(exc).__name__}: {exc}"), None, (), None))
    glob: Any = None
    if "global" in snap.errors:
        glob = ("unreadable", snap.errors["global"])
    elif opts.has_global and snap.glob is not None:
        try:
            glob = _global_view(snap.glob, naming, opts)
        except Exception as exc:
            glob = ("unreadable", f"{type(exc).__name__}: {exc}")
    return tuple(sorted(tasks, key=repr)), glob


def _task_view(task_id: str, doc: Mapping[str, Any], snap: Snapshot, naming: Naming,
               opts: ViewOptions) -> tuple[Any, ...]:
    rows: list[AgentRow] = []
    r = opts.rules
    for a in doc.get("agents", []):
        status = str(a.get("status"))
        if status in r.hidden:
            continue  # a tombstone reads as absent
        hier = r.hierarchy
        rows.append((naming.agent(a.get("id")), str(a.get("type")),
                     naming.agent(a.get("parent", ORCHESTRATOR)) if hier else ORCHESTRATOR,
                     a.get("depth") if hier else None, status,
                     int(a.get("progress", 0) or 0) if opts.progress and r.progress else -1,
                     _session_mark(opts.active(status), _session_of(a, r) in snap.alive, opts)))
    hierarchy = doc.get("agent_hierarchy")
    pairs = None if not (opts.agent_hierarchy and isinstance(hierarchy, dict)) else tuple(sorted(
        (naming.agent(p), naming.agent(c)) for p, cs in hierarchy.items() for c in (cs or [])))
    limits = opts.limit_values((doc.get("max_agents"), doc.get("max_concurrent"), doc.get("max_depth")))
    counters = None
    if r.counters:
        counters = (doc.get("total_spawned"), doc.get("active_count"),
                    doc.get("completed_count") if r.completed_count is not None else None)
    return (naming.task(task_id), limits, counters, tuple(sorted(rows, key=repr)), pairs)


def _global_view(g: Mapping[str, Any], naming: Naming, opts: ViewOptions) -> tuple[Any, ...]:
    r = opts.rules
    gagents = tuple(sorted(((naming.agent(aid), naming.task(a.get("task_id")), str(a.get("type")),
                             naming.agent(a.get("parent", ORCHESTRATOR)) if r.hierarchy else ORCHESTRATOR,
                             str(a.get("status")))
                            for aid, a in (g.get("agents") or {}).items() if a.get("status") not in r.hidden),
                           key=repr))
    totals = (g.get("total_tasks"), g.get("total_agents_spawned"), g.get("active_agents")) if r.counters else None
    return (tuple(sorted(naming.task(t) for t in (g.get("tasks") or {}))), gagents, totals)


def model_view(state: RegistryModel, known: frozenset[str] | set[str], opts: ViewOptions) -> tuple[Any, ...]:
    """What the model predicts the documents hold.  Agents whose handle has no known id yet appear as ``?``."""

    def key(handle: str) -> str:
        return handle if handle == ORCHESTRATOR or handle in known else "?"

    tasks = []
    r = opts.rules
    hier = r.hierarchy
    for t in state.tasks:
        rows = tuple(sorted(((key(a.handle), a.type, key(a.parent) if hier else ORCHESTRATOR,
                              a.depth if hier else None, a.status, a.progress if opts.progress and r.progress else -1,
                              _session_mark(opts.active(a.status), a.session, opts))
                             for a in t.agents if a.status not in r.hidden), key=repr))
        pairs = tuple(sorted((key(a.parent), key(a.handle)) for a in t.agents)) if opts.agent_hierarchy else None
        limits = opts.limit_values((t.max_agents, t.max_concurrent, t.max_depth))
        tasks.append((t.handle, limits, opts.counters(t.agents), rows, pairs))
    glob = None
    if opts.has_global:
        gagents = tuple(sorted(((key(a.handle), t.handle, a.type, key(a.parent) if hier else ORCHESTRATOR, a.status)
                                for t in state.tasks for a in t.agents if a.status not in r.hidden), key=repr))
        totals = (len(state.tasks), sum(len(t.agents) for t in state.tasks),
                  sum(opts.active(a.status) for t in state.tasks for a in t.agents)) if r.counters else None
        glob = (tuple(sorted(t.handle for t in state.tasks)), gagents, totals)
    return tuple(sorted(tasks, key=repr)), glob


def pruner(observed: tuple[Any, ...], known: frozenset[str], opts: ViewOptions, parts: tuple[int, ...] = (0, 1)) -> Any:
    """A ``prune`` for :func:`~pytest_orch.linearize.linearize`: True for a state no continuation can turn into
    *observed* (its *parts*: 0 the task documents, 1 the global one).  Agents never disappear; their type, parent
    and depth never change; a terminal agent never changes.
    """
    rows: dict[tuple[str, str], AgentRow] = {}
    if 0 in parts:
        for task in observed[0]:
            if task[1] and task[1][0] == "unreadable":
                return lambda state: True
            rows.update({(task[0], row[0]): row for row in task[3] if row[0] != "?"})
    grows: dict[str, tuple[str, ...]] = {}
    if 1 in parts and observed[1] is not None:
        if observed[1][0] == "unreadable":
            return lambda state: True
        grows = {row[0]: row for row in observed[1][1] if row[0] != "?"}

    def parent_key(a: AgentModel) -> str:
        return a.parent if a.parent in known or a.parent == ORCHESTRATOR else "?"

    seen: dict[RegistryModel, bool] = {}

    def prune(state: RegistryModel) -> bool:
        verdict = seen.get(state)
        if verdict is None:
            verdict = seen[state] = contradicts(state)
        return verdict

    r = opts.rules
    frozen_when_done = r.terminal_is_final and r.kill_of_terminal != "applied" and not r.hidden \
        and r.unknown_status == "refused"

    def contradicts(state: RegistryModel) -> bool:
        for t in state.tasks:
            for a in t.agents:
                if a.handle not in known or r.hidden:
                    continue  # with tombstones an agent may vanish: nothing to prune on
                if 0 in parts:
                    row = rows.get((t.handle, a.handle))
                    if row is None or row[1:4] != (a.type, parent_key(a) if r.hierarchy else ORCHESTRATOR,
                                                   a.depth if r.hierarchy else None):
                        return True
                    if frozen_when_done and not opts.active(a.status) and row[4:6] != (
                            a.status, a.progress if opts.progress and r.progress else -1):
                        return True
                if grows:
                    grow = grows.get(a.handle)
                    if grow is None or grow[1:4] != (t.handle, a.type, parent_key(a) if r.hierarchy
                                                     else ORCHESTRATOR):
                        return True
                    if frozen_when_done and not opts.active(a.status) and grow[4] != a.status:
                        return True
        return False

    return prune


def _fmt_row(row: AgentRow) -> str:
    handle, type_, parent, depth, status, progress, session = row
    bits = [f"{handle} {type_} {status}", f"parent {parent}", f"depth {depth}"]
    if progress != -1:
        bits.append(f"progress {progress}")
    if session != "-":
        bits.append(f"session {session}")
    return ", ".join(bits)


def diff_views(want: tuple[Any, ...], have: tuple[Any, ...]) -> list[str]:
    """Readable differences between the model's view (*want*) and the documents' (*have*)."""
    out = []
    want_tasks = {t[0]: t for t in want[0]}
    have_tasks = {t[0]: t for t in have[0]}
    for handle in sorted(set(want_tasks) | set(have_tasks)):
        w, h = want_tasks.get(handle), have_tasks.get(handle)
        if w is None or h is None:
            out.append(f"task {handle}: {'missing from the documents' if h is None else 'not in the model'}")
            continue
        if h[1] and h[1][0] == "unreadable":
            out.append(f"task {handle}: the document could not be read: {h[1][1]}")
            continue
        for label, i in (("limits (max_agents, max_concurrent, max_depth)", 1),
                         ("counters (total_spawned, active_count, completed_count)", 2)):
            if w[i] != h[i]:
                out.append(f"task {handle} {label}: model {w[i]}, documents {h[i]}")
        w_rows, h_rows = list(w[3]), list(h[3])
        for row in list(w_rows):
            if row in h_rows:
                w_rows.remove(row)
                h_rows.remove(row)
        h_by = {r[0]: r for r in h_rows if r[0] != "?"}
        for row in w_rows:
            other = h_by.pop(row[0], None) if row[0] != "?" else None
            if other is not None:
                h_rows.remove(other)
                out.append(f"task {handle} agent: model {_fmt_row(row)}; documents {_fmt_row(other)}")
            else:
                out.append(f"task {handle} agent missing from the documents: {_fmt_row(row)}")
        out.extend(f"task {handle} agent the model does not expect: {_fmt_row(r)}" for r in h_rows)
        if h[4] is not None and w[4] != h[4]:
            missing = sorted(set(w[4]) - set(h[4]))
            extra = sorted(set(h[4]) - set(w[4]))
            out.append(f"task {handle} agent_hierarchy (parent, child): missing {missing}, unexpected {extra}")
    if have[1] is not None and have[1][0] == "unreadable":
        out.append(f"global: the document could not be read: {have[1][1]}")
    elif want[1] is not None and have[1] is not None and want[1] != have[1]:
        (wt, wa, wn), (ht, ha, hn) = want[1], have[1]
        if wt != ht:
            out.append(f"global tasks: model {list(wt)}, documents {list(ht)}")
        for row in sorted(set(wa) - set(ha), key=repr):
            out.append(f"global agent missing or different: model has {row}")
        for row in sorted(set(ha) - set(wa), key=repr):
            out.append(f"global agent the model does not expect: {row}")
        if wn != hn:
            out.append(f"global totals (total_tasks, total_agents_spawned, active_agents): model {wn}, documents {hn}")
    return out


# --------------------------------------------------------------------------------------------------------------------
# Failures


class ModelMismatch(OrchFailure):
    """The registry's documents are not what the model predicts, or a registry invariant is broken."""


class StepFailure(ModelMismatch):
    """One operation, run alone, did something the model does not allow."""


class BurstFailure(ModelMismatch):
    """A burst's outcome has no linearization: no order of its operations explains it."""


class LostUpdate(BurstFailure):
    """A burst with no linearization, whose documents are explained if an operation that returned ok never ran."""


@dataclass
class _Memo:
    """The verdict on one check of one program, fixed at its first run, and how often it failed since."""

    failure: type[ModelMismatch] | None
    report: str = ""
    runs: int = 0
    failures: int = 0

    def exception(self) -> ModelMismatch:
        assert self.failure is not None
        return self.failure(self.report.replace("{RUNS}", f"it failed in {self.failures} of {self.runs} runs"))


#: (machine class, impl, program, check) -> its verdict; see RegistryMachine.check.
_verdicts: dict[tuple[Any, ...], _Memo] = {}
#: machine class -> reports of bursts that failed, but too rarely to shrink; see RegistryMachine.run_burst.
_rare: dict[type, list[str]] = {}
#: machine class -> reports of bursts that failed reliably, but not with a lost update, while the hunt looked for one;
#: see RegistryMachine.lost_first_seconds.
_aside: dict[type, list[str]] = {}


@dataclass
class Verdict:
    """One run of a burst (or of a serial step), the documents it left, and what the checker made of it."""

    commands: Sequence[Command]
    records: Sequence[Record]
    snapshot: Snapshot
    observed: tuple[Any, ...]
    search: Search[RegistryModel]
    ids: dict[str, str]  # handle -> id, including this run's ok deploys
    calls: list[Call]
    opts: ViewOptions
    schedule: ScheduleRun | None = None  # the schedule the burst took, when scheduled

    @property
    def ok(self) -> bool:
        return self.search.ok

    @property
    def settled(self) -> bool:
        """Whether the scheduler alone decided this run's interleaving (no timing fallback, and events to decide
        at): running it again from the same start takes the same steps, so one run is the verdict."""
        s = self.schedule
        return s is not None and s.deterministic and any(not step.event.startswith("begin ") for step in s.steps)


@dataclass
class _Checked:
    """What running a check showed: the failure of its first failing run, if any, and the run counts."""

    failure: ModelMismatch | None = None
    runs: int = 1
    failures: int = 0
    quiet: bool = False  # no failure, but the registry is not in a state the model can follow


# --------------------------------------------------------------------------------------------------------------------
# The machine


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _alive_sessions() -> frozenset[str]:
    proc = subprocess.run(["tmux", "list-sessions", "-F", "#{session_name}"], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        if "no server running" in proc.stderr or "No such file" in proc.stderr or "error connecting" in proc.stderr:
            return frozenset()
        raise OSError(f"tmux list-sessions failed: {proc.stderr.strip()}")
    return frozenset(line for line in proc.stdout.splitlines() if line)


def _start_session(name: str) -> None:
    subprocess.run(["tmux", "new-session", "-d", "-s", name, QUIET_AGENT_COMMAND], check=True, capture_output=True)


_tmux_dir: Path | None = None
_tmux_up = False


@contextlib.contextmanager
def _private_tmux() -> Iterator[Path]:
    """Point this process (and the workers it sends jobs to) at the run's private tmux server for one example.

    The server lives from the first example to :func:`close_tmux_server` (the end of :func:`run_machine`, or exit),
    with one session that keeps it up; every other session is killed when the example ends.
    """
    global _tmux_dir, _tmux_up
    if _tmux_dir is None or not _tmux_dir.is_dir():
        _tmux_dir = Path(tempfile.mkdtemp(prefix="orch-hyp-tmux-"))  # short: a socket path is at most ~100 bytes
    saved = {k: os.environ.get(k) for k in private_env(_tmux_dir)}
    apply_env(os.environ, private_env(_tmux_dir))
    try:
        if not _tmux_up:
            _start_session(KEEPALIVE_SESSION)  # a running server: concurrent first sessions need not race to start it
            _tmux_up = True
        yield _tmux_dir
    finally:
        done = subprocess.run(["tmux", "kill-session", "-a", "-t", f"={KEEPALIVE_SESSION}"], capture_output=True,
                              check=False)
        if done.returncode != 0:  # the keepalive session is gone (something killed the server): start afresh
            kill_server(_tmux_dir)
            _tmux_up = False
        apply_env(os.environ, {k: v or "" for k, v in saved.items()})


def close_tmux_server() -> None:
    """Kill the private tmux server of the stateful examples and remove its directory (also done at exit)."""
    global _tmux_dir, _tmux_up
    _tmux_up = False
    if _tmux_dir is not None:
        kill_server(_tmux_dir)
        shutil.rmtree(_tmux_dir, ignore_errors=True)
        _tmux_dir = None


atexit.register(close_tmux_server)


class RegistryMachine(RuleBasedStateMachine):
    """The registry (``--orch-impl``) and :class:`Specification` side by side; see the module docstring.

    Class attributes users may override: ``impl`` (default: the ``--orch-impl`` option), ``reruns`` (extra runs
    of a burst that fails) and ``reliable`` (the share of its runs a burst must fail in to count as failing; see
    :meth:`run_burst`), ``compare_progress`` and ``check_sessions``
    (whether progress and the liveness of active agents' tmux sessions are part of what must match), ``max_tasks``.

    Verdicts are fixed per program.  Process timing is the one thing Hypothesis does not control, and it must see
    the same program behave the same way each time it runs it (while shrinking, and in the final replay).  So the
    first run of a check (a step, a burst, an invariant) at a given point of a given program fixes its verdict for
    the rest of the test: a later run that fails where the first passed goes quiet (the example stops checking),
    and one that passes where the first failed reports the first failure, with how often it failed in all.  After
    the first failure an example stops running operations and only draws its remaining steps; :meth:`teardown`
    raises that failure.
    """

    tasks = Bundle("tasks")
    agents = Bundle("agents")

    impl: ClassVar[str | None] = None
    reruns: ClassVar[int] = 3
    #: Seconds Hypothesis may spend shrinking a failure; then new programs are no longer run (they pass, untried), so
    #: the smallest failure found so far is reported.  The report says when this cut shrinking short.
    shrink_seconds: ClassVar[float] = float(os.environ.get("ORCH_SHRINK_SECONDS", "20"))
    _failure_at: ClassVar[float | None] = None
    #: Seconds the hunt goes on looking for a lost update after a burst first failed reliably in another way (a
    #: limit breached, say): meanwhile such failures are set aside and the hunt goes on, so that a registry with a
    #: lost update is shown that, its worst failure, shrunk, rather than whichever failure came first.  After that the
    #: next reliable failure of any kind is shrunk, and if none comes, :func:`run_machine` runs the same programs
    #: again, taking the first failure of any kind (``ORCH_LOST_FIRST_SECONDS``).
    lost_first_seconds: ClassVar[float] = float(os.environ.get("ORCH_LOST_FIRST_SECONDS", "30"))
    _aside_at: ClassVar[float | None] = None
    _lost_first: ClassVar[bool] = True  # False in run_machine's second pass
    _shrink_stopped: ClassVar[bool] = False
    _programs: ClassVar[int] = 0
    _bursts: ClassVar[int] = 0
    _started: ClassVar[float] = 0.0
    _told: ClassVar[float] = 0.0
    reliable: ClassVar[float] = 0.75
    compare_progress: ClassVar[bool] = True
    check_sessions: ClassVar[bool] = True
    max_tasks: ClassVar[int] = 3
    #: How many tasks one burst may touch (``ORCH_BURST_TASKS``, default 1): above 1, bursts mix operations of
    #: several tasks, which race on the global registry they all write.
    burst_tasks: ClassVar[int] = int(os.environ.get("ORCH_BURST_TASKS", "1"))
    #: Set when a check failed in this run: from then on passing bursts are re-run before they count as passing.
    _failure_seen: ClassVar[bool] = False
    #: Set when a burst showed a lost update: from then on only lost updates count while shrinking.
    _lost_seen: ClassVar[bool] = False
    #: Scheduled: the operations of the lost update in hand; while it is shrunk, no larger burst counts.
    _lost_ops: ClassVar[int] = 0

    def __init__(self) -> None:
        super().__init__()
        opts = options.current()
        self.impl_spec = type(self).impl or opts.impl
        self.timeout = opts.timeout
        self.burst_max = max(2, min(opts.concurrency, MAX_WORKERS))
        self.schedule_spec = opts.schedule  # --orch-schedule (None: free-running bursts)
        self._stack = contextlib.ExitStack()
        try:
            self.root = Path(tempfile.mkdtemp(prefix="orch-hyp-"))
            self._stack.callback(shutil.rmtree, self.root, ignore_errors=True)
            self.workspace = self.root / "ws"
            self.workspace.mkdir()
            self._stack.enter_context(_environ(ORCH_AGENT_COMMAND=QUIET_AGENT_COMMAND))
            self._stack.enter_context(_private_tmux())
            self.generation = 0
            self.adapter = load_factory(self.impl_spec)(self.workspace)
        except BaseException:
            self._stack.close()
            raise
        self.promises = promises_of(self.adapter)
        self.spec = spec_of(self.adapter, self.promises)
        self.registry_rules = self.spec.rules
        self.state = RegistryModel()
        self.ids: dict[str, str] = {}  # handle -> real id, for tasks and agents
        self.handles: dict[str, list[str]] = {}  # task handle -> every deploy handle drawn for it, in order
        self.task_of: dict[str, str] = {}  # agent handle -> task handle
        self.program: list[Any] = []  # every command run so far in this example: what Hypothesis replays
        type(self)._programs += 1
        self.failure: ModelMismatch | None = None
        self._after_step: tuple[int, Snapshot] | None = None
        self.live = True  # False once the example stops running operations (see the class docstring)
        self._agent_numbers = itertools.count()
        self._task_numbers = itertools.count()

    def teardown(self) -> None:
        """Stop the private tmux server, remove the workspace, and raise the example's failure, if any."""
        self._stack.close()
        if self.failure is not None:
            raise self.failure

    # -- verdicts -------------------------------------------------------------------------------------------------

    def check(self, label: str, run: Any) -> None:
        """Run the check *run* (``run(memo) -> _Checked``) at this point of the program, with a fixed verdict.

        *memo* is the verdict fixed earlier for this point, or None.  See the class docstring.
        """
        if self.failure is not None:
            return
        key = (type(self), self.impl_spec, tuple(self.program), label)
        memo = _verdicts.get(key)
        cls = type(self)
        cls._progress()
        if cls._failure_at is not None and time.monotonic() - cls._failure_at > cls.shrink_seconds:
            # Out of shrinking time: run nothing more.  A point that failed before still fails (below); any other
            # passes untried, so the shrinker finds nothing smaller and ends.
            cls._shrink_stopped |= memo is None
            self.live = False
        if not self.live:
            if memo is not None and memo.failure is not None:
                self.failure = memo.exception()
            return
        checked: _Checked = run(memo)
        if memo is None:
            memo = _verdicts[key] = _Memo(None if checked.failure is None else type(checked.failure),
                                          str(checked.failure or ""))
        memo.runs += checked.runs
        memo.failures += checked.failures
        if memo.failure is not None:
            if cls._failure_at is None:
                cls._failure_at = time.monotonic()
            type(self)._failure_seen = True
            self.failure = memo.exception()
            self.live = False
        elif checked.failure is not None or checked.quiet:
            self.live = False  # it passed here before (or passes, narrowly): stay quiet, the replay must match

    @classmethod
    def _progress(cls) -> None:
        """Every ``ORCH_PROGRESS_SECONDS`` (10), one line on the terminal: programs, bursts, and whether a failure is
        being shrunk."""
        now = time.monotonic()
        if now - cls._told < float(os.environ.get("ORCH_PROGRESS_SECONDS", "10")):
            return
        cls._told = now
        shrinking = (f"; shrinking the failure found at {cls._failure_at - cls._started:.0f} s (at most"
                     f" {cls.shrink_seconds:g} s)") if cls._failure_at is not None else ""
        options.progress(f"stateful {cls.__name__}: {now - cls._started:.0f} s, {cls._programs} programs,"
                         f" {cls._bursts} bursts{shrinking}")

    # -- running operations ---------------------------------------------------------------------------------------

    @property
    def view_options(self) -> ViewOptions:
        """What the documents and the model are compared on; see :class:`ViewOptions`."""
        return ViewOptions(self.compare_progress, self.check_sessions, has_global=True, rules=self.registry_rules,
                           limits=self.promises & frozenset(LIMITS))

    def _options_for(self, snap: Snapshot) -> ViewOptions:
        """The view options for one reading: a global registry if the registry keeps one, an agent_hierarchy if
        every document has one."""
        hierarchy = self.registry_rules.hierarchy and all(isinstance(doc.get("agent_hierarchy"), dict)
                                                 for task_id, doc in snap.tasks.items() if task_id not in snap.errors)
        return replace(self.view_options, has_global=snap.glob is not None or "global" in snap.errors,
                       agent_hierarchy=hierarchy)

    def _new_agent(self, task: str) -> str:
        handle = f"a{next(self._agent_numbers)}"
        self.handles.setdefault(task, []).append(handle)
        self.task_of[handle] = task
        return handle

    def _agent_id(self, handle: str) -> str:
        # A handle whose deploy was refused stands for an id the registry has never seen.
        return self.ids.get(handle, f"nobody-{handle}")

    def _op(self, cmd: Command, docs: Mapping[str, Mapping[str, Any]]) -> Op:
        if cmd.kind == "create_task":
            return Op("create_task", "", limits=cmd.limits)
        task_id = self.ids.get(cmd.task, f"nobody-{cmd.task}")
        if cmd.kind == "deploy":
            parent = cmd.parent if cmd.parent == ORCHESTRATOR else self._agent_id(cmd.parent)
            return Op("deploy", task_id, agent_type=cmd.agent_type, parent=parent)
        agent_id = self._agent_id(cmd.agent) if cmd.agent else ""
        if cmd.kind == "lose_session":
            agent = next((a for a in docs.get(task_id, {}).get("agents", []) if a.get("id") == agent_id), None)
            return Op("lose_session", task_id, agent_id, session=self.spec.session_of(agent) if agent else "")
        return Op(cmd.kind, task_id, agent_id, status=cmd.status, progress=cmd.progress)  # type: ignore[arg-type]

    def snapshot(self, ids: Mapping[str, str] | None = None) -> Snapshot:
        """Read the document of every task in *ids* (default: the known ones), the global one and the live sessions."""
        ids = self.ids if ids is None else ids
        tasks: dict[str, Mapping[str, Any]] = {}
        errors: dict[str, str] = {}
        for handle, task_id in ids.items():
            if handle.startswith("t"):
                try:
                    tasks[task_id] = self.adapter.read_task(task_id)
                except Exception as exc:  # a torn or corrupt registry is a finding, not a crash of the machine
                    tasks[task_id], errors[task_id] = {}, f"{type(exc).__name__}: {exc}"
        try:
            glob = self.adapter.read_global()
        except Exception as exc:
            glob, errors["global"] = None, f"{type(exc).__name__}: {exc}"
        return Snapshot(tasks, glob, _alive_sessions(), errors)

    def _naming(self, ids: Mapping[str, str]) -> Naming:
        tasks = {i: h for h, i in ids.items() if h.startswith("t")}
        agents = {i: h for h, i in ids.items() if h.startswith("a")}
        return Naming(tasks, agents)

    def judge(self, commands: Sequence[Command], records: Sequence[Record]) -> Verdict:
        """Read the documents after *commands* ran (with these *records*) and search for an order that explains them.
        """
        ids = dict(self.ids)
        for cmd, rec in zip(commands, records, strict=True):
            if cmd.kind == "deploy" and rec.outcome == "ok":
                ids[cmd.agent] = str(rec.result)
            elif cmd.kind == "create_task" and rec.outcome == "ok":
                ids[cmd.task] = str(rec.result)
        snap = self.snapshot(ids)
        self._after_step = None  # the invariants read the documents afresh, unless the step keeps this reading
        opts = self._options_for(snap)
        observed = observed_view(snap, self._naming(ids), opts)
        calls = [Call(i, cmd, rec.invoke, rec.complete, rec.outcome, rec.result)
                 for i, (cmd, rec) in enumerate(zip(commands, records, strict=True))]
        search = self.search(calls, observed, frozenset(ids), opts)
        return Verdict(commands, records, snap, observed, search, ids, calls, opts, getattr(records, "schedule", None))

    def search(self, calls: Sequence[Call], observed: tuple[Any, ...], known: frozenset[str],
               opts: ViewOptions) -> Search[RegistryModel]:
        """The checker: an order of *calls* that takes the model from its state to *observed*, if there is one.

        *known* are the handles whose ids the machine knows (an agent deployed by an ``info`` call is not among
        them: it is matched by what it is, not by its id).
        """
        return linearize(calls, self.state, self.spec, lambda s: model_view(s, known, opts) == observed,
                         prune=pruner(observed, known, opts))

    def _adopt(self, verdict: Verdict) -> None:
        """Make the accepted final state the model's, and learn the ids of agents whose deploy was ``info``."""
        assert verdict.search.final_state is not None
        state = verdict.search.final_state
        ids = dict(verdict.ids)
        naming = self._naming(ids)
        for t in state.tasks:
            doc = verdict.snapshot.tasks.get(ids.get(t.handle, ""), {})
            unknown = [a for a in doc.get("agents", []) if naming.agent(a.get("id")) == "?"]
            for agent in t.agents:
                if agent.handle in ids:
                    continue
                match = next((a for a in unknown if a.get("type") == agent.type
                              and (not self.registry_rules.hierarchy or a.get("depth") == agent.depth)
                              and a.get("status") == agent.status and naming.agent(a.get("parent")) == agent.parent),
                             None)
                if match is not None:
                    unknown.remove(match)
                    ids[agent.handle] = str(match["id"])
        self.state, self.ids = state, ids

    def run_serial(self, cmd: Command) -> None:
        """Run one operation in this process and check it against the model, as a burst of one."""
        self.program.append(cmd)

        def run(memo: _Memo | None) -> _Checked:
            docs = self.snapshot().tasks if cmd.kind == "lose_session" else {}
            verdict = self.judge([cmd], [timed(self.adapter, self._op(cmd, docs), 0)])
            if not verdict.ok:
                return _Checked(self._failure(verdict), 1, 1)
            self._adopt(verdict)
            self._after_step = (len(self.program), verdict.snapshot)  # read after the step: the invariants use it
            return _Checked()

        self.check("step", run)

    def run_burst(self, commands: Sequence[Command], schedule_seed: int | None = None,
                  turns: Sequence[Turn] | None = None) -> None:
        """Run *commands* at the same time in the worker pool and check that some order of them explains the outcome.

        Process timing decides whether a racy registry shows its race, so a burst that fails is run again from the
        same start (the workspace and the tmux sessions restored) until it has run ``1 + reruns`` times, and it
        counts as failing only if it failed in at least a :attr:`reliable` share of them (3 of 4): only a failure
        that reproduces can be shrunk.  The report says how often it failed.  A burst that
        fails more rarely than that is kept aside, and :func:`run_machine` fails with it at the end if Hypothesis
        finds nothing that fails reliably.  Once a failure is in hand (Hypothesis is shrinking it), a new burst that
        passes is run a second time before it counts as passing; and once that failure is a lost update only lost
        updates count, so that the shrinker keeps the most telling counterexample instead of slipping to whatever
        else fails.  Before any failure is in hand, one of another kind is set aside for a while
        (:attr:`lost_first_seconds`) while the hunt looks for a lost update.

        Scheduled (``--orch-schedule``; the burst rule draws *turns*, PCT's parameters, or *schedule_seed*, the
        random scheduler's seed): the burst runs under that schedule, and a run whose interleaving the scheduler
        alone decided (:attr:`Verdict.settled`) is the verdict: it runs once, pass or fail, since a rerun takes the
        same steps to the same documents (tests/test_schedule.py replays one).  No reruns, no reliable share, no
        second run while shrinking.  A run where the scheduler fell back on timing (a worker blocked outside the
        locks it sees), or that saw no file-system event to schedule, is judged as a free-running one.  While a
        settled lost update is shrunk, no larger burst counts.  The report of a failure prints the schedule's
        numbered steps.
        """
        type(self)._bursts += 1
        scheduled = self.schedule_spec if schedule_seed is not None or turns is not None else None
        self.program.append(tuple(commands) if scheduled is None else (tuple(commands), schedule_seed,
                                                                       tuple(turns or ())))

        def run(memo: _Memo | None) -> _Checked:
            pool = shared_pool(self.burst_max)
            save = self.root / "save"
            shutil.rmtree(save, ignore_errors=True)
            shutil.copytree(self.workspace, save)
            # The reading the previous step was checked on is the state the burst starts from.
            fresh = self._after_step is not None and self._after_step[0] == len(self.program) - 1
            before = self._after_step[1] if fresh and self._after_step is not None else self.snapshot()
            ops = [self._op(cmd, before.tasks) for cmd in commands]
            if currently_in_test_context():
                note("burst: " + "; ".join(f"#{i} {cmd} [{op}]" for i, (cmd, op) in enumerate(zip(commands, ops,
                                                                                                    strict=True)))
                     + ("" if scheduled is None else f"; schedule {scheduled}"))
            hunting = memo is None and type(self)._failure_seen
            runs: list[Verdict] = []

            def once() -> None:
                if runs:
                    self._restore(save, before.alive)
                records = pool.run(self.impl_spec, self.workspace, ops, generation=self.generation,
                                   timeout=self.timeout, schedule=scheduled, schedule_seed=f"burst:{schedule_seed}",
                                   turns=turns, labels=[str(cmd) for cmd in commands])
                runs.append(self.judge(commands, records))

            once()
            if hunting and runs[-1].ok and not runs[-1].settled:
                once()  # a candidate of the shrinker: one pass by luck would throw a smaller failure away
            while not all(v.ok for v in runs) and len(runs) < 1 + self.reruns and not runs[-1].settled:
                once()
            failures = [v for v in runs if not v.ok]
            if runs[-1].ok:
                self._adopt(runs[-1])
                self._after_step = (len(self.program), runs[-1].snapshot)
            if not failures:
                return _Checked(runs=len(runs))
            failure = self._failure(failures[0])
            if len(failures) < self.reliable * len(runs):
                if not hunting:
                    _rare.setdefault(type(self), []).append(str(failure).replace(
                        "{RUNS}", f"it failed in only {len(failures)} of {len(runs)} runs, too rarely to shrink"))
                return _Checked(None, len(runs), len(failures), quiet=not runs[-1].ok)
            cls = type(self)
            if hunting and cls._lost_seen and not isinstance(failure, LostUpdate):
                return _Checked(None, len(runs), len(failures), quiet=not runs[-1].ok)
            # Scheduled, no burst larger than the lost update in hand counts while it is shrunk: Hypothesis takes a
            # shorter program for a smaller one even when its burst is larger, and from there it may stop at three
            # operations (the third making the lost write visible) where two would do.
            if hunting and runs[-1].settled and 0 < cls._lost_ops < len(commands):
                return _Checked(None, len(runs), len(failures), quiet=not runs[-1].ok)
            if isinstance(failure, LostUpdate):
                cls._lost_seen = True
                cls._lost_ops = len(commands) if runs[-1].settled else 0
            elif not cls._failure_seen and self._still_looking_for_a_lost_update():
                _aside.setdefault(cls, []).append(str(failure).replace(
                    "{RUNS}", f"it failed in {len(failures)} of {len(runs)} runs"))
                return _Checked(None, len(runs), len(failures), quiet=not runs[-1].ok)
            return _Checked(failure, len(runs), len(failures))

        self.check("burst", run)

    @classmethod
    def _still_looking_for_a_lost_update(cls) -> bool:
        """Whether a reliable burst failure other than a lost update is set aside (see :attr:`lost_first_seconds`)."""
        if not cls._lost_first:
            return False
        if cls._aside_at is None:
            cls._aside_at = time.monotonic()
        return time.monotonic() - cls._aside_at < cls.lost_first_seconds

    def _restore(self, save: Path, alive: frozenset[str]) -> None:
        """Put the workspace and the tmux sessions back as they were before the burst."""
        shutil.rmtree(self.workspace)
        shutil.copytree(save, self.workspace)
        now = _alive_sessions()
        for name in now - alive:
            kill_session(name)
        for name in alive - now:
            _start_session(name)
        self.generation += 1
        self.adapter = load_factory(self.impl_spec)(self.workspace)

    # -- reports --------------------------------------------------------------------------------------------------

    def _lost(self, verdict: Verdict) -> list[str]:
        """For each document the burst does not explain: the ok operations whose absence would explain it."""
        out = []
        known = frozenset(verdict.ids)
        for part, label in ((0, "the task registry"), (1, "the global registry")):
            if verdict.observed[part] is None:
                continue  # no such document (a registry without a global one): it cannot have lost a write
            def explains(s: RegistryModel, part: int = part) -> bool:
                return bool(model_view(s, known, verdict.opts)[part] == verdict.observed[part])

            cut = pruner(verdict.observed, known, verdict.opts, (part,))
            if linearize(verdict.calls, self.state, self.spec, explains, prune=cut).ok:
                continue  # this document alone is explained by the whole burst
            gone = lost(verdict.calls, self.state, self.spec, explains, prune=cut)
            if gone:
                who = " or ".join(f"#{i} ({verdict.commands[i]})" for i in gone)
                out.append(f"Lost update in {label}: it holds exactly what the burst leaves if {who} never ran, yet"
                           " that operation returned ok: an acknowledged write was overwritten by a writer that had"
                           " not seen it.")
        return out

    def _failure(self, verdict: Verdict) -> ModelMismatch:
        """The report on a run the checker rejected, as the exception to raise."""
        search, records, commands = verdict.search, verdict.records, verdict.commands
        burst = len(commands) > 1
        lost_lines = self._lost(verdict) if burst else []
        t0 = min(r.invoke for r in records)

        def ms(ns: int | None) -> str:
            return "   never" if ns is None else f"{(ns - t0) / 1e6:8.3f}"

        if burst:
            touched = sorted({c.task for c in commands})
            lines = [f"{'Lost update: a' if lost_lines else 'A'} burst of {len(commands)} operations on task"
                     f"{'s' if len(touched) > 1 else ''} {', '.join(touched)} is not linearizable: no order of them"
                     " explains what the registry holds"
                     f" ({{RUNS}}; impl {self.impl_spec})."]
        else:
            lines = [f"{commands[0]} did what the model does not allow (impl {self.impl_spec})."]
        lines += ["", "Operations (ms from the first invoke; outcome; result or error):"]
        for i, (cmd, rec) in enumerate(zip(commands, records, strict=True)):
            detail = rec.result if rec.outcome == "ok" and rec.result is not None else rec.error
            lines.append(f"  #{i}  {ms(rec.invoke)} .. {ms(rec.complete)}  {rec.outcome:<4}  {cmd}"
                         + (f"  -> {detail}" if detail else ""))
        if verdict.schedule is not None:
            lines += ["", f"The schedule it took (p<i> runs #i): {verdict.schedule.summary()}:"]
            lines += verdict.schedule.lines()
        for line in lost_lines:
            lines += ["", line]
        lines += ["", "The model before:"]
        lines += [f"  {line}" for line in self._describe(self.state, self.ids)] or ["  (empty)"]
        known = frozenset(verdict.ids)
        lines += ["", f"Orders tried: {search.explored} states explored"
                      + (" (the search budget ran out: inconclusive)" if search.exhausted else "")
                      + f"; {len(search.final_states)} complete order(s) end in a state that differs from the"
                        " documents:"]
        for order, final in zip(search.final_orders, search.final_states, strict=True):
            diffs = diff_views(model_view(final, known, verdict.opts), verdict.observed)
            lines.append(f"  {_fmt_order(order)}:")
            lines += [f"      {d}" for d in diffs[:6]] + (["      ..."] if len(diffs) > 6 else [])
        if not search.final_states:
            lines.append("  none: in every order some ok operation is one the model refuses there, or a failed one"
                         " the model would have applied.  Each alone, from the state before:")
            for i, (cmd, rec) in enumerate(zip(commands, records, strict=True)):
                alone = self.spec.apply(self.state, cmd)
                effects = alone if isinstance(alone, tuple) else (alone,)
                verdicts = "; ".join("applies" if isinstance(e, Applied) else f"refuses ({e.reason})" for e in effects)
                lines.append(f"      #{i} ({rec.outcome}): the model {verdicts}")
        lines += ["", "Final documents:"]
        for task_id, doc in verdict.snapshot.tasks.items():
            error = verdict.snapshot.errors.get(task_id)
            lines.append(f"  task {self._naming(verdict.ids).task(task_id)} = {task_id}:"
                         + (f" could not be read: {error}" if error else ""))
            lines += [f"    {line}" for line in _json(doc).splitlines()] if not error else []
        if "global" in verdict.snapshot.errors:
            lines.append(f"  global: could not be read: {verdict.snapshot.errors['global']}")
        elif verdict.snapshot.glob is not None:
            lines.append("  global:")
            lines += [f"    {line}" for line in _json(verdict.snapshot.glob).splitlines()]
        lines.append(f"  live tmux sessions: {sorted(verdict.snapshot.alive - {KEEPALIVE_SESSION})}")
        lines += ["", "Orders: #i applied there, !#i refused there, ?#i (info) applied there, ~#i (info) never applied."
                      "  Agents are named by handle (a0, a1...; '?' is an id the machine does not know)."]
        cls = (LostUpdate if lost_lines else BurstFailure) if burst else StepFailure
        return cls("\n".join(lines))

    def _describe(self, state: RegistryModel, ids: Mapping[str, str]) -> list[str]:
        out = []
        for t in state.tasks:
            out.append(f"task {t.handle} = {ids.get(t.handle)}: max_agents {t.max_agents}, max_concurrent"
                       f" {t.max_concurrent}, max_depth {t.max_depth}")
            out += [f"  {a.handle} = {ids.get(a.handle, '?')}: {a.type} {a.status}, parent {a.parent}, depth"
                    f" {a.depth}, progress {a.progress}, session {'alive' if a.session else 'gone'}"
                    for a in t.agents]
        return out

    # -- rules ----------------------------------------------------------------------------------------------------

    def _create_task(self, max_agents: int, max_concurrent: int, max_depth: int) -> str:
        handle = f"t{next(self._task_numbers)}"
        self.handles[handle] = []
        self.run_serial(Command("create_task", handle, limits=(max_agents, max_concurrent, max_depth)))
        return handle

    def _first_task(self) -> str:
        if "t0" not in self.handles:
            return self._create_task(*FIRST_TASK_LIMITS)
        return "t0"

    @initialize(target=tasks)
    def first_task(self) -> str:
        """A task with generous limits, so that the simplest failing programs are races, not limits."""
        return self._first_task()

    @initialize(target=agents)
    def first_agents(self) -> Any:
        """Two running agents in the first task, so that a burst can race on agents from its first step."""
        task = self._first_task()
        handles = []
        for agent_type in FIRST_AGENTS:
            handles.append(self._new_agent(task))
            self.run_serial(Command("deploy", task, handles[-1], agent_type))
        return multiple(*handles)

    @precondition(lambda self: len(self.handles) < self.max_tasks)  # drawn tasks, not outcomes: never flaky
    @rule(target=tasks, max_agents=st.sampled_from(MAX_AGENTS), max_concurrent=st.sampled_from(MAX_CONCURRENT),
          max_depth=st.sampled_from(MAX_DEPTH))
    def create_task(self, max_agents: int, max_concurrent: int, max_depth: int) -> str:
        return self._create_task(max_agents, max_concurrent, max_depth)

    @rule(target=agents, task=tasks, agent_type=st.sampled_from(AGENT_TYPES))
    def deploy(self, task: str, agent_type: str) -> str:
        handle = self._new_agent(task)
        self.run_serial(Command("deploy", task, handle, agent_type))
        return handle

    @precondition(lambda self: self.registry_rules.hierarchy)
    @rule(target=agents, parent=agents, agent_type=st.sampled_from(AGENT_TYPES))
    def deploy_child(self, parent: str, agent_type: str) -> str:
        task = self.task_of[parent]
        handle = self._new_agent(task)
        self.run_serial(Command("deploy", task, handle, agent_type, parent=parent))
        return handle

    @rule(agent=agents, data=st.data(), progress=st.integers(0, 100))
    def update(self, agent: str, data: st.DataObject, progress: int) -> None:
        status = data.draw(st.sampled_from(update_statuses(self.registry_rules)), label="status")
        self.run_serial(Command("update", self.task_of[agent], agent, status=status, progress=progress))

    @rule(agent=agents)
    def kill(self, agent: str) -> None:
        self.run_serial(Command("kill", self.task_of[agent], agent))

    @rule(agent=agents)
    def lose_session_then_reconcile(self, agent: str) -> None:
        task = self.task_of[agent]
        self.run_serial(Command("lose_session", task, agent))
        self.run_serial(Command("reconcile", task))

    @rule(target=agents, task=tasks, data=st.data())
    def burst(self, task: str, data: st.DataObject) -> Any:
        """2..N operations at the same instant, on *task* (and, with :attr:`burst_tasks` above 1, on as many of the
        other tasks: several tasks writing one global registry at once); see :meth:`run_burst`."""
        others = [t for t in self.handles if t != task]  # drawn handles: the same whatever the outcomes were
        tasks = [task, *others][:max(1, self.burst_tasks)]

        def on(t: str) -> st.SearchStrategy[Command]:
            # drawn handles only: the same program whatever the timing did
            return burst_commands(t, tuple(self.handles[t]), self.registry_rules)

        one = on(task) if len(tasks) == 1 else st.sampled_from(tasks).flatmap(on)
        # Scheduled, the interleaving is drawn too, so that the example replays it and shrinking shrinks it: PCT's
        # turn with each operation (leaving one out keeps the others' turns), or the random scheduler's seed.
        seed, turns = None, None
        if self.schedule_spec and ScheduleSpec.parse(self.schedule_spec).kind == "pct":
            def turned(t: str) -> st.SearchStrategy[tuple[Command, Turn]]:
                return scheduled_burst_commands(t, tuple(self.handles[t]), self.registry_rules)

            either = turned(task) if len(tasks) == 1 else st.sampled_from(tasks).flatmap(turned)
            pairs = data.draw(st.lists(either, min_size=2, max_size=self.burst_max), label="burst")
            drawn, turns = [c for c, _ in pairs], [t for _, t in pairs]
        else:
            drawn = data.draw(st.lists(one, min_size=2, max_size=self.burst_max), label="burst")
            if self.schedule_spec:
                seed = data.draw(st.integers(0, 2**32 - 1), label="schedule seed")
        commands = [replace(c, agent=self._new_agent(c.task)) if c.kind == "deploy" else c for c in drawn]
        self.run_burst(commands, seed, turns)
        return multiple(*(c.agent for c in commands if c.kind == "deploy"))

    # -- invariants -----------------------------------------------------------------------------------------------

    def _invariant_snapshot(self) -> Snapshot:
        """The documents and sessions as they were after the step: read by its check, or else afresh."""
        if self._after_step is None or self._after_step[0] != len(self.program):
            self._after_step = (len(self.program), self.snapshot())
        return self._after_step[1]

    @invariant()
    def documents_match_the_model(self) -> None:
        def run(memo: _Memo | None) -> _Checked:
            snap = self._invariant_snapshot()
            opts = self._options_for(snap)
            want = model_view(self.state, frozenset(self.ids), opts)
            have = observed_view(snap, self._naming(self.ids), opts)
            if want == have:
                return _Checked()
            return _Checked(ModelMismatch("the documents changed after the step was checked:\n  "
                                          + "\n  ".join(diff_views(want, have))), 1, 1)

        self.check("documents", run)

    @invariant()
    def registry_invariants_hold(self) -> None:
        def run(memo: _Memo | None) -> _Checked:
            snap = self._invariant_snapshot()
            if snap.errors:
                return _Checked()  # documents_match_the_model reports those
            problems = [v for task_id, doc in snap.tasks.items() for v in self.spec.task_violations(task_id, doc)]
            if snap.glob is not None:
                problems += self.spec.global_violations(snap.glob, snap.tasks)
            if not problems:
                return _Checked()
            return _Checked(ModelMismatch("registry invariants are broken:\n  "
                                          + "\n  ".join(str(p) for p in problems)), 1, 1)

        self.check("invariants", run)


def _fmt_order(order: Sequence[str]) -> str:
    return " ".join(f"{o[0]}#{o[1:]}" if o[0] in "!?~" else f"#{o}" for o in order) or "(empty)"


def _json(doc: Any, limit: int = 6000) -> str:
    text = json.dumps(doc, indent=1, sort_keys=True, default=str)
    return text if len(text) <= limit else text[:limit] + f"\n... ({len(text) - limit} more characters)"
