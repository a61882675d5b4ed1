"""CSV / JSONL batches: one uploaded file, one BatchRow per data row, one Job per admitted row.

Rows are stored as pending BatchRows when the file is uploaded; they become Jobs in waves
(`batches.services.admit`), so a 10,000-row batch never puts 10,000 entries on the queue at
once, and pausing or cancelling it only has to deal with the current wave.
"""

from __future__ import annotations

import uuid
from decimal import Decimal

from django.conf import settings
from django.db import models
from django.urls import reverse
from django.utils import timezone

from jobs.models import Job, Priority, Workload


class Batch(models.Model):
    class Status(models.TextChoices):
        DRAFT = "draft", "Draft"  # uploaded, mapped and previewed; nothing queued yet
        RUNNING = "running", "Running"
        PAUSED = "paused", "Paused"
        CANCELLED = "cancelled", "Cancelled"
        COMPLETED = "completed", "Completed"

    code = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    workload = models.ForeignKey(Workload, on_delete=models.PROTECT, related_name="batches")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    # The API token it was created with (batches.api): its jobs carry it (Job.api_token), so a
    # token's spend and its scoped budgets count them as they count its single submissions.
    api_token = models.ForeignKey(
        "jobs.ApiToken", null=True, blank=True, on_delete=models.SET_NULL, related_name="batches"
    )
    filename = models.CharField(max_length=255)
    file_format = models.CharField(max_length=10, default="csv")
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.DRAFT)
    priority = models.CharField(max_length=10, choices=Priority.choices, default=Priority.LOW)
    columns = models.JSONField(default=list, help_text="The file's columns, in order.")
    mapping = models.JSONField(default=dict, help_text="Input field -> column.")
    file_errors = models.JSONField(default=list, blank=True)
    total_rows = models.PositiveIntegerField(default=0)
    invalid_rows = models.PositiveIntegerField(default=0)
    estimated_cost = models.DecimalField(max_digits=14, decimal_places=8, default=Decimal("0"))
    max_in_flight = models.PositiveIntegerField(
        default=100, help_text="At most this many rows are queued or running at once."
    )
    # Why the last admission wave stopped early (workload paused, budget refused), if it did.
    admission_error = models.CharField(max_length=300, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name_plural = "batches"

    def __str__(self) -> str:
        return f"{self.filename} ({self.workload})"

    def get_absolute_url(self) -> str:
        return reverse("batches:detail", args=[self.code])

    @property
    def valid_rows(self) -> int:
        return self.total_rows - self.invalid_rows

    @property
    def is_active(self) -> bool:
        return self.status in (self.Status.RUNNING, self.Status.PAUSED)

    @property
    def is_finished(self) -> bool:
        return self.status in (self.Status.CANCELLED, self.Status.COMPLETED)


class BatchRow(models.Model):
    """One data row of the file: pending (job is None), admitted (a Job), or invalid (error)."""

    batch = models.ForeignKey(Batch, on_delete=models.CASCADE, related_name="rows")
    number = models.PositiveIntegerField(help_text="1-based data row number in the file.")
    data = models.JSONField(default=dict, help_text="The row as read: column -> value.")
    input_data = models.JSONField(default=dict, help_text="Input field -> value, once mapped.")
    # parse_error: the row itself is broken (field count, bytes, JSON); kept across re-mapping.
    # error: why the row will not be queued (parse_error, or a mapping problem).
    parse_error = models.TextField(blank=True)
    error = models.TextField(blank=True)
    job = models.OneToOneField(
        Job, null=True, blank=True, on_delete=models.SET_NULL, related_name="batch_row"
    )

    class Meta:
        ordering = ["batch", "number"]
        constraints = [
            models.UniqueConstraint(fields=["batch", "number"], name="unique_row_per_batch")
        ]
        indexes = [models.Index(fields=["batch", "job", "number"])]

    def __str__(self) -> str:
        return f"{self.batch} row {self.number}"

    @property
    def field_values(self) -> list[str]:
        """The row's cell for each input field of the workload, through the batch's mapping
        (blank for a field without a column). Unlike `input_data`, set only for a valid row,
        it shows what an invalid row holds too."""
        mapping = self.batch.mapping
        return [
            str(self.data.get(mapping.get(name) or "", ""))
            for name in self.batch.workload.input_fields
        ]
