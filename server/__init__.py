"""modelsrv's processes and I/O: the master's signal cycle, workers, front doors, batching, metrics."""

__version__ = "0.1.0"
