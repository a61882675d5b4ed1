"""Forms of the review inbox: filters, and the inputs of each action."""

from __future__ import annotations

from typing import Any

from django import forms

from jobs.models import Provider, Workload
from review.models import ReviewItem
from review.validation import InvalidOutput, validate_output


class InboxFilterForm(forms.Form):
    # The labels name the filters to screen readers (templates/review/inbox.html hides them:
    # each select's first option already says what it filters).
    reason = forms.ChoiceField(
        label="Reason", choices=[("", "Any reason"), *ReviewItem.Reason.choices], required=False
    )
    workload = forms.ModelChoiceField(
        label="Workload",
        queryset=Workload.objects.all(),
        required=False,
        empty_label="Any workload",
    )
    claim = forms.ChoiceField(
        label="Claim",
        choices=[
            ("", "Claimed or not"),
            ("unclaimed", "Unclaimed"),
            ("claimed", "Claimed"),
            ("mine", "Claimed by me"),
        ],
        required=False,
    )
    sort = forms.ChoiceField(
        label="Sort",
        choices=[("oldest", "Oldest first"), ("confidence", "Lowest confidence first")],
        required=False,
    )


class NoteForm(forms.Form):
    note = forms.CharField(required=False, max_length=2000)


class CorrectForm(forms.Form):
    corrected_output = forms.CharField(widget=forms.Textarea(attrs={"rows": 8}), strip=True)
    note = forms.CharField(required=False, max_length=2000)

    def __init__(self, *args: Any, workload: Workload, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.workload = workload

    def clean_corrected_output(self) -> str:
        value = self.cleaned_data["corrected_output"]
        try:
            validate_output(self.workload, value)
        except InvalidOutput as exc:
            raise forms.ValidationError(str(exc))
        return value


class RetryForm(forms.Form):
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
    note = forms.CharField(required=False, max_length=2000)

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


class RejectForm(forms.Form):
    reason = forms.CharField(max_length=300, strip=True)


class BulkForm(forms.Form):
    """The action of the list's bulk buttons; the checked item ids are read by the view."""

    action = forms.ChoiceField(
        choices=[("approve", "Approve"), ("retry", "Retry"), ("reject", "Reject")]
    )
    reason = forms.CharField(required=False, max_length=300)

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        if data.get("action") == "reject" and not (data.get("reason") or "").strip():
            self.add_error("reason", "Say why the outputs are rejected.")
        return data
