"""Benchmarks of paiv-sync against the limits it should approach; run ``python bench/run.py``."""
