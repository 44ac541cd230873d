"""The one sequential specification of a registry, and the rules a registry declares.

Every judgement the harness makes about what an operation may do goes through :class:`Spec`: the per-agent
lost-update search and the lost-insert, limit and duplicate checks of :mod:`pytest_orch.checks`, the document
invariants, the conformance run (:mod:`pytest_orch.conformance`) and the Hypothesis state machine
(:mod:`pytest_orch.stateful`).  It is pure: one method per operation on a model state, returning the new state or a
refusal, in the manner of Porcupine's ``Model{Init, Step}``, Knossos' models and Lincheck's sequential
specifications.  No other copy of the status rules lives in ``pytest_orch``.

A registry is judged by the rules it declares.  An adapter says them with a class attribute::

    from pytest_orch import Rules

    class Adapter:
        rules = Rules(kill_of_terminal="ignored")    # an idempotent kill; every other rule as the reference's

:class:`Rules` defaults to the reference registry's rules.  A registry whose behaviour no ``Rules`` describes passes
a subclass of :class:`Spec` instead (``spec = MySpec``); see :class:`Spec` for an example.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

from .linearize import Applied, Refused

__all__ = ["ALL_PROMISES", "ORCHESTRATOR", "AgentModel", "Command", "Effect", "RegistryModel", "Rules", "Spec",
           "TaskModel", "Violation", "rules_of", "spec_of"]

#: The limits and deduplication an adapter may promise; checks of those it does not promise are skipped.
ALL_PROMISES = frozenset({"unique_type", "max_agents", "max_concurrent", "max_depth"})
ORCHESTRATOR = "orchestrator"

_REFERENCE_ACTIVE = frozenset({"running", "working", "blocked"})
_REFERENCE_TERMINAL = frozenset({"completed", "terminated", "error", "failed"})

KillOfTerminal = Literal["refused", "ignored", "applied"]
UnknownStatus = Literal["refused", "stored"]
UnknownAgent = Literal["refused", "ignored"]
Scope = Literal["task", "registry"]


@dataclass(frozen=True)
class Rules:
    """What a registry does where legitimate designs differ.  The defaults are the reference registry's rules.

    Statuses: ``active``, ``terminal`` and ``hidden`` (a tombstone: an agent in it reads as absent) are the
    registry's vocabulary; the checks, reports and the state machine speak it, nothing is translated.

    - ``terminal_is_final``: False when an update may move a terminal agent to any status (and is applied); one
      that makes it active again is admitted as a deploy is, refused when it would break a promised
      ``unique_type`` or ``max_concurrent``.
    - ``kill_of_terminal``: a kill of a terminal agent is ``"refused"`` (Rejected), ``"ignored"`` (ok, nothing
      changes) or ``"applied"`` (ok, the agent becomes ``killed_to``).
    - ``reaped``/``reaped_to``: the statuses reconcile reaps when the agent's session is gone, and what it sets.
    - ``unknown_status``: an update to a status outside the vocabulary is ``"refused"`` or ``"stored"`` (kept as
      given, counted as active).
    - ``completed_count``: the statuses ``completed_count`` counts; None: that counter is not checked.
    - ``settable``: the statuses an update can set (None: every active and terminal one); ``unsettable``: statuses of
      the vocabulary an update refuses.  The workloads generate no update to a status in neither set: the registry
      has no command for it.
    - ``deployed_as``: a new agent's status; ``killed_to``: the status a kill sets.
    - ``progress``: False when agents have no progress: updates and lost-update checks compare status only.
    - ``counters``: False when the documents store no ``total_spawned``/``active_count``/``completed_count`` (a
      count computed at read time proves nothing, so say so): the count checks are skipped, and the report says so.
    - ``hierarchy``: False when agents have no parent, depth or ``agent_hierarchy``: the depth workloads are skipped.
    - ``reconcile_scope``: ``"registry"`` when one status call reconciles every task in the registry.
    - ``unknown_agent``: an update or kill of an agent the task does not have is ``"refused"`` or ``"ignored"``.
    - ``session_field``: the agent key naming its tmux session (``agent_<id>`` when the key is absent).
    """

    active: frozenset[str] = _REFERENCE_ACTIVE
    terminal: frozenset[str] = _REFERENCE_TERMINAL
    terminal_is_final: bool = True
    kill_of_terminal: KillOfTerminal = "refused"
    reaped: frozenset[str] = _REFERENCE_ACTIVE
    reaped_to: str = "terminated"
    unknown_status: UnknownStatus = "refused"
    completed_count: frozenset[str] | None = frozenset({"completed"})
    hidden: frozenset[str] = frozenset()
    settable: frozenset[str] | None = None
    unsettable: frozenset[str] = frozenset()
    deployed_as: str = "running"
    killed_to: str = "terminated"
    progress: bool = True
    counters: bool = True
    hierarchy: bool = True
    reconcile_scope: Scope = "task"
    unknown_agent: UnknownAgent = "refused"
    session_field: str = "tmux_session"

    def __post_init__(self) -> None:
        for name in ("active", "terminal", "reaped", "hidden", "unsettable"):
            object.__setattr__(self, name, frozenset(getattr(self, name)))
        for name in ("completed_count", "settable"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, frozenset(getattr(self, name)))
        problems = []
        for a, b in (("active", "terminal"), ("active", "hidden"), ("terminal", "hidden")):
            both = getattr(self, a) & getattr(self, b)
            if both:
                problems.append(f"{sorted(both)} are both {a} and {b}")
        for name in ("deployed_as",):
            if getattr(self, name) not in self.active:
                problems.append(f"{name}={getattr(self, name)!r} is not an active status")
        for name in ("killed_to", "reaped_to"):
            if getattr(self, name) not in self.terminal | self.hidden:
                problems.append(f"{name}={getattr(self, name)!r} is not a terminal or hidden status")
        for name, allowed in (("kill_of_terminal", ("refused", "ignored", "applied")),
                              ("unknown_status", ("refused", "stored")), ("unknown_agent", ("refused", "ignored")),
                              ("reconcile_scope", ("task", "registry"))):
            if getattr(self, name) not in allowed:
                problems.append(f"{name}={getattr(self, name)!r} is not one of {', '.join(map(repr, allowed))}")
        outside = (self.settable or frozenset()) | self.unsettable
        if outside - self.statuses:
            problems.append(f"settable/unsettable name {sorted(outside - self.statuses)}, which are not statuses of"
                            " active, terminal or hidden")
        if problems:
            raise ValueError("Rules(...): " + "; ".join(problems))

    @property
    def statuses(self) -> frozenset[str]:
        """The registry's vocabulary."""
        return self.active | self.terminal | self.hidden

    @property
    def update_statuses(self) -> frozenset[str]:
        """The statuses an update may set."""
        return (self.active | self.terminal) - self.unsettable if self.settable is None else self.settable

    @property
    def commanded(self) -> frozenset[str]:
        """The statuses workloads may send an update to: the ones it sets and the ones it refuses."""
        return self.update_statuses | self.unsettable

    def is_active(self, status: object) -> bool:
        """Active, or an unknown status a registry with ``unknown_status="stored"`` kept (it counts as active)."""
        return status in self.active or (self.unknown_status == "stored" and isinstance(status, str)
                                         and status not in self.statuses)

    def differences(self) -> list[str]:
        """``name=value`` of every field that differs from the reference's rules, for reports."""
        default = Rules()
        out = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value != getattr(default, f.name):
                shown = sorted(value) if isinstance(value, frozenset) else value
                out.append(f"{f.name}={shown!r}")
        return out


