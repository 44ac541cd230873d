"""Every error the registry raises, in one tree.

    RegistryError
    ├── InvalidArgument(ValueError)      a value the registry cannot take (a limit below 1, a progress over 100)
    │   └── InvalidName                  a task id or agent type that could escape the workspace or break tmux
    ├── UnknownTask(LookupError)         no such task registry
    ├── UnknownAgent(LookupError)        no such agent in the task
    ├── InvalidTransition(ValueError)    an unknown status, or leaving a terminal one
    ├── LimitExceeded                    max_agents, max_concurrent or max_depth would be broken
    │   └── DuplicateAgent               a second active agent of the same type
    ├── LockTimeout(TimeoutError)        the lock could not be had in time; nothing was written
    ├── CorruptRegistry(ValueError)      a registry file that does not parse, or has the wrong shape
    ├── RegistryMissing(FileNotFoundError)  the global registry is gone while tasks exist
    ├── UnsafePath(OSError)              a symlink or a stray where a registry file, backup, lock, queue or
    │                                    task directory belongs, or a lock that cannot be opened; nothing was written
    ├── SessionError(OSError)            tmux could not start, kill or list sessions
    └── WriteFailed(OSError)             the durable write failed part way: the change may or may not be on disk

``applied`` tells a caller (the harness in particular) what an error means for the operation: ``False`` when it was
certainly not applied, ``None`` when nobody can know.  Every error pickles, so it can cross a process boundary.
"""

from __future__ import annotations

from typing import Any


class RegistryError(Exception):
    """Root of every error the registry raises."""

    #: False: the operation was certainly not applied.  None: it may or may not have been.
    applied: bool | None = False

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        for key, value in details.items():
            setattr(self, key, value)

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild, (type(self), self.message, self.details)

    def __str__(self) -> str:
        return self.message


def _rebuild(cls: type[RegistryError], message: str, details: dict[str, Any]) -> RegistryError:
    return cls(message, **details)


class InvalidArgument(RegistryError, ValueError):
    """A value the registry cannot take."""


class InvalidName(InvalidArgument):
    """A task id or agent type that is empty, too long, or holds characters unsafe for paths and tmux."""

    kind: str = ""  # what the name is for: "task id", "agent type", "parent"
    value: object = None


class UnknownTask(RegistryError, LookupError):
    """No task registry with that id in the workspace."""

    task_id: str | None = None


class UnknownAgent(RegistryError, LookupError):
    """No agent with that id in the task registry."""

    task_id: str | None = None
    agent_id: str | None = None


class InvalidTransition(RegistryError, ValueError):
    """An unknown status, or a change to an agent that is already in a terminal status."""


class LimitExceeded(RegistryError):
    """The operation would break max_agents, max_concurrent or max_depth."""

    task_id: str | None = None
    limit: str = ""  # "max_agents", "max_concurrent", "max_depth", or "unique_type" for a DuplicateAgent


class DuplicateAgent(LimitExceeded):
    """The task already has an active agent of that type."""

    limit = "unique_type"
    existing: str = ""  # the id of the active agent of that type


class LockTimeout(RegistryError, TimeoutError):
    """The registry lock could not be acquired in time.  Nothing was read or written."""

    path: str = ""
    timeout: float = 0.0


class CorruptRegistry(RegistryError, ValueError):
    """A registry file does not parse as JSON, or is JSON of the wrong shape.  It was left untouched.

    ``path`` is the file, ``backup`` the copy to restore from (None if there is none), ``line`` and ``column`` where
    parsing failed (None when the JSON parsed but has the wrong shape).
    """

    path: str = ""
    backup: str | None = None
    line: int | None = None
    column: int | None = None


class RegistryMissing(RegistryError, FileNotFoundError):
    """The global registry is missing although task registries exist."""


class UnsafePath(RegistryError, OSError):
    """A registry path that is not what the registry put there (a symlink, a directory where a file belongs, a file
    where a directory belongs), or that cannot be opened.  It was not followed, and nothing was written.

    ``path`` is the offending path.
    """

    path: str = ""


class SessionError(RegistryError, OSError):
    """tmux failed to start, kill or list sessions."""

    session: str | None = None


class WriteFailed(RegistryError, OSError):
    """Writing a registry failed part way; the change may or may not have reached the disk."""

    applied = None
    path: str = ""
