"""Everything inside a worker: RQ tasks, the worker, one run from admission to its outcome."""