def rules_of(adapter: object) -> Rules:
    """The rules *adapter* declares (its ``rules`` attribute), else the reference's."""
    rules = getattr(adapter, "rules", None)
    if rules is None:
        return Rules()
    if not isinstance(rules, Rules):
        raise TypeError(f"{type(adapter).__name__}.rules must be a pytest_orch.Rules, not {type(rules).__name__}")
    return rules


def spec_of(adapter: object, promises: frozenset[str] | None = None) -> Spec:
    """The specification *adapter* is judged by: its ``spec`` class (a :class:`Spec` subclass) or :class:`Spec`,
    made with its rules and promises."""
    cls = getattr(adapter, "spec", None) or Spec
    if not (isinstance(cls, type) and issubclass(cls, Spec)):
        raise TypeError(f"{type(adapter).__name__}.spec must be a subclass of pytest_orch.spec.Spec, not {cls!r}")
    if promises is None:
        promises = frozenset(getattr(adapter, "promises", ALL_PROMISES)) & ALL_PROMISES
    return cls(rules_of(adapter), promises)


# --------------------------------------------------------------------------------------------------------------------
# The model state


@dataclass(frozen=True)
class AgentModel:
    """What the model knows of one agent.  ``parent`` is a handle or ``orchestrator``; ``session``: is it alive."""

    handle: str
    type: str
    parent: str
    depth: int
    status: str = "running"
    progress: int = 0
    session: bool = True


