"""pytest-orch: run N real processes against an agent registry and prove nothing was lost."""

from .spec import Rules, Spec

__all__ = ["Rules", "Spec"]
