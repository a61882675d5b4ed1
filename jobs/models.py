"""The durable record of AI work: providers, workloads, jobs, their attempts and their history.

The Job row is the source of truth. Redis holds only a copy of "what to run next"; everything
needed to rebuild it lives here (see runs.reconcile).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import jsonschema
from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator, URLValidator
from django.db import models
from django.urls import reverse
from django.utils import timezone

from jobs.provider_keys import HELP_TEXT as KEY_VAR_HELP_TEXT
from jobs.provider_keys import validate_key_var

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

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
        validators=[validate_key_var],
        help_text=KEY_VAR_HELP_TEXT,
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
    # The circuit breaker (jobs.flow.breaker): two rules open it, a consecutive one and a
    # failure rate over a sliding window; probes close it.
    breaker_failure_threshold = models.PositiveIntegerField(
        default=3,
        validators=[MinValueValidator(1)],
        help_text="Consecutive failed calls that open the circuit breaker.",
    )
    breaker_failure_rate = models.FloatField(
        default=0.4,
        validators=[MinValueValidator(0.01), MaxValueValidator(1.0)],
        help_text="Failure rate (0–1) over the window at which the breaker opens.",
    )
    breaker_window_calls = models.PositiveIntegerField(
        default=20,
        validators=[MinValueValidator(1)],
        help_text="The failure-rate window: at most this many recent calls…",
    )
    breaker_window_s = models.PositiveIntegerField(
        default=60, validators=[MinValueValidator(1)], help_text="…of the last this many seconds."
    )
    breaker_min_calls = models.PositiveIntegerField(
        default=10,
        validators=[MinValueValidator(1)],
        help_text="The failure rate is judged only once the window holds this many calls.",
    )
    breaker_cooldown_s = models.PositiveIntegerField(
        default=30,
        help_text="Seconds the breaker stays open before a half-open probe (longer if the "
        "failure that opened it sent a longer Retry-After).",
    )
    breaker_probe_successes = models.PositiveIntegerField(
        default=5,
        validators=[MinValueValidator(1)],
        help_text="Probes in a row that must succeed to close the breaker (one at a time; a "
        "failed probe opens it again).",
    )

    class MaxTokensField(models.TextChoices):
        MAX_COMPLETION_TOKENS = "max_completion_tokens", "max_completion_tokens (OpenAI, Azure)"
        MAX_TOKENS = "max_tokens", "max_tokens (older OpenAI-compatible servers)"

    max_tokens_field = models.CharField(
        "output limit parameter",
        max_length=30,
        choices=MaxTokensField.choices,
        default=MaxTokensField.MAX_COMPLETION_TOKENS,
        help_text="OpenAI-compatible kinds: how the output limit is sent. OpenAI deprecated "
        "max_tokens (reasoning models refuse it); vLLM, Ollama or LiteLLM may know only it.",
    )
    anthropic_version = models.CharField(
        "Anthropic API version",
        max_length=20,
        default="2026-10-21",
        help_text="Anthropic kind: the anthropic-version header (default: what the current "
        "official SDK sends).",
    )
    # Set when the provider answered that the account has no credit (quota / billing): its
    # jobs are held until an operator clears it (jobs.credit). Written by conditional
    # updates, never by save(): saving the row rebuilds its HTTP clients (client_for).
    out_of_credit_since = models.DateTimeField(null=True, blank=True, editable=False)
    out_of_credit_reason = models.CharField(max_length=300, blank=True, editable=False)
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def is_out_of_credit(self) -> bool:
        return self.out_of_credit_since is not None

    def price_for(self, model: str) -> ModelPrice | None:
        # One price per provider and model (a unique constraint): get(), which compiles no
        # ORDER BY as first() would.
        try:
            return ModelPrice.objects.get(provider=self, model=model)
        except ModelPrice.DoesNotExist:
            return None

    @property
    def read_timeout_g(self) -> str:
        return f"{self.read_timeout_s:g}"

    def clean(self) -> None:
        # The read timeout must stay below the job timeout of every workload using it.
        from django.core.exceptions import ValidationError

        if (
            self.breaker_min_calls is not None
            and self.breaker_window_calls is not None
            and self.breaker_min_calls > self.breaker_window_calls
        ):
            raise ValidationError(
                {"breaker_min_calls": "Cannot be more than the window's number of calls."}
            )
        if not self.pk or self.read_timeout_s is None:
            return
        tight = Workload.objects.filter(
            models.Q(provider=self) | models.Q(fallback_provider=self),
            timeout_s__lte=self.read_timeout_s,
        ).values_list("name", "timeout_s")[:3]
        if tight:
            names = ", ".join(f"{name} ({timeout} s)" for name, timeout in tight)
            raise ValidationError(
                {
                    "read_timeout_s": "Must be below the job timeout of every workload using "
                    f"this provider: {names}."
                }
            )


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
        null=True,
        blank=True,
        validators=[MinValueValidator(0.0), MaxValueValidator(2.0)],
        help_text="Blank: not sent, the model's default applies (current Anthropic models "
        "and OpenAI's reasoning models take none).",
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
    # Per-kind settings (issue #9; see jobs/kinds.py for how each kind uses them).
    multi_label = models.BooleanField(
        default=False, help_text="Classify: the answer may hold several labels."
    )
    output_schema = models.JSONField(
        null=True, blank=True, help_text="Extract: the JSON Schema the output must match."
    )
    min_output_chars = models.PositiveIntegerField(
        null=True, blank=True, help_text="Summarize/generate/document: shorter output is invalid."
    )
    max_output_chars = models.PositiveIntegerField(
        null=True, blank=True, help_text="Summarize/generate/document: longer output is invalid."
    )

    class ConfidenceSource(models.TextChoices):
        AUTO = "auto", "Automatic: logprobs where the provider gives them, else self-rated"
        LOGPROBS = "logprobs", "Token logprobs (OpenAI-compatible providers)"
        SELF_RATED = "self_rated", "Self-rated: the model ends with 'Confidence: 0..1'"
        OFF = "off", "None"

    confidence_source = models.CharField(
        max_length=20,
        choices=ConfidenceSource.choices,
        default=ConfidenceSource.AUTO,
        help_text="Where a job's confidence comes from, for the review rule 'confidence below' "
        "(jobs.kinds.confidence_from).",
    )
    chunk_chars = models.PositiveIntegerField(
        default=4000,
        validators=[MinValueValidator(200)],
        help_text="Document: characters per chunk (each chunk is one map call).",
    )
    reduce_prompt = models.TextField(
        blank=True,
        help_text="Document: the user message that combines the chunk results; {input} is "
        "replaced by them. Blank: a generic 'combine these partial results' prompt.",
    )
    sample_input = models.JSONField(
        default=dict, blank=True, help_text="Admin preview: a value per input field."
    )
    # Bumped whenever the prompts change; each job records the version it ran with and
    # PromptTemplateVersion keeps the text of every version.
    template_version = models.PositiveIntegerField(default=1, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    TEMPLATE_FIELDS = ("system_prompt", "prompt_template", "reduce_prompt")

    def save(self, *args, **kwargs) -> None:
        if self.pk:
            old = Workload.objects.filter(pk=self.pk).values(*self.TEMPLATE_FIELDS).first()
            if old and any(old[f] != getattr(self, f) for f in self.TEMPLATE_FIELDS):
                self.template_version = (
                    Workload.objects.filter(pk=self.pk)
                    .values_list("template_version", flat=True)
                    .get()
                    + 1
                )
        super().save(*args, **kwargs)
        PromptTemplateVersion.objects.get_or_create(
            workload=self,
            version=self.template_version,
            defaults={f: getattr(self, f) for f in self.TEMPLATE_FIELDS},
        )

    def clean(self) -> None:
        errors = workload_errors(self)
        errors.update(self.timeout_errors())
        if errors:
            raise ValidationError(errors)

    def timeout_errors(self) -> dict[str, str]:
        """A provider's read timeout must stay below the job timeout: the call has to time
        out (and be retried or parked) before RQ's last-resort timeout kills the run."""
        errors: dict[str, str] = {}
        for field, provider in (
            ("provider", self.provider if self.provider_id else None),
            ("fallback_provider", self.fallback_provider if self.fallback_provider_id else None),
        ):
            if provider and self.timeout_s and provider.read_timeout_s >= self.timeout_s:
                errors[field] = (
                    f"{provider.name}'s read timeout ({provider.read_timeout_g} s) must be below "
                    f"this workload's job timeout ({self.timeout_s} s)."
                )
        return errors

    @property
    def input_fields(self) -> list[str]:
        """The named fields of the prompt template (`{name}` placeholders), in order."""
        names = list(dict.fromkeys(PLACEHOLDER_RE.findall(self.prompt_template)))
        return names or ["input"]

    def render_prompt(self, text: str | dict[str, str]) -> str:
        """The user message: each `{field}` replaced by its value (a plain string fills
        `{input}`). str.replace, not str.format: submitted text may contain braces."""
        values = {"input": text} if isinstance(text, str) else text
        prompt = self.prompt_template
        for name, value in values.items():
            prompt = prompt.replace("{" + name + "}", str(value))
        return prompt


