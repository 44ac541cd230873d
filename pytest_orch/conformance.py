"""The conformance check: before any swarm, one process drives every edge the rules cover and compares each outcome
with what the declared rules say.

A registry that makes kill idempotent, reaps lost sessions to ``completed`` or lets a terminal agent move on is not
wrong; it has other rules.  Judged by the reference's rules, every such difference would surface in the concurrent
tests as a lost update, in the same words as a real one.  So the differences are found here, sequentially, where
they are unambiguous, and reported as ``[contract]`` with the declaration that would describe what the registry did::

    [contract] kill of terminated agent a1 returned ok and changed nothing; rules say kill_of_terminal="refused".
    If that is intended, declare Rules(kill_of_terminal="ignored")

Each probe is a :class:`~pytest_orch.spec.Command` run through the adapter and through the specification
(:meth:`Spec.apply`); the outcome (ok or refused) and the agents' records must match.  After a mismatch the model
adopts what the registry did, so one difference is reported once.  Probes use fresh agents, so they do not depend
on one another's outcome.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .history import Called, classify, raised
from .linearize import Applied, Refused
from .spec import ORCHESTRATOR, AgentModel, Command, RegistryModel, Spec
from .tmux import kill_session

__all__ = ["PROBES", "Mismatch", "Verdict", "check_contract", "render", "run_contract", "verdict_for"]

#: A status no registry has: an update to it tests ``unknown_status``.
UNKNOWN_STATUS = "no-such-status"
GENEROUS = (20, 20, 5)


@dataclass(frozen=True)
class Mismatch:
    """One probe whose outcome the rules do not allow."""

    operation: str  # "kill of terminated agent a1"
    did: str  # "returned ok and changed nothing"
    rule: str  # 'kill_of_terminal="refused"'
    suggestion: str = ""  # 'Rules(kill_of_terminal="ignored")', or "" when no declaration describes it
    #: ``"rules"``: the registry does something its rules do not say (the concurrent tests would misread it);
    #: ``"bug"``: its documents break an invariant even run alone (the concurrent tests report that themselves).
    kind: str = "rules"

    def __str__(self) -> str:
        text = f"{self.operation} {self.did}; rules say {self.rule.replace(chr(39), chr(34))}."
        if self.suggestion:
            text += f" If that is intended, declare {self.suggestion.replace(chr(39), chr(34))}"
        else:
            text += (" No Rules field describes this: if it is intended, pass a subclass of pytest_orch.spec.Spec"
                     " (spec = MySpec); otherwise it is a bug")
        return text


@dataclass
class _Probe:
    """The registry and the model side by side, with handles for ids."""

    adapter: Any
    spec: Spec
    state: RegistryModel = field(default_factory=RegistryModel)
    ids: dict[str, str] = field(default_factory=dict)
    found: list[Mismatch] = field(default_factory=list)
    numbers: Iterator[int] = field(default_factory=lambda: iter(range(10_000)))

    # -- running one command on both --------------------------------------------------------------------------------

    def call(self, fn: Callable[[], Any]) -> Called:
        return classify(fn, self.adapter)

    def run(self, cmd: Command) -> tuple[Called, Applied[RegistryModel] | Refused | tuple[Any, ...]]:
        a = self.adapter
        task_id = self.ids.get(cmd.task, f"nobody-{cmd.task}")
        agent_id = self.ids.get(cmd.agent, f"nobody-{cmd.agent}")
        if cmd.kind == "create_task":
            got = self.call(lambda: a.create_task(f"conformance {cmd.task}", max_agents=cmd.limits[0],
                                                  max_concurrent=cmd.limits[1], max_depth=cmd.limits[2]))
        elif cmd.kind == "deploy":
            parent = cmd.parent if cmd.parent == ORCHESTRATOR else self.ids.get(cmd.parent, cmd.parent)
            got = self.call(lambda: a.deploy(task_id, cmd.agent_type, parent))
        elif cmd.kind == "update":
            got = self.call(lambda: a.update(task_id, agent_id, cmd.status, cmd.progress))
        elif cmd.kind == "kill":
            got = self.call(lambda: a.kill(task_id, agent_id))
        elif cmd.kind == "reconcile":
            got = self.call(lambda: a.reconcile(task_id))
        else:
            raise ValueError(cmd.kind)
        return got, self.spec.apply(self.state, cmd)

    def records(self, task: str) -> dict[str, dict[str, Any]]:
        doc = self.adapter.read_task(self.ids[task])
        return {a["id"]: a for a in doc.get("agents", []) if isinstance(a, dict) and "id" in a}

    def seen(self, task: str, handle: str) -> tuple[str, Any]:
        """The agent's status (``absent`` for a tombstone or no record) and progress, as the registry holds them."""
        record = self.records(task).get(self.ids.get(handle, ""))
        if record is None or self.spec.is_hidden(record.get("status")):
            return "absent", None
        return str(record.get("status")), record.get("progress")

    def model(self, task: str, handle: str) -> AgentModel:
        t = self.state.task(task)
        agent = t.agent(handle) if t is not None else None
        assert agent is not None, handle
        return agent

    def adopt(self, task: str, handle: str, status: str) -> None:
        """Make the model agree with the registry about one agent (after a mismatch was reported)."""
        t = self.state.task(task)
        agent = t.agent(handle) if t is not None else None
        if t is None or agent is None or status == "absent":
            return
        self.state = self.state.replace_task(t.replace_agent(replace(agent, status=status)))

    def mismatch(self, operation: str, did: str, rule: str, suggestion: str = "", kind: str = "rules") -> None:
        self.found.append(Mismatch(operation, did, rule, suggestion, kind))

    # -- building blocks --------------------------------------------------------------------------------------------

    def task(self, limits: tuple[int, int, int] = GENEROUS) -> str | None:
        handle = f"t{next(self.numbers)}"
        got, effect = self.run(Command("create_task", handle, limits=limits))
        if got.outcome != "ok":
            self.mismatch(f"create_task(max_agents={limits[0]}, max_concurrent={limits[1]}, max_depth={limits[2]})",
                          f"did not return a task id ({got.outcome}: {got.error})", "it returns one")
            return None
        assert isinstance(effect, Applied)
        self.state, self.ids[handle] = effect.state, str(got.result)
        return handle

    def agent(self, task: str, agent_type: str | None = None, parent: str = ORCHESTRATOR) -> str | None:
        """Deploy a fresh agent the rules must admit; None (and a mismatch) when the registry refused it."""
        handle = f"a{next(self.numbers)}"
        cmd = Command("deploy", task, handle, agent_type or f"probe{handle}", parent=parent)
        got, effect = self.run(cmd)
        if got.outcome != "ok" or not isinstance(effect, Applied):
            self.mismatch(f"deploy of a {cmd.agent_type} agent", f"returned {got.outcome} ({got.error})",
                          "it is admitted")
            return None
        self.state, self.ids[handle] = effect.state, str(got.result)
        status, _ = self.seen(task, handle)
        if status != self.spec.rules.deployed_as:
            self.mismatch(f"deploy of agent {handle}", f"left it {status}",
                          f"deployed_as={self.spec.rules.deployed_as!r}",
                          f"Rules(deployed_as={status!r})" if status in self.spec.rules.active else "")
            self.adopt(task, handle, status)
        return handle

    def set_status(self, task: str, handle: str, status: str) -> bool:
        """Update an agent to *status* the rules allow; False if the registry did something else."""
        got, effect = self.run(Command("update", task, handle, status=status, progress=0))
        if got.outcome == "ok" and isinstance(effect, Applied) and self.seen(task, handle)[0] == status:
            self.state = effect.state
            return True
        return False


