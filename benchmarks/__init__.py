"""Benchmark scripts (run as `python benchmarks/<name>.py`; importable as `benchmarks.<name>` by the tests)."""
