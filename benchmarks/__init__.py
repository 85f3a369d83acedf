"""Benchmarks (``make bench`` runs them all: ``python -m benchmarks.run_all``)."""
