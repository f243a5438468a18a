"""Graft's Python client (`graft.client`) and the `graft` command (`graft.cli`)."""

from graft.client import Client, GraftError, TrainingFailed
from graft.inputs import Examples

__all__ = ["Client", "Examples", "GraftError", "TrainingFailed"]
