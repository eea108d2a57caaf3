"""Benchmarks of the issues; `make bench` runs them all (see run_all.py)."""