# `{name}` with a Python identifier inside: literal JSON such as {"a": 1} is left alone.
PLACEHOLDER_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class PromptTemplateVersion(models.Model):
    """The prompts of one workload as they were at one version (kept for audit and replay)."""

    workload = models.ForeignKey(
        Workload, on_delete=models.CASCADE, related_name="template_versions"
    )
    version = models.PositiveIntegerField()
    system_prompt = models.TextField(blank=True)
    prompt_template = models.TextField()
    reduce_prompt = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["workload", "-version"]
        constraints = [
            models.UniqueConstraint(fields=["workload", "version"], name="unique_template_version")
        ]

    def __str__(self) -> str:
        return f"{self.workload} v{self.version}"


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
    # A job that ended, or waits for a reviewer, may run again (services.do_replay_job). One
    # still on its way (queued, waiting, held, scheduled, running) has a run coming already.
    REPLAYABLE_STATUSES = frozenset(
        {Status.SUCCEEDED, Status.FAILED, Status.CANCELLED, Status.EXPIRED, Status.NEEDS_REVIEW}
    )

    class WaitKind(models.TextChoices):
        """What a job that is set aside (waiting, held, scheduled) waits for. The code that
        parks it says so (services.do_park_job / do_hold_job); `wait_reason` is only the text
        people read, and rewording it changes nothing."""

        CAPACITY = "capacity", "Waiting for capacity"
        RATE_LIMIT = "rate_limit", "Waiting for the rate limit"
        BREAKER = "breaker", "Waiting for the provider to recover"
        BACKOFF = "backoff", "Waiting to retry"
        RETRY_BUDGET = "retry_budget", "Waiting for the provider's retry budget"
        PAUSED = "paused", "Waiting: workload paused"
        CHUNKS = "chunks", "Waiting for its chunks"
        BUDGET = "budget", "Held by a budget"
        CREDIT = "credit", "Held: provider out of credit"
        SCHEDULED = "scheduled", "Scheduled"
        OFF_PEAK = "off_peak", "Deferred to the off-peak window"
        OTHER = "other", "Waiting"

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
    # Set with wait_reason while the job is set aside, blank otherwise (Job.WaitKind).
    wait_kind = models.CharField(max_length=20, choices=WaitKind.choices, blank=True)
    # What it waits on, when a wake-up looks for it by that: "provider:<pk>" for a breaker.
    wait_on = models.CharField(max_length=100, blank=True)
    resume_at = models.DateTimeField(null=True, blank=True)

    output_text = models.TextField(blank=True)
    confidence = models.FloatField(null=True, blank=True)
    error = models.TextField(blank=True)
    error_class = models.CharField(max_length=100, blank=True)
    attempt_count = models.PositiveIntegerField(default=0)
    cost_actual = models.DecimalField(max_digits=14, decimal_places=8, default=Decimal("0"))
    cost_reserved = models.DecimalField(max_digits=14, decimal_places=8, default=Decimal("0"))
    is_human_approved = models.BooleanField(default=False)
    # A reviewer's corrected output; `output_text` keeps what the model said. See final_output.
    corrected_output = models.TextField(blank=True)
    # Per-job changes a reviewer asked for on retry (provider id, model, temperature, prompt);
    # runs.runner.build_request applies them over the workload's settings.
    overrides = models.JSONField(default=dict, blank=True)
    # Issue #9: named template fields, the parsed output (labels, extracted object), the prompt
    # version the job ran with, and where it came from (a CSV batch row, a document's chunk).
    input_data = models.JSONField(default=dict, blank=True)
    output_data = models.JSONField(null=True, blank=True)
    template_version = models.PositiveIntegerField(null=True, blank=True)
    batch = models.ForeignKey(
        "batches.Batch", null=True, blank=True, on_delete=models.SET_NULL, related_name="jobs"
    )
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.CASCADE, related_name="children"
    )
    chunk_index = models.PositiveIntegerField(null=True, blank=True)
    # The job this one replays (same workload and input, run again: services.do_resubmit_job).
    replay_of = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="replays"
    )
    # The API token it came in with (None from the pages, a session's API call, batches):
    # what ops.spend sums per token.
    api_token = models.ForeignKey(
        "ApiToken", null=True, blank=True, on_delete=models.SET_NULL, related_name="jobs"
    )

    # Fencing token for the current run: a worker that lost its run (presumed dead, job
    # recovered and started elsewhere) cannot finish the job because its token no longer matches.
    run_token = models.UUIDField(null=True, blank=True, editable=False)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    # The worker process of the current run, "host/pid/start" (jobs.processes): on the same
    # host a dead one is told from a stalled one, so its runs come back without waiting.
    run_by = models.CharField(max_length=200, blank=True, editable=False)

    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    queued_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["status", "created_at"]),
            models.Index(fields=["status", "wait_kind"]),
            models.Index(fields=["workload", "status"]),
            models.Index(fields=["batch", "status"]),
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

    # How each `stage` reads on the job's page and in lists (jobs/_progress.html).
    STAGE_LABELS = {
        "queued": "Queued",
        "held": "Held",
        "scheduled": "Scheduled",
        "calling": "Calling the provider",
        "streaming": "Streaming output",
        "repairing": "Repairing output",
        "reducing": "Combining the chunks' results",
        "review": "In review",
        "done": "Done",
    }

    @property
    def stage_label(self) -> str:
        if self.stage == self.Status.WAITING:
            return self.WaitKind(self.wait_kind or self.WaitKind.OTHER).label
        return self.STAGE_LABELS.get(self.stage, self.stage or "—")

    def seconds_to_deadline(self, now: datetime | None = None) -> float | None:
        """Seconds left until the job's deadline (0 or less once it passed), None without one.
        Every deadline check reads the deadline through this or `is_past_deadline`."""
        if self.deadline is None:
            return None
        return (self.deadline - (now or timezone.now())).total_seconds()

    def is_past_deadline(self, now: datetime | None = None) -> bool:
        left = self.seconds_to_deadline(now)
        return left is not None and left <= 0

    def can_cancel(self) -> bool:
        return self.status in self.CANCELLABLE_STATUSES

    def can_replay(self) -> bool:
        # A document's run splits it and combines its chunks' results: replaying either part
        # alone would leave the other stale (jobs.replay).
        return (
            self.status in self.REPLAYABLE_STATUSES and self.workload.kind != Workload.Kind.DOCUMENT
        )

    @property
    def total_cost(self) -> Decimal:
        """What the job cost: its own calls plus, for a document, every chunk's calls."""
        children = self.children.aggregate(total=models.Sum("cost_actual"))["total"]
        return (self.cost_actual or Decimal(0)) + (children or Decimal(0))

    @property
    def live_version(self) -> int:
        """Which of two renders of this job is newer: its last change in microseconds since
        the epoch (every transition sets `updated_at`). Live rows carry it, and a page never
        swaps an older row over a newer one (static/js/live.js): the web process and the
        workers each send rows, rendered when they send, and one may arrive after another's
        newer render."""
        return (self.updated_at - EPOCH) // timedelta(microseconds=1)

    @property
    def listed_cost_value(self) -> Decimal:
        """The cost a list row shows: with its chunks for a document, as its page says. The job
        list annotates it in its one query (`listed_cost`, jobs.views.with_listed_cost); a row
        pushed live (jobs.live.render_row) has no annotation and asks."""
        annotated = self.__dict__.get("listed_cost")
        if annotated is not None:
            return annotated
        if self.workload.kind == Workload.Kind.DOCUMENT and self.parent_id is None:
            return self.total_cost
        return self.cost_actual

    @property
    def run_seconds(self) -> float | None:
        """How long its last run took; for a running job, so far; None before it started."""
        if self.started_at is None:
            return None
        if self.finished_at is not None:
            return max(0.0, (self.finished_at - self.started_at).total_seconds())
        if self.status == self.Status.RUNNING:
            return max(0.0, (timezone.now() - self.started_at).total_seconds())
        return None

    @property
    def final_output(self) -> str:
        """What the job delivers: a reviewer's correction if there is one, else the model's."""
        return self.corrected_output or self.output_text