def _set(statuses: frozenset[str] | set[str]) -> str:
    """A set of statuses as one writes it in a declaration."""
    return "frozenset({" + ", ".join(repr(x) for x in sorted(statuses)) + "})"


def _terminal(spec: Spec, avoid: str) -> str | None:
    """A terminal status an update sets, other than *avoid*."""
    choices = sorted((spec.rules.update_statuses & spec.rules.terminal) - {avoid})
    return choices[0] if choices else None


def _active(spec: Spec) -> str | None:
    choices = sorted(spec.rules.update_statuses & spec.rules.active)
    return choices[0] if choices else None


# --------------------------------------------------------------------------------------------------------------------
# The probes


def _probe_updates(p: _Probe, t: str) -> None:
    r = p.spec.rules
    a = p.agent(t)
    if a is None:
        return
    for status in sorted(r.update_statuses & r.active):
        got, effect = p.run(Command("update", t, a, status=status, progress=37))
        seen = p.seen(t, a)
        if got.outcome != "ok":
            p.mismatch(f"update of active agent {a} to {status!r}", f"returned {got.outcome} ({got.error})",
                       f"settable includes {status!r}",
                       f"Rules(settable={_set(r.update_statuses - {status})})" if got.outcome == "fail" else "")
            continue
        assert isinstance(effect, Applied)
        p.state = effect.state
        if seen[0] != status:
            p.mismatch(f"update of active agent {a} to {status!r}", f"returned ok but left it {seen[0]}",
                       "the status is set")
            p.adopt(t, a, seen[0])
        elif r.progress and seen[1] != 37:
            p.mismatch(f"update of agent {a} to progress 37", f"returned ok but left progress {seen[1]!r}",
                       "progress=True", "Rules(progress=False)")


