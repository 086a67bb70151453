"""The benchmark suite's building blocks: servers to compare, synthetic packages, the load tool,
and the report. `bench/run.py` ties them together; nothing here is imported by BatleHub itself."""


class BenchError(RuntimeError):
    """Something the benchmark needs is missing or broken: the run stops with this message."""