class AttemptQuerySet(models.QuerySet):
    def in_flight(self) -> AttemptQuerySet:
        return self.filter(state=Attempt.State.IN_FLIGHT)


class Attempt(models.Model):
    """The cost ledger: one row per provider call, failed calls included.

    Written before the request leaves the process (`in_flight`, with its worst case) and
    settled after (jobs.ledger), so a call cut off by a crash is still counted."""

    class State(models.TextChoices):
        # Written before the request leaves the process; its outcome is not known yet.
        IN_FLIGHT = "in_flight", "in flight"
        # The call ended in the process that made it: usage and cost as reported.
        SETTLED = "settled", "settled"
        # Its worker died mid-call: charged at `reserved_cost`, the outcome is unknown.
        UNKNOWN = "unknown", "outcome unknown"
        # Answered after the job had been recovered and run again: paid, result unused.
        SUPERSEDED = "superseded", "superseded"

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
    state = models.CharField(max_length=20, choices=State.choices, default=State.SETTLED)
    # Whether the provider bills this call (ProviderError.billed): answers are, error answers
    # and refused connections are not. `max_attempts` bounds billed calls.
    is_billed = models.BooleanField(default=True)
    # The call's worst case, counted while it is in flight and charged if its outcome is lost.
    reserved_cost = models.DecimalField(max_digits=14, decimal_places=8, default=Decimal("0"))
    # By then the call is over whatever happened (its total deadline): a silent run is not
    # recovered, and so its job not called again, before this has passed.
    deadline_at = models.DateTimeField(null=True, blank=True)
    # False for a call whose end the job did not cause: its worker stopped, died or stalled
    # (outcome unknown, superseded, handed back, failed while the system was stopping). Such a
    # call is paid like any other but does not use up one of the job's `max_attempts`.
    consumes_attempt = models.BooleanField(default=True)

    objects = AttemptQuerySet.as_manager()

    class Meta:
        # job_id, not job: "job" would join jobs_job to order by the job's own ordering.
        ordering = ["job_id", "number"]
        indexes = [models.Index(fields=["started_at"])]

    def __str__(self) -> str:
        return f"{self.job.code} attempt {self.number}"

    @property
    def provider_label(self) -> str:
        # `provider_name` comes with jobs.live's raw read of a job's ledger; else the provider.
        name = getattr(self, "provider_name", None)
        return name if name is not None else self.provider.name

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
        # `actor_name` comes with jobs.live's raw read of a job's history; otherwise the actor.
        name = getattr(self, "actor_name", None)
        if name is not None:
            return name
        return self.actor.get_username() if self.actor_id else "system"


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