def _probe_unknown(p: _Probe, t: str) -> None:
    r = p.spec.rules
    a = p.agent(t)
    if a is not None:
        got, effect = p.run(Command("update", t, a, status=UNKNOWN_STATUS, progress=0))
        seen = p.seen(t, a)[0]
        rule = f"unknown_status={r.unknown_status!r}"
        if got.outcome == "ok" and seen == UNKNOWN_STATUS and r.unknown_status == "refused":
            p.mismatch(f"update of agent {a} to the unknown status {UNKNOWN_STATUS!r}", "returned ok and stored it",
                       rule, 'Rules(unknown_status="stored")')
        elif got.outcome == "fail" and r.unknown_status == "stored":
            p.mismatch(f"update of agent {a} to the unknown status {UNKNOWN_STATUS!r}", "was refused", rule,
                       'Rules(unknown_status="refused")')
        elif got.outcome == "ok" and seen != UNKNOWN_STATUS:
            p.mismatch(f"update of agent {a} to the unknown status {UNKNOWN_STATUS!r}",
                       f"returned ok but left it {seen}", rule)
        elif got.outcome == "info":
            p.mismatch(f"update of agent {a} to the unknown status {UNKNOWN_STATUS!r}", f"raised {got.error}",
                       f"{rule} (a refusal raises Rejected)")
        elif isinstance(effect, Applied):
            p.state = effect.state
    for kind in ("update", "kill"):
        got, _ = p.run(Command(kind, t, "nobody", status=_active(p.spec) or sorted(r.update_statuses)[0]))
        rule = f"unknown_agent={r.unknown_agent!r}"
        if got.outcome == "ok" and r.unknown_agent == "refused":
            p.mismatch(f"{kind} of an agent the task does not have", "returned ok", rule,
                       'Rules(unknown_agent="ignored")')
        elif got.outcome == "fail" and r.unknown_agent == "ignored":
            p.mismatch(f"{kind} of an agent the task does not have", "was refused", rule,
                       'Rules(unknown_agent="refused")')
        elif got.outcome == "info":
            p.mismatch(f"{kind} of an agent the task does not have", f"raised {got.error}",
                       f"{rule} (a refusal raises Rejected)")


def _probe_kills(p: _Probe, t: str) -> None:
    r = p.spec.rules
    a = p.agent(t)
    if a is None:
        return
    got, effect = p.run(Command("kill", t, a))
    seen = p.seen(t, a)[0]
    want = "absent" if p.spec.is_hidden(r.killed_to) else r.killed_to
    if got.outcome != "ok":
        p.mismatch(f"kill of active agent {a}", f"returned {got.outcome} ({got.error})", "it is applied")
    elif seen != want:
        p.mismatch(f"kill of active agent {a}", f"left it {seen}", f"killed_to={r.killed_to!r}",
                   f"Rules(killed_to={seen!r})" if seen in r.terminal else "")
        if isinstance(effect, Applied):
            p.state = effect.state
        p.adopt(t, a, seen)
    elif isinstance(effect, Applied):
        p.state = effect.state
    # A kill of a terminal agent whose status is not killed_to, so that "ignored" and "applied" differ.
    b = p.agent(t)
    final = _terminal(p.spec, r.killed_to)
    if b is None:
        return
    if final is None or not p.set_status(t, b, final):
        b, final = a, seen
    if p.spec.is_hidden(p.model(t, b).status) or final == "absent":
        return
    got, effect = p.run(Command("kill", t, b))
    after = p.seen(t, b)[0]
    did = ("was refused" if got.outcome == "fail" else f"raised {got.error}" if got.outcome == "info"
           else "returned ok and changed nothing" if after == final else f"returned ok and made it {after}")
    kind = ("refused" if got.outcome == "fail" else "ignored" if after == final
            else "applied" if after in (r.killed_to, "absent") else "")
    expected = r.kill_of_terminal
    if kind != expected:
        suggestion = f"Rules(kill_of_terminal={kind!r})" if kind else ""
        if kind == "applied" and after != r.killed_to and after != "absent":
            suggestion = f"Rules(kill_of_terminal='applied', killed_to={after!r})"
        p.mismatch(f"kill of {final} agent {b}", did, f"kill_of_terminal={expected!r}", suggestion)
        p.adopt(t, b, after)
    elif isinstance(effect, Applied):
        p.state = effect.state


