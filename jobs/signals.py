"""The one way news travels up from the job record: rooms that build on jobs listen here.

`transition()` sends these once its transaction commits (never for a change rolled back):

Both carry `status`, the status the transition moved the job to.

- `job_settled(job=..., status=...)`: a job's run ended with an answer for people or callers
  to act on (succeeded, sent to review, failed), by a worker or by a reviewer. A document's
  next step (runs.mapreduce) and a batch's next wave (batches.services) follow it.
- `job_stopped(job=..., status=..., actor=..., reason=...)`: a job ended without its result
  (cancelled, expired). The review inbox withdraws the job's open items (review.services).

Webhooks (jobs.webhooks) hear both.

- `budget_alert(budget_id=...)`: a budget's use (spent + reserved) reached its alert
  threshold, for the first time this period (jobs.flow.budgets claims it once, sent on commit).
  jobs.budget_alerts e-mails the operators and tells the webhooks.
"""

from __future__ import annotations

from django.dispatch import Signal

job_settled = Signal()
job_stopped = Signal()
budget_alert = Signal()
