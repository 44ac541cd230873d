"""A private tmux server for a test: its own ``TMUX_TMPDIR``, never the user's server, every session killed after."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator, MutableMapping
from pathlib import Path

#: What an agent's session runs under the harness: a real process that does nothing and costs nothing.
QUIET_AGENT_COMMAND = "sleep 86400"


def private_env(tmux_dir: Path) -> dict[str, str]:
    """Environment changes that put tmux, libtmux and the registry on a private server under *tmux_dir*."""
    return {"TMUX_TMPDIR": str(tmux_dir), "TMUX": "", "TMUX_PANE": "", "ORCH_TMUX_SOCKET": ""}


def apply(env: MutableMapping[str, str], changes: dict[str, str]) -> None:
    for key, value in changes.items():
        if value:
            env[key] = value
        else:
            env.pop(key, None)


def kill_server(tmux_dir: Path) -> None:
    """Kill the private server under *tmux_dir*, if one runs."""
    import libtmux

    for socket in tmux_dir.glob("tmux-*/*"):
        with contextlib.suppress(Exception):
            libtmux.Server(socket_path=socket).kill()


@contextlib.contextmanager
def private_server(tmux_dir: Path) -> Iterator[Path]:
    """Point this process (and every child it starts) at a private tmux server for the duration."""
    tmux_dir.mkdir(parents=True, exist_ok=True)
    saved = {k: os.environ.get(k) for k in private_env(tmux_dir)}
    apply(os.environ, private_env(tmux_dir))
    try:
        yield tmux_dir
    finally:
        kill_server(tmux_dir)
        apply(os.environ, {k: v or "" for k, v in saved.items()})


def live_sessions() -> dict[str, float]:
    """The sessions of the tmux server this process's environment points at, with when each was created (epoch
    seconds); empty when no server runs.  Raises OSError when tmux answers with an error of another kind."""
    proc = subprocess.run(["tmux", "list-sessions", "-F", "#{session_created} #{session_name}"], capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        if any(text in proc.stderr for text in GONE):
            return {}
        raise OSError(f"tmux list-sessions failed (exit {proc.returncode}): {proc.stderr.strip()}")
    out = {}
    for line in proc.stdout.splitlines():
        created, _, name = line.partition(" ")
        if name:
            out[name] = float(created) if created.isdigit() else 0.0
    return out


#: What tmux answers when the session, or its whole server, is already gone: the kill is done, not an error.
GONE = ("can't find session", "no server running", "no current session", "No such file", "error connecting",
        "server exited unexpectedly", "no current target")


def kill_session(name: str) -> bool:
    """Kill tmux session *name* on the server this process's environment points at (the harness's own kill, never
    the registry's).  Returns whether it was alive; a session or server already gone is not an error."""
    proc = subprocess.run(["tmux", "kill-session", "-t", f"={name}"], capture_output=True, text=True, check=False)
    if proc.returncode == 0:
        return True
    if any(text in proc.stderr for text in GONE):
        return False
    raise OSError(f"tmux kill-session -t ={name} failed (exit {proc.returncode}): {proc.stderr.strip()}")
