"""How a job reads to a program: the JSON of the API's answers and of webhook payloads, one
shape for both. Money is a string with eight decimals (`money`), the same on every answer."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from jobs import documents
from jobs.models import Job

MONEY_PLACES = Decimal("1E-8")  # the cost columns' decimal_places


def money(value: Decimal | int | None) -> str:
    """A USD amount as "0.00012000": a value read back from the database ("0E-8") and one just
    computed (Decimal(0)) read the same."""
    return f"{Decimal(value or 0).quantize(MONEY_PLACES):f}"


def moment(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def job_json(job: Job, base_url: str) -> dict:
    """`base_url`: the site's scheme and host, without a trailing slash (the request's, or
    AIQUEUE_BASE_URL for a webhook)."""
    return {
        "code": str(job.code),
        "url": base_url + job.get_absolute_url(),
        "api_url": f"{base_url}/api/jobs/{job.code}",
        "workload": job.workload.name,
        "status": job.status,
        "priority": job.priority,
        "stage": job.stage,
        "progress_percent": job.progress_percent,
        "output": job.output_text if job.status == Job.Status.SUCCEEDED else None,
        "confidence": job.confidence,
        "error": job.error or None,
        "attempts": job.attempt_count,
        "cost_usd": money(job.cost_actual),
        # A document's own calls are its reduce call; its chunks' calls are theirs (as on its page).
        "cost_with_chunks_usd": (
            money(job.total_cost) if documents.is_document_parent(job) else None
        ),
        "cost_reserved_usd": money(job.cost_reserved),
        "wait_reason": job.wait_reason or None,
        "wait_kind": job.wait_kind or None,
        "resume_at": moment(job.resume_at),
        "deadline": moment(job.deadline),
        "scheduled_for": moment(job.scheduled_for),
        "batch": str(job.batch.code) if job.batch_id else None,
        "replay_of": str(job.replay_of.code) if job.replay_of_id else None,
        "created_at": moment(job.created_at),
        "started_at": moment(job.started_at),
        "finished_at": moment(job.finished_at),
    }
