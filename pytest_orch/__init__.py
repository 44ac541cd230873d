"""pytest-orch: run N real processes against an agent registry and prove nothing was lost."""
