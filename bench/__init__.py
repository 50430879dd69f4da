"""Benchmarks: deterministic data generators and runners that print figures."""
