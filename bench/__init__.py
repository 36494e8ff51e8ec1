"""Benchmark scripts (run them as files: python3 bench/NAME.py)."""
