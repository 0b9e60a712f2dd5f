"""Benchmarks for lorafleet (run from the repository root, e.g. `python -m bench.serve_mixed`)."""
