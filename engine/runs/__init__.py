"""Runs: store, executor, worker, stages."""
