from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

from django import forms
from django.db.models import (
    Case,
    DurationField,
    ExpressionWrapper,
    F,
    Q,
    QuerySet,
    Value,
    When,
)
from django.utils import timezone

from jobs import documents, inputs, kinds
from jobs.flow import budgets
from jobs.models import Job, Priority, Provider, Workload
from jobs.services import MAX_INPUT_CHARS


class WorkloadChoiceField(forms.ModelChoiceField):
    def label_from_instance(self, obj: Workload) -> str:
        return f"{obj.name} (paused)" if obj.is_paused else obj.name


# Pausing refuses new submissions (services.do_submit_job); the jobs already submitted wait
# (runs.admission) until an operator resumes the workload.
PAUSED_MESSAGE = (
    "{name} is paused by an operator: it takes no new jobs until it is resumed. "
    "Choose another workload, or try again later."
)


class SubmitJobForm(forms.Form):
    # Paused workloads stay in the list, marked, so a link to one (or a pause while the form
    # is open) shows that workload and why it takes no jobs, instead of silently showing
    # another workload's name over this one's fields.
    workload = WorkloadChoiceField(queryset=Workload.objects.all(), empty_label=None)
    input_text = forms.CharField(
        label="Input",
        widget=forms.Textarea(attrs={"rows": 8}),
        max_length=MAX_INPUT_CHARS,
        strip=False,
    )
    priority = forms.ChoiceField(
        choices=[("", "Workload default"), *Priority.choices], required=False
    )
    start_at = forms.DateTimeField(
        label="Start no earlier than",
        required=False,
        widget=forms.DateTimeInput(attrs={"type": "datetime-local"}),
        help_text="Optional. Blank: as soon as capacity allows.",
    )
    deadline = forms.DateTimeField(
        required=False,
        widget=forms.DateTimeInput(attrs={"type": "datetime-local"}),
        help_text="Optional. A job that has not started by then expires and costs nothing.",
    )
    # Set once per rendered form, so a double-click or a resubmitted POST returns the same job.
    idempotency_key = forms.CharField(widget=forms.HiddenInput, required=False, max_length=200)

    # Per-kind fields (issue #9): a workload whose template has named fields gets one input per
    # field (`field_<name>`), a document workload a file upload, others the single input_text.
    document = forms.FileField(
        label="Document",
        required=False,
        help_text="PDF, Word (.docx), plain text or Markdown; the type is checked by content.",
    )

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.chosen_workload = self._chosen_workload()
        workload = self.chosen_workload
        names = workload.input_fields if workload else ["input"]
        if workload is not None and workload.kind == Workload.Kind.DOCUMENT:
            del self.fields["input_text"]
            self.fields["document"].required = True
        else:
            del self.fields["document"]
            if names != ["input"]:
                del self.fields["input_text"]
                for name in names:
                    self.fields[f"field_{name}"] = forms.CharField(
                        label=name.replace("_", " ").capitalize(),
                        widget=forms.Textarea(attrs={"rows": 3}),
                        max_length=MAX_INPUT_CHARS,
                        strip=False,
                    )

    def _chosen_workload(self) -> Workload | None:
        """The workload whose description and fields the form shows: the one asked for (the
        posted choice, else `?workload=`), else the first that takes jobs. The select shows
        the same one, so the posted choice always matches the fields typed into."""
        field = self.fields["workload"]
        raw = self.data.get(self.add_prefix("workload")) if self.is_bound else None
        raw = raw or self.initial.get("workload")
        if isinstance(raw, Workload):
            raw = raw.pk
        chosen = field.queryset.filter(pk=raw).first() if str(raw or "").isdigit() else None
        return chosen or field.queryset.filter(is_paused=False).first() or field.queryset.first()

    @property
    def paused_notice(self) -> str:
        """Why the chosen workload takes no jobs, said before anything is typed; empty once
        the same words show as the workload's error (a submission that was refused)."""
        workload = self.chosen_workload
        if workload is None or not workload.is_paused or self.has_error("workload"):
            return ""
        return PAUSED_MESSAGE.format(name=workload.name)

    @property
    def per_kind_fields(self) -> list:
        names = ("input_text", "document")
        return [f for f in self.visible_fields() if f.name in names or f.name.startswith("field_")]

    @property
    def common_fields(self) -> list:
        chosen = {f.name for f in self.per_kind_fields}
        return [f for f in self.visible_fields() if f.name not in chosen and f.name != "workload"]

    def typed_input(self) -> str | dict[str, str]:
        """What has been typed so far, valid or not: the text, or the named fields' values."""
        workload = self.chosen_workload
        data = self.data if self.is_bound else {}
        names = workload.input_fields if workload else ["input"]
        if names == ["input"]:
            return str(data.get(self.add_prefix("input_text"), ""))
        return {name: str(data.get(self.add_prefix(f"field_{name}"), "")) for name in names}

    def cost_estimate(self) -> dict:
        """What the job may cost at most, and what that is based on, before it is submitted:
        the reservation's own rule (jobs.flow.budgets.estimate_job, jobs.costs), as the batch
        preview shows it."""
        workload = self.chosen_workload
        if workload is None:
            return {}
        if workload.kind == Workload.Kind.DOCUMENT:
            return {
                "estimate_note": "A document's estimate needs its text: each chunk is reserved "
                "when it is split, and the combining call when the chunks are done."
            }
        try:
            estimate = budgets.estimate_job(workload, self.typed_input())
        except budgets.CannotEstimate as exc:
            return {"estimate_error": str(exc)}
        return {"estimate": estimate}

    def clean_workload(self) -> Workload:
        # The same refusal as services.do_submit_job, but as the field's error, so the form
        # comes back with this workload's fields and what was typed into them.
        workload = self.cleaned_data["workload"]
        if workload.is_paused:
            raise forms.ValidationError(PAUSED_MESSAGE.format(name=workload.name))
        return workload

    def _clean_time(self, name: str):
        return _checked_time(self.cleaned_data.get(name))

    def clean_start_at(self):
        return self._clean_time("start_at")

    def clean_deadline(self):
        return self._clean_time("deadline")

    def clean_input_text(self) -> str:
        value = self.cleaned_data["input_text"]
        if not value.strip():
            raise forms.ValidationError("Enter the input for the model.")
        return value

    def clean_document(self):
        upload = self.cleaned_data.get("document")
        if upload is None:
            return None
        try:
            return documents.read_upload(upload)
        except documents.DocumentError as exc:
            raise forms.ValidationError(str(exc)) from exc

    def clean(self) -> dict:
        cleaned = super().clean()
        if self.has_error("idempotency_key"):
            # A hidden field's error shows nowhere: say it where the form's own errors are.
            problems = " ".join(self.errors.pop("idempotency_key"))
            self.add_error(
                None,
                f"This form's submission key was refused ({problems}) Reload the page and "
                "submit again.",
            )
        fields = {k.removeprefix("field_"): v for k, v in cleaned.items() if k.startswith("field_")}
        if fields and self.chosen_workload is not None:
            try:
                cleaned["input_text"], cleaned["input_data"] = kinds.named_input(
                    self.chosen_workload, fields
                )
            except kinds.FieldsError as refused:
                for name in refused.missing:
                    if f"field_{name}" in self.fields and not self.has_error(f"field_{name}"):
                        self.add_error(f"field_{name}", "Enter a value.")
        return cleaned