def _expect(p: _Probe, t: str, cmd: Command, operation: str) -> None:
    """Run *cmd* and compare its outcome and the agent's status with what the specification says, whatever it is."""
    got, effect = p.run(cmd)
    options = effect if isinstance(effect, tuple) else (effect,)
    applied = [e for e in options if isinstance(e, Applied)]
    after = p.seen(t, cmd.agent)[0]
    if got.outcome == "info":
        p.mismatch(operation, f"raised {got.error}", "it returns ok or raises Rejected")
        return
    if got.outcome == "fail":
        if len(applied) == len(options):
            p.mismatch(operation, f"was refused ({got.error})", "it is applied")
        return
    wants = []
    for e in applied:
        agent = e.state.task(t).agent(cmd.agent) if e.state.task(t) else None
        wants.append("absent" if agent is None or p.spec.is_hidden(agent.status) else agent.status)
    if not applied:
        refusal = next((e.reason for e in options if isinstance(e, Refused)), "")
        p.mismatch(operation, f"returned ok and left it {after}", f"it is refused ({refusal})")
    elif after not in wants:
        p.mismatch(operation, f"returned ok and left it {after}", f"it becomes {' or '.join(sorted(set(wants)))}")
    else:
        p.state = applied[wants.index(after)].state
        return
    p.adopt(t, cmd.agent, after)


def _probe_each_active_status(p: _Probe, t: str) -> None:
    """A kill and a reconcile-free update from every active status the registry can be put in."""
    r = p.spec.rules
    for status in sorted(r.update_statuses & r.active):
        a = p.agent(t)
        if a is None or (status != r.deployed_as and not p.set_status(t, a, status)):
            continue
        _expect(p, t, Command("kill", t, a), f"kill of {status} agent {a}")


def _probe_terminal(p: _Probe, t: str) -> None:
    r = p.spec.rules
    a = p.agent(t)
    done = _terminal(p.spec, "")
    if a is None or done is None or not p.set_status(t, a, done):
        return
    target = _active(p.spec) or _terminal(p.spec, done)
    if target is None:
        return
    got, effect = p.run(Command("update", t, a, status=target, progress=0))
    after = p.seen(t, a)[0]
    moved = got.outcome == "ok" and after == target
    if r.terminal_is_final and moved:
        p.mismatch(f"update of {done} agent {a} to {target!r}", "was applied", "terminal_is_final=True",
                   "Rules(terminal_is_final=False)")
        p.adopt(t, a, after)
    elif not r.terminal_is_final and got.outcome == "fail" and not isinstance(effect, Refused):
        p.mismatch(f"update of {done} agent {a} to {target!r}", "was refused", "terminal_is_final=False",
                   "Rules(terminal_is_final=True)")
    elif got.outcome == "ok" and not moved:
        p.mismatch(f"update of {done} agent {a} to {target!r}", f"returned ok but left it {after}",
                   f"terminal_is_final={r.terminal_is_final}",
                   "Rules(terminal_is_final=True) (and a refusal raising Rejected)" if after == done else "")
    elif got.outcome == "info":
        p.mismatch(f"update of {done} agent {a} to {target!r}", f"raised {got.error}",
                   f"terminal_is_final={r.terminal_is_final} (a refusal raises Rejected)")
    elif isinstance(effect, Applied):
        p.state = effect.state


def _lose(p: _Probe, t: str, handle: str) -> None:
    record = p.records(t).get(p.ids[handle], {"id": p.ids[handle]})
    kill_session(p.spec.session_of(record))
    p.state = _state_with(p.state, t, handle, lambda a: p.spec.lose_session(a))


