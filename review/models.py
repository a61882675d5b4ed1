"""The review inbox: one ReviewItem per time a job was escalated to humans.

A job in `needs_review` has exactly one open item. Resolving it (approve, correct, retry,
reject) closes the item and moves the job on; a retried job that escalates again gets a new
item, so the items of a job are its review history.
"""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.db import models
from django.urls import reverse
from django.utils import timezone

from jobs.models import Job

REVIEWERS_GROUP = "Reviewers"


class ReviewItem(models.Model):
    class Reason(models.TextChoices):
        FAILED = "failed", "Failed"
        LOW_CONFIDENCE = "low_confidence", "Low confidence"
        INVALID_OUTPUT = "invalid_output", "Invalid output"
        SAMPLED = "sampled", "Sampled for QA"

    class Status(models.TextChoices):
        OPEN = "open", "Open"
        RESOLVED = "resolved", "Resolved"

    class Resolution(models.TextChoices):
        APPROVED = "approved", "Approved"
        CORRECTED = "corrected", "Corrected"
        RETRIED = "retried", "Retried"
        REJECTED = "rejected", "Rejected"
        # Nobody wants the result any more: the chunk's document was cancelled or expired.
        WITHDRAWN = "withdrawn", "Withdrawn"

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="review_items")
    reason = models.CharField(max_length=20, choices=Reason.choices)
    evidence = models.JSONField(default=dict, blank=True)
    # What the model had said when the item was created: a retry replaces the job's output,
    # this keeps the version the reviewer judged.
    output_text = models.TextField(blank=True)
    confidence = models.FloatField(null=True, blank=True)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.OPEN)

    claimed_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    claimed_at = models.DateTimeField(null=True, blank=True)
    claim_expires_at = models.DateTimeField(null=True, blank=True)

    resolution = models.CharField(max_length=10, choices=Resolution.choices, blank=True)
    corrected_output = models.TextField(blank=True)
    note = models.TextField(blank=True)
    resolved_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    resolved_at = models.DateTimeField(null=True, blank=True)

    created_at = models.DateTimeField(default=timezone.now)
    # Set by the digest that told reviewers about this item (None: not announced yet).
    notified_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["created_at", "id"]
        indexes = [
            models.Index(fields=["status", "created_at"]),
            models.Index(fields=["status", "claim_expires_at"]),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["job"],
                condition=models.Q(status="open"),
                name="one_open_review_item_per_job",
            )
        ]

    def __str__(self) -> str:
        return f"Review #{self.pk} of {self.job.code} ({self.reason})"

    def get_absolute_url(self) -> str:
        return reverse("review:item", args=[self.pk])

    @property
    def is_open(self) -> bool:
        return self.status == self.Status.OPEN

    def claim_holder(self, now=None):
        """The user holding a live claim, or None (never claimed, or the claim expired)."""
        now = now or timezone.now()
        if self.claimed_by_id and self.claim_expires_at and self.claim_expires_at > now:
            return self.claimed_by
        return None

    @property
    def sla_deadline(self):
        return self.created_at + timedelta(minutes=self.job.workload.review_sla_minutes)

    @property
    def is_overdue(self) -> bool:
        return self.is_open and timezone.now() > self.sla_deadline