# What a job's code looks like as people copy it: the first hex digits shown in lists, or whole.
CODE_PREFIX = re.compile(r"[0-9a-f][0-9a-f-]{3,35}", re.IGNORECASE)


# The job list's sorts: `?sort=<key>`, a leading "-" for descending (jobs.views.COLUMNS).
PRIORITY_RANK = Case(
    When(priority=Priority.HIGH, then=Value(0)),
    When(priority=Priority.DEFAULT, then=Value(1)),
    default=Value(2),
)
SORTS = {
    f"{sign}{key}": tuple(f"{sign}{field}" for field in fields)
    for key, fields in {
        "created": ("created_at", "id"),
        "workload": ("workload__name", "created_at", "id"),
        "priority": ("priority_rank", "created_at", "id"),
        "status": ("status", "created_at", "id"),
        "cost": ("listed_cost", "id"),
        "attempts": ("attempt_count", "id"),
        "duration": ("run_time", "id"),
    }.items()
    for sign in ("", "-")
}


def with_run_time(jobs: QuerySet[Job]) -> QuerySet[Job]:
    """Annotate `run_time`: how long the job's last run took (NULL until it finished)."""
    return jobs.annotate(
        run_time=ExpressionWrapper(F("finished_at") - F("started_at"), output_field=DurationField())
    )