NANOS_PER_USD = Decimal(1_000_000_000)


def usd_to_nanos(amount: Decimal | int | float) -> int:
    """USD → integer billionths, rounded up (a reservation must never be too small)."""
    from math import ceil

    return int(ceil(Decimal(amount) * NANOS_PER_USD))


def nanos_to_usd(nanos: int) -> Decimal:
    return (Decimal(nanos) / NANOS_PER_USD).quantize(Decimal("0.00000001"))


class Budget(models.Model):
    """A spending cap for one period. Its scope narrows which jobs count against it: a
    workload, a submitter, an API token, a model, any of them together (a job counts when it
    matches every one that is set), or none (global).

    The amounts are integer billionths of a USD so that the conditional update that admits a
    job (`spent + reserved + x <= cap`, see jobs.flow.budgets) is exact on every database;
    SQLite would otherwise compare decimals as floats.
    """

    class Period(models.TextChoices):
        DAY = "day", "Day"
        MONTH = "month", "Month"

    class OnExhausted(models.TextChoices):
        HOLD = "hold", "Hold jobs until the budget frees"
        REJECT = "reject", "Reject at submit"

    name = models.CharField(max_length=100, unique=True)
    workload = models.ForeignKey(
        Workload,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="budgets",
        help_text="Empty: jobs of every workload count (with the other scopes empty: a global "
        "budget that every job counts against).",
    )
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="budgets",
        help_text="Only this submitter's jobs (pages, API and batches alike).",
    )
    api_token = models.ForeignKey(
        "ApiToken",
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="budgets",
        help_text="Only jobs submitted through the API with this token.",
    )
    model = models.CharField(
        max_length=200,
        blank=True,
        help_text="Only jobs sent to this model first (the workload's, or a retry's "
        "override); their fallback calls count too.",
    )
    period = models.CharField(max_length=10, choices=Period.choices, default=Period.MONTH)
    cap_usd = models.DecimalField(
        "cap (USD)", max_digits=12, decimal_places=4, validators=[MinValueValidator(Decimal(0))]
    )
    alert_threshold = models.FloatField(
        default=0.8,
        validators=[MinValueValidator(0.0), MaxValueValidator(1.0)],
        help_text="Fraction of the cap (spent + reserved) at which the budget is flagged.",
    )
    on_exhausted = models.CharField(
        max_length=10, choices=OnExhausted.choices, default=OnExhausted.HOLD
    )
    cap_nanos = models.BigIntegerField(default=0, editable=False)
    spent_nanos = models.BigIntegerField(default=0, editable=False)
    reserved_nanos = models.BigIntegerField(default=0, editable=False)
    period_start = models.DateTimeField(default=timezone.now, editable=False)
    # When its use last reached the alert threshold (jobs.flow.budgets.claim_alert): once per
    # period, so an alert sent before `period_start` leaves the new period free to alert.
    alerted_at = models.DateTimeField(null=True, blank=True, editable=False)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["workload__name", "name"]

    def __str__(self) -> str:
        return self.name

    def save(self, *args, **kwargs) -> None:
        self.cap_nanos = usd_to_nanos(self.cap_usd or 0)
        if self._state.adding:
            # The first period starts now, not at midnight or the 1st: spend is counted from
            # here, and a period that said otherwise would disagree with the ledger.
            self.period_start = timezone.now()
        update_fields = kwargs.get("update_fields")
        if update_fields is not None and "cap_usd" in update_fields:
            kwargs["update_fields"] = {*update_fields, "cap_nanos"}
        # Never write the counters from a stale in-memory copy: they move by atomic updates.
        if not self._state.adding and update_fields is None:
            kwargs["update_fields"] = [
                f.attname
                for f in self._meta.concrete_fields
                if not f.primary_key and f.attname not in {"spent_nanos", "reserved_nanos"}
            ]
        super().save(*args, **kwargs)

    @property
    def scope_text(self) -> str:
        """What the budget counts, as the admin and the dashboard show it."""
        parts = []
        if self.workload_id:
            parts.append(f"workload {self.workload.name}")
        if self.user_id:
            parts.append(f"user {self.user.get_username()}")
        if self.api_token_id:
            parts.append(f"token {self.api_token.name}")
        if self.model:
            parts.append(f"model {self.model}")
        return ", ".join(parts) or "global"

    @property
    def spent_usd(self) -> Decimal:
        return nanos_to_usd(self.spent_nanos)

    @property
    def reserved_usd(self) -> Decimal:
        return nanos_to_usd(self.reserved_nanos)

    @property
    def remaining_usd(self) -> Decimal:
        return nanos_to_usd(max(0, self.cap_nanos - self.spent_nanos - self.reserved_nanos))

    @property
    def used_fraction(self) -> float:
        if self.cap_nanos <= 0:
            return 1.0
        return (self.spent_nanos + self.reserved_nanos) / self.cap_nanos

    @property
    def is_alerting(self) -> bool:
        return self.used_fraction >= self.alert_threshold


