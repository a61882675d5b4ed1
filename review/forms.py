"""Forms of the review inbox: filters, and the inputs of each action."""

from __future__ import annotations

from typing import Any

from django import forms

from jobs import inputs
from jobs.forms import OverridesForm
from jobs.models import Workload
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


class RetryForm(OverridesForm):
    note = forms.CharField(required=False, max_length=2000)


class RejectForm(forms.Form):
    reason = forms.CharField(max_length=300, strip=True)


class ItemIdsField(forms.Field):
    """The ticked items: ids the database can hold (an id out of range was an OverflowError)."""

    widget = forms.MultipleHiddenInput
    default_error_messages = {"required": "Select at least one item."}

    def to_python(self, value) -> list[int]:
        values = value if isinstance(value, list | tuple) else ([value] if value else [])
        try:
            return [inputs.parse_id(raw, "An item id") for raw in values]
        except inputs.InvalidInput as exc:
            raise forms.ValidationError(str(exc)) from None


class BulkForm(forms.Form):
    """The inbox's bulk buttons: the ticked items and the action."""

    items = ItemIdsField()
    action = forms.ChoiceField(
        choices=[("approve", "Approve"), ("retry", "Retry"), ("reject", "Reject")]
    )
    reason = forms.CharField(required=False, max_length=300)

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        if data.get("action") == "reject" and not (data.get("reason") or "").strip():
            self.add_error("reason", "Say why the outputs are rejected.")
        return data
