from __future__ import annotations

import re

from django import forms
from django.db.models import Q

from jobs.models import Job, Priority, Workload
from jobs.services import MAX_INPUT_CHARS


class WorkloadChoiceField(forms.ModelChoiceField):
    def label_from_instance(self, obj: Workload) -> str:
        return f"{obj.name} (paused)" if obj.is_paused else obj.name


# Pausing refuses new submissions (services.do_submit_job); the jobs already submitted wait
# (jobs.admission) until an operator resumes the workload.
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

    def clean_workload(self) -> Workload:
        # The same refusal as services.do_submit_job, but as the field's error, so the form
        # comes back with this workload's fields and what was typed into them.
        workload = self.cleaned_data["workload"]
        if workload.is_paused:
            raise forms.ValidationError(PAUSED_MESSAGE.format(name=workload.name))
        return workload

    def clean_input_text(self) -> str:
        value = self.cleaned_data["input_text"]
        if not value.strip():
            raise forms.ValidationError("Enter the input for the model.")
        return value

    def clean_document(self):
        from jobs import documents

        upload = self.cleaned_data.get("document")
        if upload is None:
            return None
        try:
            return documents.read_upload(upload)
        except documents.DocumentError as exc:
            raise forms.ValidationError(str(exc)) from exc

    def clean(self) -> dict:
        cleaned = super().clean()
        fields = {k.removeprefix("field_"): v for k, v in cleaned.items() if k.startswith("field_")}
        for name, value in fields.items():
            if not value.strip():
                self.add_error(f"field_{name}", "Enter a value.")
        if fields:
            from jobs import kinds

            cleaned["input_data"] = fields
            cleaned["input_text"] = kinds.render_input_text(fields)
        return cleaned


# What a job's code looks like as people copy it: the first hex digits shown in lists, or whole.
CODE_PREFIX = re.compile(r"[0-9a-f][0-9a-f-]{3,35}", re.IGNORECASE)


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

    def search(self) -> Q | None:
        """Jobs whose input contains the search text, or whose code starts with it."""
        text = self.cleaned_data.get("q")
        if not text:
            return None
        match = Q(input_text__icontains=text)
        if CODE_PREFIX.fullmatch(text):
            match |= Q(code__istartswith=text)
        return match
