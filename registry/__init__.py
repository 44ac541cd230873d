"""A registry of agents shared by many processes: locked, crash-safe, and honest about what is running."""

from __future__ import annotations

from .errors import (
    CorruptRegistry,
    DuplicateAgent,
    InvalidArgument,
    InvalidName,
    InvalidTransition,
    LimitExceeded,
    LockTimeout,
    RegistryError,
    RegistryMissing,
    SessionError,
    UnknownAgent,
    UnknownTask,
    UnsafePath,
    WriteFailed,
)
from .health import Finding, HealthReport, RepairReport, check, repair
from .model import ACTIVE, STATUSES, TERMINAL, Violation, global_violations, task_violations
from .ops import Registry, default_base
from .sessions import TmuxSessions

__all__ = [
    "ACTIVE",
    "STATUSES",
    "TERMINAL",
    "CorruptRegistry",
    "DuplicateAgent",
    "Finding",
    "HealthReport",
    "InvalidArgument",
    "InvalidName",
    "InvalidTransition",
    "LimitExceeded",
    "LockTimeout",
    "Registry",
    "RegistryError",
    "RegistryMissing",
    "RepairReport",
    "SessionError",
    "TmuxSessions",
    "UnknownAgent",
    "UnknownTask",
    "UnsafePath",
    "Violation",
    "WriteFailed",
    "check",
    "default_base",
    "global_violations",
    "repair",
    "task_violations",
]
