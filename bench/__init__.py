"""``python -m bench``: the pack's benchmarks, one table (see bench/README in the main README)."""
