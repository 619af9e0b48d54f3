"""Benchmarks of fedtray: each module is a script (``python -m benchmarks.<name>``) that
measures one thing on this machine and prints its figures; none is imported by fedtray."""