def _nulls_last(name: str):
    """An order_by term; a job without a run time (not finished) goes last either way, on
    every database (PostgreSQL puts NULLs first when descending, SQLite last)."""
    if name.lstrip("-") != "run_time":
        return name
    return F("run_time").desc(nulls_last=True) if name[0] == "-" else F(name).asc(nulls_last=True)


class JobFilterForm(forms.Form):
    q = forms.CharField(
        required=False,
        max_length=200,
        widget=forms.TextInput(
            attrs={"type": "search", "placeholder": "Code or input text", "aria-label": "Search"}
        ),
    )
    status = forms.ChoiceField(choices=[("", "Any status"), *Job.Status.choices], required=False)
    workload = forms.ModelChoiceField(
        queryset=Workload.objects.all(), required=False, empty_label="Any workload"
    )
    priority = forms.ChoiceField(choices=[("", "Any priority"), *Priority.choices], required=False)
    error_class = forms.CharField(label="Error class", required=False, max_length=100)
    submitter = forms.CharField(label="Submitted by", required=False, max_length=150)
    batch = forms.UUIDField(label="Batch code", required=False)
    min_attempts = forms.IntegerField(
        label="At least attempts", required=False, min_value=0, max_value=100_000
    )
    min_cost = forms.DecimalField(
        label="Cost at least (USD)", required=False, min_value=0, max_digits=14, decimal_places=8
    )
    min_duration = forms.FloatField(
        label="Ran at least (s)", required=False, min_value=0, max_value=10**8
    )
    sort = forms.ChoiceField(
        choices=[("", "Newest first"), *((key, key) for key in SORTS)], required=False
    )
    since = forms.DateTimeField(
        label="Submitted from",
        required=False,
        widget=forms.DateTimeInput(attrs={"type": "datetime-local"}),
    )
    until = forms.DateTimeField(
        label="Submitted before",
        required=False,
        widget=forms.DateTimeInput(attrs={"type": "datetime-local"}),
    )

    def clean_since(self):
        return _checked_time(self.cleaned_data.get("since"))

    def clean_until(self):
        return _checked_time(self.cleaned_data.get("until"))

    def apply(self, jobs: QuerySet[Job]) -> QuerySet[Job]:
        """`jobs` narrowed by the valid filters. A bad value (a hand-edited or stale link)
        drops only its own filter: cleaned_data keeps the valid ones, and the list says which
        was ignored (form.errors)."""
        if not self.is_bound:
            return jobs
        self.is_valid()
        data = self.cleaned_data
        if (search := self.search()) is not None:
            jobs = jobs.filter(search)
        if status := data.get("status"):
            jobs = jobs.filter(status=status)
        if workload := data.get("workload"):
            jobs = jobs.filter(workload=workload)
        if since := data.get("since"):
            jobs = jobs.filter(created_at__gte=since)
        if until := data.get("until"):
            jobs = jobs.filter(created_at__lt=until)
        if priority := data.get("priority"):
            jobs = jobs.filter(priority=priority)
        if error_class := data.get("error_class"):
            jobs = jobs.filter(error_class__iexact=error_class.strip())
        if submitter := data.get("submitter"):
            jobs = jobs.filter(submitted_by__username__iexact=submitter.strip())
        if batch := data.get("batch"):
            jobs = jobs.filter(batch__code=batch)
        if (attempts := data.get("min_attempts")) is not None:
            jobs = jobs.filter(attempt_count__gte=attempts)
        if (cost := data.get("min_cost")) is not None:
            jobs = jobs.filter(cost_actual__gte=cost)
        if (duration := data.get("min_duration")) is not None:
            jobs = with_run_time(jobs).filter(run_time__gte=timedelta(seconds=duration))
        return jobs

    def ordering(self, jobs: QuerySet[Job]) -> QuerySet[Job]:
        """`jobs` in the chosen order (newest first by default); `listed_cost` must be
        annotated for a sort by cost (jobs.views.with_listed_cost)."""
        key = (self.cleaned_data.get("sort") if self.is_bound else "") or ""
        if key.lstrip("-") == "duration":
            jobs = with_run_time(jobs)
        if key.lstrip("-") == "priority":
            jobs = jobs.annotate(priority_rank=PRIORITY_RANK)
        fields = SORTS.get(key, ("-created_at", "-id"))
        return jobs.order_by(*(_nulls_last(name) for name in fields))

    def describe(self) -> list[str]:
        """The filters in force, as people read them ("status Failed", …)."""
        if not self.is_bound:
            return []
        said = []
        for name, value in self.cleaned_data.items():
            if value in (None, "") or name == "sort":
                continue
            field = self.fields[name]
            if isinstance(field, forms.ChoiceField) and not isinstance(
                field, forms.ModelChoiceField
            ):
                value = dict(field.choices).get(value, value)
            elif hasattr(value, "strftime"):
                value = f"{timezone.localtime(value):%Y-%m-%d %H:%M}"
            label = "search" if name == "q" else (field.label or name.replace("_", " "))
            said.append(f"{label.lower()} {value}")
        return said

    @property
    def is_advanced(self) -> bool:
        """Whether a filter behind "More filters" is set (the details then start open)."""
        if not self.is_bound:
            return False
        return any(self.data.get(name) for name in self.ADVANCED)

    ADVANCED = (
        "priority",
        "error_class",
        "submitter",
        "batch",
        "min_attempts",
        "min_cost",
        "min_duration",
        "since",
        "until",
    )

    def search(self) -> Q | None:
        """Jobs whose input contains the search text, or whose code starts with it."""
        text = self.cleaned_data.get("q")
        if not text:
            return None
        match = Q(input_text__icontains=text)
        if CODE_PREFIX.fullmatch(text):
            match |= Q(code__istartswith=text)
        return match