@dataclass(frozen=True)
class TaskModel:
    handle: str
    max_agents: int
    max_concurrent: int
    max_depth: int
    agents: tuple[AgentModel, ...] = ()

    def __hash__(self) -> int:  # the search hashes states constantly: compute it once
        cached: int | None = self.__dict__.get("_hash")
        if cached is None:
            cached = hash((self.handle, self.max_agents, self.max_concurrent, self.max_depth, self.agents))
            object.__setattr__(self, "_hash", cached)
        return cached

    def agent(self, handle: str) -> AgentModel | None:
        return next((a for a in self.agents if a.handle == handle), None)

    def replace_agent(self, agent: AgentModel) -> TaskModel:
        return replace(self, agents=tuple(agent if a.handle == agent.handle else a for a in self.agents))


@dataclass(frozen=True)
class RegistryModel:
    """The whole registry as the model sees it: hashable, so the linearizability search can memoize it."""

    tasks: tuple[TaskModel, ...] = ()

    def __hash__(self) -> int:
        cached: int | None = self.__dict__.get("_hash")
        if cached is None:
            cached = hash(self.tasks)
            object.__setattr__(self, "_hash", cached)
        return cached

    def task(self, handle: str) -> TaskModel | None:
        return next((t for t in self.tasks if t.handle == handle), None)

    def replace_task(self, task: TaskModel) -> RegistryModel:
        return replace(self, tasks=tuple(task if t.handle == task.handle else t for t in self.tasks))


@dataclass(frozen=True)
class Command:
    """One operation in the model's terms (handles).  For a deploy, ``agent`` is the handle the new agent gets."""

    kind: str
    task: str
    agent: str = ""
    agent_type: str = ""
    parent: str = ORCHESTRATOR
    status: str = ""
    progress: int = 0
    limits: tuple[int, int, int] = (0, 0, 0)

    def __hash__(self) -> int:  # a key of the specification's cache, hashed at every step of the search
        cached: int | None = self.__dict__.get("_hash")
        if cached is None:
            cached = hash((self.kind, self.task, self.agent, self.agent_type, self.parent, self.status, self.progress,
                           self.limits))
            object.__setattr__(self, "_hash", cached)
        return cached

    def __repr__(self) -> str:
        return str(self)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # how Hypothesis prints a drawn burst
        printer.text(str(self))

    def __str__(self) -> str:
        if self.kind == "create_task":
            return "create_task(max_agents={}, max_concurrent={}, max_depth={}) -> {}".format(*self.limits, self.task)
        if self.kind == "deploy":
            return f"deploy({self.task}, {self.agent_type!r}, parent={self.parent})" + (f" -> {self.agent}"
                                                                                           if self.agent else "")
        if self.kind == "update":
            return f"update({self.agent}, {self.status!r}, progress={self.progress})"
        if self.kind == "lose_session":
            return f"tmux kill-session of {self.agent} (behind the registry's back)"
        if self.kind == "kill":
            return f"kill({self.agent})"
        return f"{self.kind}({self.task})"


Effect = Applied[RegistryModel] | Refused


@dataclass(frozen=True)
class Violation:
    """One broken invariant of the documents.  ``rule`` is a stable name; ``message`` reads on its own."""

    rule: str
    message: str
    task_id: str | None = None
    agent_id: str | None = None

    def __str__(self) -> str:
        return self.message


# --------------------------------------------------------------------------------------------------------------------
# The specification