def _state_with(state: RegistryModel, task: str, handle: str, change: Callable[[AgentModel], AgentModel]
                ) -> RegistryModel:
    t = state.task(task)
    assert t is not None
    agent = t.agent(handle)
    assert agent is not None
    return state.replace_task(t.replace_agent(change(agent)))


def _probe_reconcile(p: _Probe, t: str) -> None:
    r = p.spec.rules
    statuses = sorted(r.update_statuses & r.active) or [r.deployed_as]
    lost: dict[str, str] = {}
    for status in statuses:
        a = p.agent(t)
        if a is None:
            continue
        if status != r.deployed_as and not p.set_status(t, a, status):
            continue
        lost[a] = status
    other_task = p.task()
    elsewhere = p.agent(other_task) if other_task else None
    if not lost:
        return
    for a in [*lost, *([elsewhere] if elsewhere else [])]:
        _lose(p, t if a in lost else str(other_task), a)
    got, effect = p.run(Command("reconcile", t))
    if got.outcome != "ok":
        p.mismatch(f"reconcile of task after the sessions of {', '.join(lost)} were killed",
                   f"returned {got.outcome} ({got.error})", "it returns ok")
        return
    if isinstance(effect, Applied):
        p.state = effect.state
    after = {a: p.seen(t, a)[0] for a in lost}
    tested = set(lost.values())
    reaped = {status for a, status in lost.items() if after[a] != status}
    if reaped != tested & r.reaped:
        did = "; ".join(f"made {status} agent {a} {after[a]}" if after[a] != status else f"left {status} agent {a}"
                        for a, status in lost.items())
        p.mismatch("reconcile after the agents' sessions were killed", did, f"reaped={_set(r.reaped)}",
                   f"Rules(reaped={_set(reaped | (r.reaped - tested))})")
    want = "absent" if p.spec.is_hidden(r.reaped_to) else r.reaped_to
    reaped_to = {after[a] for a in lost if after[a] != lost[a]}
    if reaped_to and reaped_to != {want}:
        shown = sorted(reaped_to)[0]
        p.mismatch("reconcile after the agents' sessions were killed", f"made them {', '.join(sorted(reaped_to))}",
                   f"reaped_to={r.reaped_to!r}", f"Rules(reaped_to={shown!r})" if len(reaped_to) == 1 else "")
    for a in lost:
        p.adopt(t, a, after[a])
    if elsewhere is not None and other_task is not None:
        there = p.seen(other_task, elsewhere)[0]
        reaped_there = there != r.deployed_as
        if reaped_there and r.reconcile_scope == "task" and r.deployed_as in r.reaped:
            p.mismatch("reconcile of one task", f"also reaped agent {elsewhere} of another task",
                       "reconcile_scope='task'", "Rules(reconcile_scope='registry')")
        elif not reaped_there and r.reconcile_scope == "registry" and r.deployed_as in r.reaped:
            p.mismatch("reconcile of one task", f"left agent {elsewhere} of another task, whose session was gone,"
                                                " unreaped", "reconcile_scope='registry'",
                       "Rules(reconcile_scope='task')")
        p.adopt(other_task, elsewhere, there)


def _probe_limits(p: _Probe) -> None:
    spec = p.spec
    cases = [("max_agents", (1, 5, 5)), ("max_concurrent", (5, 1, 5)), ("unique_type", GENEROUS)]
    if spec.rules.hierarchy:
        cases.append(("max_depth", (5, 5, 1)))
    for rule, limits in cases:
        if rule not in spec.promises:
            continue
        t = p.task(limits)
        first = p.agent(t, "twin") if t else None
        if t is None or first is None:
            continue
        parent = first if rule == "max_depth" else ORCHESTRATOR
        agent_type = "twin" if rule == "unique_type" else "other"
        got, _ = p.run(Command("deploy", t, f"a{next(p.numbers)}", agent_type, parent=parent))
        if got.outcome != "fail":
            left = sorted(spec.promises - {rule})
            p.mismatch(f"deploy past {rule} (limits {limits})", f"returned {got.outcome}"
                                                                 + (f" ({got.error})" if got.error else ""),
                       f"{rule} is promised (a refusal raises Rejected)",
                       f"promises = {_set(set(left))}" if got.outcome == "ok" else "")