def _checked_time(value):
    if value is None:
        return None
    try:
        return inputs.check_time(value, "This time")
    except inputs.InvalidInput as exc:
        raise forms.ValidationError(str(exc)) from None


class OverridesForm(forms.Form):
    """What a run of a job may change over its workload's settings (jobs.replay.OVERRIDE_KEYS):
    a reviewer's retry, a replay."""

    provider = forms.ModelChoiceField(
        queryset=Provider.objects.filter(is_active=True),
        required=False,
        empty_label="Workload's provider",
    )
    model = forms.CharField(required=False, max_length=200)
    temperature = forms.FloatField(required=False, min_value=0.0, max_value=2.0)
    prompt = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 6}),
        help_text="The user message sent to the model. Leave as is to keep the workload's.",
    )

    def overrides(self, default_prompt: str) -> dict[str, Any]:
        data = self.cleaned_data
        overrides: dict[str, Any] = {}
        if data.get("provider"):
            overrides["provider_id"] = data["provider"].pk
        if data.get("model"):
            overrides["model"] = data["model"]
        if data.get("temperature") is not None:
            overrides["temperature"] = data["temperature"]
        prompt = (data.get("prompt") or "").replace("\r\n", "\n")
        if prompt.strip() and prompt.strip() != default_prompt.strip():
            overrides["prompt"] = prompt
        return overrides
