"""The ready-made suite: `pytest --pyargs pytest_orch.suite --orch-impl=package.module:factory`."""
