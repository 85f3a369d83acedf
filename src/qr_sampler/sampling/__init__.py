"""Batched sampling math: amplification, temperature, selection."""
