from __future__ import annotations

from django import forms
from django.conf import settings

from batches.models import Batch
from jobs.models import Priority, Workload


class BatchUploadForm(forms.Form):
    workload = forms.ModelChoiceField(
        queryset=Workload.objects.filter(is_paused=False).exclude(kind=Workload.Kind.DOCUMENT),
        empty_label=None,
    )
    file = forms.FileField(
        label="CSV or JSONL file",
        help_text="CSV with a header row (UTF-8), or JSON Lines: one object per line.",
    )
    priority = forms.ChoiceField(choices=Priority.choices, initial=Priority.LOW)

    def clean_file(self):
        upload = self.cleaned_data["file"]
        limit = settings.AIQUEUE_BATCH_MAX_BYTES
        if upload.size > limit:
            raise forms.ValidationError(
                f"The file is {upload.size / 1_048_576:.1f} MB; the limit is "
                f"{limit / 1_048_576:.1f} MB."
            )
        return upload


class MappingForm(forms.Form):
    """One column choice per input field of the workload."""

    def __init__(self, *args, batch: Batch, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        choices = [("", "— choose a column —"), *((c, c) for c in batch.columns)]
        for name in batch.workload.input_fields:
            self.fields[f"field_{name}"] = forms.ChoiceField(
                label=f"{{{name}}}",
                choices=choices,
                required=True,
                initial=batch.mapping.get(name, ""),
            )

    def mapping(self) -> dict[str, str]:
        return {key.removeprefix("field_"): value for key, value in self.cleaned_data.items()}