@dataclass
class Spec:
    """What a registry must do under *rules*, enforcing the limits it *promises*; pure.

    Agent steps (:meth:`update`, :meth:`kill`, :meth:`reap`, :meth:`lose_session`) take and return an
    :class:`AgentModel` or a :class:`Refused`; :meth:`deploy_refusals` says which limits refuse a deploy;
    :meth:`apply` runs a :class:`Command` on a :class:`RegistryModel` (the state machine's step, and the one the
    linearizability search calls).  Where only a rule the registry does not promise would refuse a deploy, the
    specification allows both outcomes.

    For a registry no :class:`Rules` describes, override the step that differs and declare the class::

        class PausingSpec(Spec):
            '''"paused" agents are never reaped, and a kill of one is refused.'''

            def kill(self, agent):
                if agent.status == "paused":
                    return Refused("a paused agent cannot be killed")
                return super().kill(agent)

        class Adapter:
            rules = Rules(active=frozenset({"running", "paused"}), reaped=frozenset({"running"}))
            spec = PausingSpec

    >>> spec = Spec()
    >>> state = spec.apply(RegistryModel(), Command("create_task", "t0", limits=(1, 1, 1))).state
    >>> spec.apply(state, Command("deploy", "t0", "a0", "builder"))           # doctest: +ELLIPSIS
    Applied(state=RegistryModel(tasks=(TaskModel(handle='t0', ...
    """

    rules: Rules = field(default_factory=Rules)
    promises: frozenset[str] = ALL_PROMISES

    def __post_init__(self) -> None:
        self.promises = frozenset(self.promises) & ALL_PROMISES
        self._cache: dict[tuple[RegistryModel, Command], Effect | tuple[Effect, ...]] = {}

    # -- agents -----------------------------------------------------------------------------------------------------

    def is_active(self, agent: AgentModel) -> bool:
        return self.rules.is_active(agent.status)

    def is_terminal(self, status: object) -> bool:
        return status in self.rules.terminal

    def is_hidden(self, status: object) -> bool:
        """A tombstone: the agent reads as absent."""
        return status in self.rules.hidden

    def new_agent(self, handle: str, agent_type: str, parent: str, depth: int) -> AgentModel:
        return AgentModel(handle, agent_type, parent, depth, self.rules.deployed_as, 0, True)

    def update(self, agent: AgentModel, status: str, progress: int) -> AgentModel | Refused:
        r = self.rules
        if self.is_hidden(agent.status):
            return Refused(f"{agent.handle} is {agent.status} (hidden)")
        if status not in r.statuses:
            if r.unknown_status == "refused":
                return Refused(f"{status!r} is not a status")
        elif status not in r.update_statuses:
            return Refused(f"{status!r} is not a status an update sets")
        if r.terminal_is_final and not self.rules.is_active(agent.status):
            return Refused(f"{agent.handle} is {agent.status}")
        return replace(agent, status=status, progress=progress if r.progress else 0)

    def kill(self, agent: AgentModel) -> AgentModel | Refused:
        r = self.rules
        if self.is_hidden(agent.status):
            return Refused(f"{agent.handle} is {agent.status} (hidden)")
        if not self.rules.is_active(agent.status):
            if r.kill_of_terminal == "refused":
                return Refused(f"{agent.handle} is {agent.status}")
            if r.kill_of_terminal == "ignored":
                return agent
        return replace(agent, status=r.killed_to, session=False)

    def reap(self, agent: AgentModel) -> AgentModel:
        """The agent after a reconcile: reaped when its status is one reconcile reaps and its session is gone."""
        if agent.status in self.rules.reaped and not agent.session:
            return replace(agent, status=self.rules.reaped_to)
        return agent

    @staticmethod
    def lose_session(agent: AgentModel) -> AgentModel:
        return replace(agent, session=False)

    def deploy_refusals(self, task: TaskModel, agent_type: str, depth: int) -> list[str]:
        """The rules a deploy of *agent_type* at *depth* would break in *task* (promised or not)."""
        active = [a for a in task.agents if self.is_active(a)]
        broken = []
        if any(a.type == agent_type for a in active):
            broken.append("unique_type")
        if len(task.agents) >= task.max_agents:
            broken.append("max_agents")
        if len(active) >= task.max_concurrent:
            broken.append("max_concurrent")
        if self.rules.hierarchy and depth > task.max_depth:
            broken.append("max_depth")
        return broken

    # -- the registry -----------------------------------------------------------------------------------------------

    def __call__(self, state: RegistryModel, call: Any) -> Effect | tuple[Effect, ...]:
        """The linearizability search's step: *call* holds a :class:`Command` in ``call.op``."""
        key = (state, call.op)
        effect = self._cache.get(key)
        if effect is None:
            if len(self._cache) > 100_000:
                self._cache.clear()
            effect = self._cache[key] = self.apply(state, call.op)
        return effect

    def apply(self, state: RegistryModel, cmd: Command) -> Effect | tuple[Effect, ...]:
        if cmd.kind == "create_task":
            if state.task(cmd.task) is not None:
                return Refused(f"task {cmd.task} exists")
            return Applied(replace(state, tasks=(*state.tasks, TaskModel(cmd.task, *cmd.limits))))
        task = state.task(cmd.task)
        if task is None:
            return Refused(f"no task {cmd.task}")
        if cmd.kind == "deploy":
            return self._deploy(state, task, cmd)
        if cmd.kind == "reconcile":
            scope = state.tasks if self.rules.reconcile_scope == "registry" else (task,)
            for t in scope:
                state = state.replace_task(replace(t, agents=tuple(self.reap(a) for a in t.agents)))
            return Applied(state)
        agent = task.agent(cmd.agent)
        if cmd.kind == "lose_session":
            if agent is None:
                return Applied(state)
            return Applied(state.replace_task(task.replace_agent(self.lose_session(agent))))
        if agent is None:
            if self.rules.unknown_agent == "ignored":
                return Applied(state)
            return Refused(f"{cmd.agent} is not an agent of {cmd.task}")
        if cmd.kind == "update":
            after = self.update(agent, cmd.status, cmd.progress)
            if not isinstance(after, Refused) and not self.is_active(agent) and self.is_active(after):
                return self._reactivate(state, task, after)
        elif cmd.kind == "kill":
            after = self.kill(agent)
        else:
            raise ValueError(f"unknown command kind {cmd.kind!r}")
        if isinstance(after, Refused):
            return after
        return Applied(state.replace_task(task.replace_agent(after)))

    def _deploy(self, state: RegistryModel, task: TaskModel, cmd: Command) -> Effect | tuple[Effect, ...]:
        if cmd.parent == ORCHESTRATOR:
            depth = 1
        elif not self.rules.hierarchy:
            return Refused("the registry has no hierarchy (Rules(hierarchy=False)): an agent has no children")
        else:
            parent = task.agent(cmd.parent)
            if parent is None:
                return Refused(f"parent {cmd.parent} is not an agent of {cmd.task}")
            depth = parent.depth + 1
        broken = self.deploy_refusals(task, cmd.agent_type, depth)
        hard = [r for r in broken if r in self.promises]
        if hard:
            return Refused(", ".join(hard))
        agent = self.new_agent(cmd.agent, cmd.agent_type, cmd.parent, depth)
        # Agents are kept in handle order, not deploy order, so that orders differing only in which concurrent
        # deploy came first meet in the same state (the documents' order is not compared).
        agents = tuple(sorted((*task.agents, agent), key=_handle_number))
        applied = Applied(state.replace_task(replace(task, agents=agents)))
        if broken:  # only rules the registry does not promise: it may refuse, or not
            return applied, Refused(", ".join(broken) + " (not promised)")
        return applied

    def _reactivate(self, state: RegistryModel, task: TaskModel, agent: AgentModel) -> Effect | tuple[Effect, ...]:
        """An update that makes a non-active agent active again (``terminal_is_final=False``) admits it as a deploy
        does: refused when it would break a promised limit (``unique_type``, ``max_concurrent``); either way when it
        would break only limits the registry does not promise."""
        others = [a for a in task.agents if a.handle != agent.handle and self.is_active(a)]
        broken = (["unique_type"] if any(a.type == agent.type for a in others) else []) \
            + (["max_concurrent"] if len(others) >= task.max_concurrent else [])
        hard = [r for r in broken if r in self.promises]
        if hard:
            return Refused(f"making {agent.handle} {agent.status} again would break " + ", ".join(hard))
        applied = Applied(state.replace_task(task.replace_agent(agent)))
        if broken:
            return applied, Refused(", ".join(broken) + " (not promised)")
        return applied

    def counters(self, agents: Iterable[AgentModel]) -> tuple[int, int, int | None]:
        """total_spawned, active_count, completed_count (None when the rules do not check it) of *agents*."""
        agents = list(agents)
        done = self.rules.completed_count
        return (len(agents), sum(self.is_active(a) for a in agents),
                None if done is None else sum(a.status in done for a in agents))

    # -- documents --------------------------------------------------------------------------------------------------

    def session_of(self, agent: Mapping[str, Any]) -> str:
        """The tmux session an agent record names."""
        return str(agent.get(self.rules.session_field) or f"agent_{agent.get('id')}")

    def visible(self, agents: Iterable[Any]) -> list[dict[str, Any]]:
        """The agent records of a document that are not tombstones (and are records with an id)."""
        return [a for a in agents if isinstance(a, dict) and "id" in a and not self.is_hidden(a.get("status"))]

    def shape_problems(self, doc: object) -> list[str]:
        """What keeps the harness from reading *doc* as a task document, or nothing."""
        if not isinstance(doc, dict):
            return [f"the document is a JSON {type(doc).__name__}, not an object"]
        agents = doc.get("agents")
        if not isinstance(agents, list):
            return ["'agents' is missing or not a list"]
        if not all(isinstance(a, dict) and isinstance(a.get("id"), str) for a in agents):
            return ["an entry of 'agents' is not an object with a string 'id'"]
        if "agent_hierarchy" in doc and not isinstance(doc["agent_hierarchy"], dict):
            return ["'agent_hierarchy' is not an object"]
        return []

    def task_violations(self, task_id: str, doc: Mapping[str, Any]) -> list[Violation]:
        """Every invariant of one task document that does not hold under the rules.

        Stored counters (when the rules say the registry keeps them) agree with the agents; ids are unique; every
        status is one of the vocabulary (unless unknown ones are stored); with a hierarchy, parents exist,
        ``agent_hierarchy`` (when present) matches them, and depths follow the parent chain; the promised limits hold.
        Depth is judged from the chain of parents in the document, not from stored depths.
        """
        out: list[Violation] = []
        r = self.rules
        every = [a for a in doc.get("agents", []) if isinstance(a, dict)]

        def v(rule: str, message: str, agent_id: str | None = None) -> None:
            out.append(Violation(rule, f"{task_id}: {message}", task_id, agent_id))

        active = sum(1 for a in every if r.is_active(a.get("status")))
        if r.counters:
            actual: dict[str, int] = {"total_spawned": len(every), "active_count": active}
            if r.completed_count is not None:
                actual["completed_count"] = sum(1 for a in every if a.get("status") in r.completed_count)
            for key, value in actual.items():
                if doc.get(key) != value:
                    v("count_drift", f"{key} is {doc.get(key)!r} but the agents list gives {value}")
        for agent_id, n in Counter(a.get("id") for a in every).items():
            if n > 1:
                v("duplicate_id", f"agent id {agent_id} appears {n} times", agent_id)
        if r.unknown_status == "refused":
            for a in every:
                if a.get("status") not in r.statuses:
                    v("unknown_status", f"agent {a.get('id')} has unknown status {a.get('status')!r}", a.get("id"))
        depths: dict[str, int | None] = {}
        if r.hierarchy:
            depths = self.depths(every)
            by_id = {a.get("id"): a for a in every}
            for a in every:
                parent = a.get("parent", ORCHESTRATOR)
                if parent != ORCHESTRATOR and parent not in by_id:
                    v("broken_hierarchy", f"agent {a.get('id')} has parent {parent!r}, which is not an agent of the"
                                          " task", a.get("id"))
                elif depths.get(a["id"]) is None:
                    v("broken_hierarchy", f"agent {a.get('id')} is in a cycle of parents", a.get("id"))
                elif "depth" in a and a["depth"] != depths[a["id"]]:
                    v("wrong_depth", f"agent {a['id']} has depth {a['depth']!r}, its chain of parents gives"
                                     f" {depths[a['id']]}", a["id"])
            hierarchy = doc.get("agent_hierarchy")
            if isinstance(hierarchy, dict):
                want = {(a.get("parent", ORCHESTRATOR), a["id"]) for a in every}
                have = {(p, c) for p, cs in hierarchy.items() for c in (cs if isinstance(cs, list) else [])}
                if want != have:
                    v("broken_hierarchy", f"agent_hierarchy disagrees with the parents: missing"
                                          f" {sorted(want - have)}, extra {sorted(have - want)}")
        limits = {k: doc.get(k) for k in ("max_agents", "max_concurrent", "max_depth")}
        if "max_concurrent" in self.promises and isinstance(limits["max_concurrent"], int) \
                and active > limits["max_concurrent"]:
            v("max_concurrent", f"{active} agents are active, over max_concurrent {limits['max_concurrent']}")
        if "max_agents" in self.promises and isinstance(limits["max_agents"], int) \
                and len(every) > limits["max_agents"]:
            v("max_agents", f"{len(every)} agents were spawned, over max_agents {limits['max_agents']}")
        if "max_depth" in self.promises and r.hierarchy and isinstance(limits["max_depth"], int):
            for agent_id, depth in depths.items():
                if depth is not None and depth > limits["max_depth"]:
                    v("max_depth", f"agent {agent_id} is at depth {depth} (by its chain of parents), over max_depth"
                                   f" {limits['max_depth']}", agent_id)
        return out

    @staticmethod
    def depths(agents: Iterable[Mapping[str, Any]]) -> dict[str, int | None]:
        """Each agent's depth by its chain of parents (the orchestrator's children are at 1); None in a cycle or
        under a parent that is missing."""
        parent_of = {a["id"]: a.get("parent", ORCHESTRATOR) for a in agents if "id" in a}
        out: dict[str, int | None] = {}
        for start in parent_of:
            chain = [start]
            node = start
            depth: int | None = None
            while True:
                parent = parent_of.get(node)
                if parent == ORCHESTRATOR:
                    depth = 0
                    break
                if parent is None or parent in chain:
                    break
                if parent in out:
                    depth = out[parent]
                    break
                chain.append(parent)
                node = parent
            for agent_id in reversed(chain):
                depth = None if depth is None else depth + 1
                out[agent_id] = depth
        return out

    def global_violations(self, glob: Mapping[str, Any], tasks: Mapping[str, Mapping[str, Any]], *,
                          complete: bool = True) -> list[Violation]:
        """Where the global registry disagrees with the task documents *tasks* (task id -> document).

        With *complete*, *tasks* is every task of the workspace, so the global registry must hold nothing else and
        its totals must equal the sums (when the rules say the registry keeps counters).
        """
        out: list[Violation] = []
        g_agents: Mapping[str, Any] = glob.get("agents") or {}
        g_tasks: Mapping[str, Any] = glob.get("tasks") or {}
        seen: set[str] = set()
        compared = ("task_id", "type", "status") + (("parent",) if self.rules.hierarchy else ())
        for task_id, doc in tasks.items():
            if task_id not in g_tasks:
                out.append(Violation("global_divergence", f"the global registry has no entry for task {task_id}",
                                     task_id))
            for agent in (a for a in doc.get("agents", []) if isinstance(a, dict) and "id" in a):
                agent_id = agent["id"]
                seen.add(agent_id)
                have = g_agents.get(agent_id)
                if have is None:
                    if not self.is_hidden(agent.get("status")):
                        out.append(Violation("global_divergence", f"agent {agent_id} of task {task_id} is missing"
                                                                  " from the global registry", task_id, agent_id))
                    continue
                want = {**agent, "task_id": task_id}
                diffs = [f"{k} {have.get(k)!r} (task says {want.get(k, ORCHESTRATOR if k == 'parent' else None)!r})"
                         for k in compared
                         if have.get(k) != want.get(k, ORCHESTRATOR if k == "parent" else None)]
                if diffs:
                    out.append(Violation("global_divergence", f"the global registry has agent {agent_id} with "
                                         + ", ".join(diffs), task_id, agent_id))
        for agent_id, have in g_agents.items():
            owner = have.get("task_id") if isinstance(have, dict) else None
            if agent_id not in seen and (complete or owner in tasks):
                out.append(Violation("global_divergence", f"the global registry has agent {agent_id} that task"
                                                          f" {owner} lacks", owner, agent_id))
        if not complete or not self.rules.counters:
            return out
        every = [a for t in tasks.values() for a in t.get("agents", []) if isinstance(a, dict)]
        sums = {"total_agents_spawned": len(every),
                "active_agents": sum(1 for a in every if self.rules.is_active(a.get("status"))),
                "total_tasks": len(tasks)}
        for key, value in sums.items():
            if key in glob and glob.get(key) != value:
                out.append(Violation("global_count_drift", f"global {key} is {glob.get(key)!r}, the tasks sum to"
                                                           f" {value}"))
        return out


def _handle_number(agent: AgentModel) -> int:
    return int(agent.handle[1:]) if agent.handle[1:].isdigit() else -1
