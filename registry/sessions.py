"""Every tmux call the registry makes, behind one seam.

:class:`TmuxSessions` talks to a tmux server through libtmux.  Which server: an explicit ``socket_path`` or
``socket_name``, else ``ORCH_TMUX_SOCKET`` (a socket name), else tmux's own default, which honours ``TMUX_TMPDIR``.
Tests and the harness set ``TMUX_TMPDIR`` to a private directory, so they run on a private server.

The one subtle rule lives in :meth:`TmuxSessions.alive`: a server that is not running has no sessions, but a query
that failed for any other reason says nothing, and raises, so that nobody reaps agents on the strength of it.
"""

from __future__ import annotations

import os
import shlex
import stat
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import libtmux
from libtmux import exc as tmux_exc

from .errors import SessionError

#: tmux's answers when no server listens on the socket: then there are no sessions, which is a fact, not a failure.
_NO_SERVER = ("no server running", "No such file or directory", "Connection refused")
#: tmux's answer when the server went away mid-query, as it does when its last session ends.
_EXITING = "server exited unexpectedly"
_EXITING_RETRIES = 10

DEFAULT_AGENT_COMMAND = "{python} -m registry.stub_agent --base {base} --task {task_id} --agent {agent_id}"


def agent_command(template: str | None, *, base: Path, task_id: str, agent_id: str) -> str:
    """The shell command a new agent's session runs: *template* or ``ORCH_AGENT_COMMAND`` or the stub agent.

    The template may use ``{python}``, ``{base}``, ``{task_id}`` and ``{agent_id}``; values are shell-quoted.
    """
    template = template or os.environ.get("ORCH_AGENT_COMMAND") or DEFAULT_AGENT_COMMAND
    return template.format(python=shlex.quote(sys.executable), base=shlex.quote(str(base)),
                           task_id=shlex.quote(task_id), agent_id=shlex.quote(agent_id))


def _literal(argument: str) -> str:
    """*argument* as tmux takes it literally from its command line: tmux reads a trailing ``;`` of any argument as
    the end of a command (a workspace ``/srv/ws;`` made every deploy fail), and ``\\;`` as a literal ``;``."""
    return argument[:-1] + "\\;" if argument.endswith(";") else argument


class TmuxSessions:
    """Start, kill and list agent sessions on one tmux server."""

    def __init__(self, *, socket_name: str | None = None, socket_path: str | Path | None = None,
                 tmux_bin: str | Path | None = None) -> None:
        """*tmux_bin*: the tmux executable (default: ``tmux`` on PATH); chaos tests point it at a failing one."""
        if socket_path is None and socket_name is None:
            socket_name = os.environ.get("ORCH_TMUX_SOCKET") or None
        self.socket_name = socket_name
        self.socket_path = None if socket_path is None else Path(socket_path)
        self.server = libtmux.Server(socket_name=socket_name, socket_path=socket_path, tmux_bin=tmux_bin)

    def __repr__(self) -> str:
        return f"TmuxSessions({self.server!r})"

    def start(self, name: str, command: str, environment: Mapping[str, str] | None = None) -> None:
        """Start detached session *name* running *command*.  SessionError if tmux refuses."""
        env = {key: _literal(value) for key, value in (environment or {}).items()}
        try:
            self.server.new_session(session_name=name, window_command=_literal(command), attach=False,
                                    environment=env)
        except (tmux_exc.LibTmuxException, OSError) as exc:
            raise SessionError(f"tmux could not start session {name}: {exc}", session=name) from exc

    def kill(self, name: str) -> bool:
        """Kill session *name*; return False if it was not there.  SessionError if tmux fails otherwise."""
        try:
            proc = self.server.cmd("kill-session", "-t", f"={name}")
        except (tmux_exc.LibTmuxException, OSError) as exc:
            raise SessionError(f"tmux could not kill session {name}: {exc}", session=name) from exc
        if proc.returncode == 0:
            return True
        stderr = " ".join(proc.stderr)
        if "can't find session" in stderr or any(marker in stderr for marker in _NO_SERVER):
            return False
        raise SessionError(f"tmux could not kill session {name}: {stderr}", session=name)

    def alive(self) -> set[str]:
        """Names of every live session.  Raises SessionError when the query itself failed.

        A server that is not running (no socket, or a dead one) has no sessions: that is an empty set.  A server
        that went away while answering (it exits with its last session) is asked again, briefly, before giving up.
        """
        for attempt in range(_EXITING_RETRIES + 1):
            try:
                proc = self.server.cmd("list-sessions", "-F", "#{session_name}")
            except (tmux_exc.LibTmuxException, OSError) as exc:
                raise SessionError(f"could not list tmux sessions: {exc}") from exc
            if proc.returncode == 0:
                return {line for line in proc.stdout if line}
            stderr = " ".join(proc.stderr)
            if any(marker in stderr for marker in _NO_SERVER):
                self._check_socket()
                return set()
            if _EXITING not in stderr or attempt == _EXITING_RETRIES:
                break
            time.sleep(0.02)
        raise SessionError(f"could not list tmux sessions (tmux exit {proc.returncode}): {stderr or 'no message'}")

    def socket(self) -> Path:
        """The socket this server listens on, resolved as tmux resolves it (``TMUX_TMPDIR``, the socket name)."""
        if self.socket_path is not None:
            return self.socket_path
        directory = Path(os.environ.get("TMUX_TMPDIR") or "/tmp") / f"tmux-{os.geteuid()}"
        return directory / (self.socket_name or "default")

    def _check_socket(self) -> None:
        """"No server" is a fact only if the socket is absent or a socket; anything else there is a broken setup."""
        path = self.socket()
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            return
        except OSError as exc:
            raise SessionError(f"could not list tmux sessions: {path}: {exc.strerror or exc}") from exc
        if not stat.S_ISSOCK(mode):
            raise SessionError(f"could not list tmux sessions: {path} exists and is not a socket, so no tmux server"
                               " can be listening there; nothing can be said about the sessions")

    def kill_server(self) -> None:
        self.server.kill()
