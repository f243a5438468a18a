"""Benchmarks: scripts run from the checkout (README, Benchmarks)."""
