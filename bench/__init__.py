"""Benchmarks and load tests: `python -m bench.engine`, `python -m bench.agreement`, `python -m bench.loadtest`."""
