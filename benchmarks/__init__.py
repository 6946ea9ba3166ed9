"""Benchmarks of the engine on this machine: each prints its figures, the machine and the settings."""
