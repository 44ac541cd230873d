"""pytest-benchmark suites for the registry and the harness; run with ``pytest benchmarks/`` (see README.md)."""