class BudgetReservation(models.Model):
    """What one job still holds on one budget: its worst-case cost minus what it has settled."""

    budget = models.ForeignKey(Budget, on_delete=models.CASCADE, related_name="reservations")
    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="budget_reservations")
    amount_nanos = models.BigIntegerField()
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["budget", "job"], name="unique_reservation_per_job")
        ]

    def __str__(self) -> str:
        return f"{self.job.code} on {self.budget}"


# --------------------------------------------------------------------------- rules on fields


def workload_errors(workload: Workload) -> dict[str, str]:
    """Configuration errors per field (Workload.clean and the admin show them)."""
    errors: dict[str, str] = {}
    labels = workload.labels
    if not isinstance(labels, list) or not all(isinstance(x, str) and x.strip() for x in labels):
        errors["labels"] = 'Labels must be a JSON list of non-empty strings, e.g. ["a", "b"].'
    elif workload.kind == Workload.Kind.CLASSIFY and len(labels) < 2:
        errors["labels"] = "A classify workload needs at least two labels."
    if workload.kind == Workload.Kind.EXTRACT:
        schema = workload.output_schema
        if not isinstance(schema, dict) or not schema:
            errors["output_schema"] = "An extract workload needs a JSON Schema (a JSON object)."
        else:
            try:
                jsonschema.validators.validator_for(schema).check_schema(schema)
            except jsonschema.SchemaError as exc:
                errors["output_schema"] = f"Not a valid JSON Schema: {exc.message}"
    if (
        workload.min_output_chars is not None
        and workload.max_output_chars is not None
        and workload.min_output_chars > workload.max_output_chars
    ):
        errors["max_output_chars"] = "The maximum is below the minimum."
    if (
        workload.kind == Workload.Kind.CLASSIFY
        and workload.confidence_source == Workload.ConfidenceSource.SELF_RATED
    ):
        errors["confidence_source"] = (
            "A classify workload's confidence is its label's probability (token logprobs): "
            "choose Automatic, Token logprobs or None."
        )
    if not isinstance(workload.sample_input, dict):
        errors["sample_input"] = 'Sample input must be a JSON object: {"field": "value"}.'
    return errors


