"""Typed inputs: the scenario the advisor reads (scenario.py) and the run spec a run executes (run.py)."""
