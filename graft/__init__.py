"""Graft's Python client (`graft.client`) and the `graft` command (`graft.cli`)."""

from graft.client import Client, Examples, GraftError, TrainingFailed

__all__ = ["Client", "Examples", "GraftError", "TrainingFailed"]
