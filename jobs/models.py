"""The durable record of AI work: providers, workloads, jobs, their attempts and their history.

The Job row is the source of truth. Redis holds only a copy of "what to run next"; everything
needed to rebuild it lives here (see jobs.reconcile).
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from decimal import Decimal

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.urls import reverse
from django.utils import timezone

MILLION = Decimal(1_000_000)


class Provider(models.Model):
    class Kind(models.TextChoices):
        OPENAI = "openai", "OpenAI-compatible"
        ANTHROPIC = "anthropic", "Anthropic Messages"
        SIMULATED = "simulated", "Built-in simulator"

    name = models.CharField(max_length=100, unique=True)
    kind = models.CharField(max_length=20, choices=Kind.choices, default=Kind.SIMULATED)
    base_url = models.URLField(
        blank=True,
        help_text="Leave blank for the kind's default (the simulator uses AIQUEUE_SIMULATOR_URL).",
    )
    api_key_env = models.CharField(
        "API key environment variable",
        max_length=100,
        blank=True,
        help_text="Name of the environment variable that holds the key. The key itself is "
        "never stored, queued, logged or shown.",
    )
    connect_timeout_s = models.FloatField(default=5.0, validators=[MinValueValidator(0.1)])
    read_timeout_s = models.FloatField(
        default=60.0,
        validators=[MinValueValidator(0.1)],
        help_text="Must stay below the workload's job timeout.",
    )
    rpm_limit = models.PositiveIntegerField(null=True, blank=True, help_text="Requests/minute.")
    tpm_limit = models.PositiveIntegerField(null=True, blank=True, help_text="Tokens/minute.")
    max_concurrency = models.PositiveIntegerField(
        null=True, blank=True, help_text="In-flight calls across all workers."
    )
    retry_budget_ratio = models.FloatField(
        default=0.1,
        validators=[MinValueValidator(0.0), MaxValueValidator(1.0)],
        help_text="Retries allowed as a fraction of recent calls, shared by all workers.",
    )
    breaker_failure_threshold = models.PositiveIntegerField(
        default=5,
        validators=[MinValueValidator(1)],
        help_text="Consecutive failed calls that open the circuit breaker.",
    )
    breaker_cooldown_s = models.PositiveIntegerField(
        default=30, help_text="Seconds the breaker stays open before a half-open probe."
    )
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def price_for(self, model: str) -> ModelPrice | None:
        return self.prices.filter(model=model).first()


class ModelPrice(models.Model):
    """USD per million tokens for one model of a provider."""

    provider = models.ForeignKey(Provider, on_delete=models.CASCADE, related_name="prices")
    model = models.CharField(max_length=200)
    input_per_mtok = models.DecimalField(
        "input USD / 1M tokens", max_digits=10, decimal_places=4, default=Decimal("0")
    )
    output_per_mtok = models.DecimalField(
        "output USD / 1M tokens", max_digits=10, decimal_places=4, default=Decimal("0")
    )

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["provider", "model"], name="unique_price_per_model")
        ]
        ordering = ["provider", "model"]

    def __str__(self) -> str:
        return f"{self.provider} / {self.model}"

    def cost(self, tokens_in: int, tokens_out: int) -> Decimal:
        return (
            Decimal(tokens_in) * self.input_per_mtok + Decimal(tokens_out) * self.output_per_mtok
        ) / MILLION


class Priority(models.TextChoices):
    # The values are the RQ queue names; workers listen on them in this order.
    HIGH = "high", "High"
    DEFAULT = "default", "Default"
    LOW = "low", "Low"


class Workload(models.Model):
    class Kind(models.TextChoices):
        CLASSIFY = "classify", "Classify"
        EXTRACT = "extract", "Extract"
        SUMMARIZE = "summarize", "Summarize"
        GENERATE = "generate", "Generate"
        DOCUMENT = "document", "Document"

    name = models.CharField(max_length=100, unique=True)
    kind = models.CharField(max_length=20, choices=Kind.choices, default=Kind.GENERATE)
    description = models.TextField(blank=True)
    system_prompt = models.TextField(blank=True)
    prompt_template = models.TextField(
        default="{input}",
        help_text="The user message. {input} is replaced by the submitted text.",
    )
    provider = models.ForeignKey(Provider, on_delete=models.PROTECT, related_name="workloads")
    model = models.CharField(max_length=200)
    fallback_provider = models.ForeignKey(
        Provider,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="fallback_for",
        help_text="Used while the primary provider's circuit breaker is open.",
    )
    fallback_model = models.CharField(max_length=200, blank=True)
    default_priority = models.CharField(
        max_length=10, choices=Priority.choices, default=Priority.DEFAULT
    )
    max_attempts = models.PositiveSmallIntegerField(
        default=3, validators=[MinValueValidator(1), MaxValueValidator(10)]
    )
    timeout_s = models.PositiveIntegerField(
        "job timeout (s)", default=120, validators=[MinValueValidator(5)]
    )
    max_output_tokens = models.PositiveIntegerField(default=512, validators=[MinValueValidator(1)])
    temperature = models.FloatField(
        default=0.0, validators=[MinValueValidator(0.0), MaxValueValidator(2.0)]
    )
    labels = models.JSONField(
        default=list, blank=True, help_text="Classify: the allowed labels, a JSON list."
    )
    confidence_threshold = models.FloatField(
        null=True,
        blank=True,
        validators=[MinValueValidator(0.0), MaxValueValidator(1.0)],
        help_text="Outputs below this confidence go to the review inbox.",
    )
    review_sample_rate = models.FloatField(
        default=0.0,
        validators=[MinValueValidator(0.0), MaxValueValidator(1.0)],
        help_text="Fraction of successful jobs sent to review for quality control.",
    )
    review_sla_minutes = models.PositiveIntegerField(
        default=60, help_text="Review items older than this are highlighted."
    )
    concurrency_cap = models.PositiveIntegerField(
        null=True, blank=True, help_text="In-flight jobs of this workload across all workers."
    )
    max_queued = models.PositiveIntegerField(
        null=True, blank=True, help_text="Submissions are refused while this many are waiting."
    )
    is_deferrable = models.BooleanField(
        default=False, help_text="May wait for the off-peak window or a quiet queue."
    )
    is_paused = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def render_prompt(self, text: str) -> str:
        # str.replace, not str.format: submitted text may contain braces.
        return self.prompt_template.replace("{input}", text)


class Job(models.Model):
    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        WAITING = "waiting", "Waiting"
        HELD = "held", "Held"
        SCHEDULED = "scheduled", "Scheduled"
        NEEDS_REVIEW = "needs_review", "Needs review"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"
        CANCELLED = "cancelled", "Cancelled"
        EXPIRED = "expired", "Expired"

    TERMINAL_STATUSES = frozenset(
        {Status.SUCCEEDED, Status.FAILED, Status.CANCELLED, Status.EXPIRED}
    )
    CANCELLABLE_STATUSES = frozenset(
        {Status.QUEUED, Status.WAITING, Status.HELD, Status.SCHEDULED, Status.RUNNING}
    )

    code = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    workload = models.ForeignKey(Workload, on_delete=models.PROTECT, related_name="jobs")
    submitted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    input_text = models.TextField()
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.QUEUED)
    priority = models.CharField(max_length=10, choices=Priority.choices, default=Priority.DEFAULT)
    idempotency_key = models.CharField(max_length=200, blank=True)

    stage = models.CharField(max_length=40, blank=True)
    progress_percent = models.PositiveSmallIntegerField(default=0)
    progress_message = models.CharField(max_length=300, blank=True)

    deadline = models.DateTimeField(null=True, blank=True)
    scheduled_for = models.DateTimeField(null=True, blank=True)
    wait_reason = models.CharField(max_length=200, blank=True)
    resume_at = models.DateTimeField(null=True, blank=True)

    output_text = models.TextField(blank=True)
    confidence = models.FloatField(null=True, blank=True)
    error = models.TextField(blank=True)
    error_class = models.CharField(max_length=100, blank=True)
    attempt_count = models.PositiveIntegerField(default=0)
    cost_actual = models.DecimalField(max_digits=14, decimal_places=8, default=Decimal("0"))
    cost_reserved = models.DecimalField(max_digits=14, decimal_places=8, default=Decimal("0"))
    is_human_approved = models.BooleanField(default=False)

    # Fencing token for the current run: a worker that lost its run (presumed dead, job
    # recovered and started elsewhere) cannot finish the job because its token no longer matches.
    run_token = models.UUIDField(null=True, blank=True, editable=False)
    heartbeat_at = models.DateTimeField(null=True, blank=True)

    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    queued_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["status", "created_at"]),
            models.Index(fields=["workload", "status"]),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["submitted_by", "idempotency_key"],
                condition=~models.Q(idempotency_key=""),
                name="unique_idempotency_key_per_user",
            )
        ]

    def __str__(self) -> str:
        return f"{self.workload} {self.code}"

    def get_absolute_url(self) -> str:
        return reverse("jobs:detail", args=[self.code])

    @property
    def rq_job_id(self) -> str:
        return f"job-{self.code}"

    @property
    def is_terminal(self) -> bool:
        return self.status in self.TERMINAL_STATUSES

    def can_cancel(self) -> bool:
        return self.status in self.CANCELLABLE_STATUSES


class Attempt(models.Model):
    """The cost ledger: one row per provider call, failed calls included."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="attempts")
    number = models.PositiveIntegerField()
    provider = models.ForeignKey(Provider, on_delete=models.PROTECT, related_name="attempts")
    model = models.CharField(max_length=200)
    started_at = models.DateTimeField()
    ended_at = models.DateTimeField(null=True, blank=True)
    http_status = models.PositiveSmallIntegerField(null=True, blank=True)
    error_class = models.CharField(max_length=100, blank=True)
    error_message = models.TextField(blank=True)
    tokens_in = models.PositiveIntegerField(default=0)
    tokens_out = models.PositiveIntegerField(default=0)
    cost = models.DecimalField(max_digits=14, decimal_places=8, default=Decimal("0"))
    latency_ms = models.PositiveIntegerField(null=True, blank=True)

    class Meta:
        ordering = ["job", "number"]
        indexes = [models.Index(fields=["started_at"])]

    def __str__(self) -> str:
        return f"{self.job.code} attempt {self.number}"

    @property
    def succeeded(self) -> bool:
        return not self.error_class


class JobEvent(models.Model):
    """Audit log: every status transition and human action on a job."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="events")
    created_at = models.DateTimeField(default=timezone.now)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    from_status = models.CharField(max_length=20, blank=True)
    to_status = models.CharField(max_length=20, blank=True)
    reason = models.CharField(max_length=300, blank=True)
    data = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["created_at", "id"]
        indexes = [models.Index(fields=["job", "created_at"])]

    def __str__(self) -> str:
        return f"{self.job.code}: {self.from_status or '∅'} → {self.to_status}"

    @property
    def actor_label(self) -> str:
        return self.actor.get_username() if self.actor else "system"


class ApiToken(models.Model):
    """A per-user key for the JSON API. Only a SHA-256 digest is stored."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens"
    )
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=12, editable=False)
    digest = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        verbose_name = "API token"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @staticmethod
    def hash_key(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()

    def set_new_key(self) -> str:
        """Generate a key, store its digest, and return the key (shown to the user once)."""
        key = "aiq_" + secrets.token_urlsafe(32)
        self.prefix = key[:10]
        self.digest = self.hash_key(key)
        return key
