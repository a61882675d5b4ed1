# RQ entries enqueued before the worker code moved to runs/ name jobs.tasks.run_job: this
# re-export serves them. Remove it one release after the move.
from runs.tasks import run_job  # noqa: F401
