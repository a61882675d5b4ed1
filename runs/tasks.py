"""RQ entry points. They take ids, not model instances, and stay thin."""

from __future__ import annotations

from rq import get_current_job

from runs import reconcile, runner


def run_job(code: str) -> str:
    current = get_current_job()
    return runner.execute(code, worker=(current.worker_name or "") if current else "")


def reconcile_now() -> dict[str, int]:
    return reconcile.run().as_dict()
