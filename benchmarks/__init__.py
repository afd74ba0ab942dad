"""batchwire's benchmark suite: see benchmarks/README.md. Run with ``python -m benchmarks.run``."""
