from __future__ import annotations

from django import forms

from jobs.models import Job, Priority, Workload
from jobs.services import MAX_INPUT_CHARS


class SubmitJobForm(forms.Form):
    workload = forms.ModelChoiceField(
        queryset=Workload.objects.filter(is_paused=False), empty_label=None
    )
    input_text = forms.CharField(
        label="Input",
        widget=forms.Textarea(attrs={"rows": 8}),
        max_length=MAX_INPUT_CHARS,
        strip=False,
    )
    priority = forms.ChoiceField(
        choices=[("", "Workload default"), *Priority.choices], required=False
    )
    # Set once per rendered form, so a double-click or a resubmitted POST returns the same job.
    idempotency_key = forms.CharField(widget=forms.HiddenInput, required=False, max_length=200)

    def clean_input_text(self) -> str:
        value = self.cleaned_data["input_text"]
        if not value.strip():
            raise forms.ValidationError("Enter the input for the model.")
        return value


class JobFilterForm(forms.Form):
    status = forms.ChoiceField(choices=[("", "Any status"), *Job.Status.choices], required=False)
    workload = forms.ModelChoiceField(
        queryset=Workload.objects.all(), required=False, empty_label="Any workload"
    )
