"""modelsrv benchmarks: see docs/BENCHMARKS.md."""
