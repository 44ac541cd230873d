"""The specification and the rules: defaults are the reference's, a declaration is checked when it is made, and a
registry no Rules describes is judged by a Spec subclass of its own (``spec = MySpec``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_orch import Rules, Spec
from pytest_orch.adapter import ReferenceAdapter, Rejected
from pytest_orch.conformance import check_contract
from pytest_orch.linearize import Applied, Refused
from pytest_orch.spec import AgentModel, Command, RegistryModel, TaskModel, rules_of, spec_of
from pytest_orch.tmux import QUIET_AGENT_COMMAND, private_server


def test_the_default_rules_are_the_reference_registrys() -> None:
    from registry import model

    rules = Rules()
    assert rules.active == model.ACTIVE
    assert rules.terminal == model.TERMINAL
    assert rules.differences() == []
    assert rules_of(object()) == rules


@pytest.mark.parametrize(("declaration", "message"), [
    ({"reaped_to": "running"}, "reaped_to='running' is not a terminal or hidden status"),
    ({"kill_of_terminal": "sometimes"}, "kill_of_terminal='sometimes' is not one of"),
    ({"active": frozenset({"done"}), "terminal": frozenset({"done"}), "deployed_as": "done"},
     "['done'] are both active and terminal"),
    ({"settable": frozenset({"paused"})}, "which are not statuses"),
])
def test_an_impossible_declaration_is_refused_when_it_is_made(declaration: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=r"Rules\(\.\.\.\): .*" + message.replace("[", r"\[").replace("(", r"\(")):
        Rules(**declaration)  # type: ignore[arg-type]


class NoKillWhileBlocked(Spec):
    """A registry that refuses to kill a blocked agent: no field of Rules says that."""

    def kill(self, agent: AgentModel) -> AgentModel | Refused:
        if agent.status == "blocked":
            return Refused("a blocked agent cannot be killed")
        return super().kill(agent)


class _NoKillWhileBlockedAdapter(ReferenceAdapter):
    def kill(self, task_id: str, agent_id: str) -> None:
        if any(a["id"] == agent_id and a["status"] == "blocked" for a in self.read_task(task_id)["agents"]):
            raise Rejected("blocked")
        super().kill(task_id, agent_id)


class Declared(_NoKillWhileBlockedAdapter):
    spec = NoKillWhileBlocked


def test_a_registry_judged_by_a_spec_of_its_own_conforms_and_without_it_does_not(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_AGENT_COMMAND", QUIET_AGENT_COMMAND)
    with private_server(tmp_path / "tmux"):
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        declared = Declared(tmp_path / "a")
        assert type(spec_of(declared)) is NoKillWhileBlocked
        assert check_contract(declared, spec_of(declared)) == []
        undeclared = _NoKillWhileBlockedAdapter(tmp_path / "b")
        found = check_contract(undeclared, spec_of(undeclared))
        assert found, "the conformance run missed a kill the default rules allow"
        assert any("kill" in m.operation and "blocked" in m.operation for m in found), [str(m) for m in found]


def test_a_spec_that_is_not_a_spec_subclass_is_refused_with_what_to_write() -> None:
    class Wrong:
        spec = dict

    with pytest.raises(TypeError, match=r"must be a subclass of pytest_orch\.spec\.Spec"):
        spec_of(Wrong())


def test_an_update_that_makes_a_terminal_agent_active_again_is_admitted_like_a_deploy() -> None:
    """With ``terminal_is_final=False``, a reactivation that would break a promised limit is refused; one that would
    break only an unpromised limit may go either way; one with room is applied."""
    done = AgentModel("a1", "coder", "orchestrator", 1, "completed")
    busy = AgentModel("a2", "tester", "orchestrator", 1, "running")
    twin = AgentModel("a3", "coder", "orchestrator", 1, "running")
    back = Command("update", "t1", "a1", status="running", progress=5)

    def state(max_concurrent: int, *others: AgentModel) -> RegistryModel:
        return RegistryModel((TaskModel("t1", 10, max_concurrent, 3, (done, *others)),))

    spec = Spec(Rules(terminal_is_final=False), frozenset({"unique_type", "max_concurrent"}))
    assert isinstance(spec.apply(state(2, busy), back), Applied)
    full = spec.apply(state(1, busy), back)
    assert isinstance(full, Refused)
    assert "max_concurrent" in full.reason
    same_type = spec.apply(state(5, twin), back)
    assert isinstance(same_type, Refused)
    assert "unique_type" in same_type.reason
    unpromised = Spec(Rules(terminal_is_final=False), frozenset()).apply(state(1, busy), back)
    assert isinstance(unpromised, tuple)
    assert {type(e) for e in unpromised} == {Applied, Refused}
    # Terminal to terminal takes no room, and with terminal_is_final (the default) any update of it is refused.
    assert isinstance(spec.apply(state(1, busy), Command("update", "t1", "a1", status="failed")), Applied)
    assert isinstance(Spec(Rules(), frozenset({"max_concurrent"})).apply(state(2, busy), back), Refused)
