"""pytest-orch plugin (placeholder until the harness lands)."""