def period_start_for(period: str, now: datetime) -> datetime:
    local = timezone.localtime(now)
    start = local.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == Budget.Period.MONTH:
        start = start.replace(day=1)
    return start


class Webhook(models.Model):
    """An address an operator set to be told, by a signed POST, when a job ends (succeeded,
    failed, cancelled, expired), goes to review, or a batch ends (jobs.webhooks). Narrowed to one
    submitter's jobs and batches and/or one workload's; with neither, every job's."""

    name = models.CharField(max_length=100)
    url = models.URLField(
        max_length=500,
        validators=[URLValidator(schemes=["http", "https"])],
        help_text="http(s) only. Redirects are not followed.",
    )
    # Kept to sign with (a digest could not sign): shown once, when the webhook is made.
    secret = models.CharField(max_length=64, editable=False)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="webhooks",
        help_text="Only this user's jobs and batches (blank: anyone's).",
    )
    workload = models.ForeignKey(
        Workload,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="webhooks",
        help_text="Only this workload's (blank: every workload's).",
    )
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.name

    def set_new_secret(self) -> str:
        self.secret = "whsec_" + secrets.token_urlsafe(32)
        return self.secret


class WebhookDelivery(models.Model):
    """One event for one webhook, and every attempt to deliver it (`log`)."""

    class Status(models.TextChoices):
        PENDING = "pending", "pending"
        DELIVERED = "delivered", "delivered"
        FAILED = "failed", "failed (no retry left)"

    code = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    webhook = models.ForeignKey(Webhook, on_delete=models.CASCADE, related_name="deliveries")
    job = models.ForeignKey(
        Job, null=True, blank=True, on_delete=models.CASCADE, related_name="webhook_deliveries"
    )
    batch = models.ForeignKey(
        "batches.Batch",
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="webhook_deliveries",
    )
    event = models.CharField(max_length=40)
    body = models.TextField(help_text="What is POSTed, byte for byte, on every attempt.")
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    last_status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    # [{"at", "status_code", "error", "ms"}] per attempt, oldest first.
    log = models.JSONField(default=list, blank=True)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name_plural = "webhook deliveries"
        indexes = [models.Index(fields=["status", "next_attempt_at"])]

    def __str__(self) -> str:
        return f"{self.event} → {self.webhook}"