def _probe_documents(p: _Probe) -> None:
    for handle, task_id in p.ids.items():
        if not handle.startswith("t"):
            continue
        doc = p.adapter.read_task(task_id)
        shape = p.spec.shape_problems(doc)
        if shape:
            p.mismatch(f"read_task of task {handle}", f"returned a document the harness cannot read: {shape[0]}",
                       "it is {'agents': [{'id': ..., 'status': ...}, ...]}")
            continue
        for v in p.spec.task_violations(task_id, doc):
            suggestion = ""
            if v.rule == "count_drift" and not any(k in doc for k in ("total_spawned", "active_count")):
                suggestion = "Rules(counters=False)"
            elif v.rule == "count_drift" and "completed_count" in v.message:
                suggestion = "Rules(completed_count=None)"
            elif v.rule in ("broken_hierarchy", "wrong_depth") and "parent" not in str(doc):
                suggestion = "Rules(hierarchy=False)"
            p.mismatch(f"the document of task {handle} after the probes", f"breaks an invariant: {v.message}",
                       "the invariants of the declared rules", suggestion, kind="rules" if suggestion else "bug")


PROBES: tuple[Callable[[_Probe, str], None], ...] = (_probe_updates, _probe_unknown, _probe_kills, _probe_terminal,
                                                     _probe_each_active_status, _probe_reconcile)


def check_contract(adapter: Any, spec: Spec) -> list[Mismatch]:
    """Drive every edge the rules cover through *adapter*, in this process, and return where the registry differs
    from *spec*.  The caller provides a fresh workspace behind the adapter and a private tmux server."""
    p = _Probe(adapter, spec)
    for probe in PROBES:
        t = p.task()
        if t is None:
            break
        probe(p, t)
    _probe_limits(p)
    _probe_documents(p)
    seen: set[str] = set()
    unique = []
    for m in p.found:
        if str(m) not in seen:
            seen.add(str(m))
            unique.append(m)
    return unique


def render(impl: str, mismatches: list[Mismatch], seconds: float) -> str:
    head = (f"orch: the registry {impl} does not do what its declared rules say"
            f" ({len(mismatches)} difference{'s' if len(mismatches) != 1 else ''}, conformance run {seconds:.1f} s):")
    lines = [head, *[f"\n[contract] {m}" for m in mismatches]]
    lines.append("\nThe concurrent tests are skipped until the rules match: judged by rules the registry does not"
                 " follow, every difference would read as a lost update.")
    return "\n".join(lines)


@dataclass
class Verdict:
    """What the conformance run found for one implementation."""

    impl: str
    mismatches: list[Mismatch]
    seconds: float
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.mismatches and not self.error

    @property
    def rules_hold(self) -> bool:
        """No difference the concurrent tests would misread as lost writes (a plain bug they report themselves)."""
        return not self.error and all(m.kind == "bug" for m in self.mismatches)

    def report(self) -> str:
        if self.error:
            return f"orch: the conformance run of {self.impl} could not run: {self.error}"
        return render(self.impl, self.mismatches, self.seconds)


_verdicts: dict[str, Verdict] = {}


def verdict_for(impl: str) -> Verdict:
    """The conformance verdict on *impl*, run once per process in a fresh workspace on a private tmux server."""
    if impl not in _verdicts:
        import os
        import shutil
        import tempfile

        from .tmux import QUIET_AGENT_COMMAND, private_server

        root = Path(tempfile.mkdtemp(prefix="orch-contract-"))
        saved = os.environ.get("ORCH_AGENT_COMMAND")
        os.environ.setdefault("ORCH_AGENT_COMMAND", QUIET_AGENT_COMMAND)
        try:
            with private_server(root / "tmux"):
                (root / "ws").mkdir()
                _verdicts[impl] = run_contract(impl, root / "ws")
        finally:
            if saved is None:
                os.environ.pop("ORCH_AGENT_COMMAND", None)
            shutil.rmtree(root, ignore_errors=True)
    return _verdicts[impl]


def run_contract(impl: str, workspace: Path) -> Verdict:
    """Open *impl* on *workspace* (empty; the caller sets up a private tmux server) and check its contract."""
    from .adapter import load_factory
    from .spec import spec_of

    start = time.monotonic()
    try:
        adapter = load_factory(impl)(workspace)
        mismatches = check_contract(adapter, spec_of(adapter))
    except Exception as exc:
        return Verdict(impl, [], time.monotonic() - start, f"{raised(exc).error} ({raised(exc).where})")
    return Verdict(impl, mismatches, time.monotonic() - start)

