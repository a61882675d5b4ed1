"""The workload admin's prompt preview and template history (issue #9)."""

from __future__ import annotations

import json

from django.contrib import admin
from django.utils.html import format_html

from jobs import kinds
from jobs.models import Job, PromptTemplateVersion, Workload


class PromptTemplateVersionInline(admin.TabularInline):
    model = PromptTemplateVersion
    extra = 0
    can_delete = False
    fields = ["version", "created_at", "system_prompt", "prompt_template", "reduce_prompt"]
    readonly_fields = fields
    ordering = ["-version"]

    def has_add_permission(self, request, obj=None) -> bool:
        return False


def prompt_preview(workload: Workload) -> str:
    """The request a job of this workload would send, with the workload's sample input (a
    `<field>` placeholder for each field it lacks). Escaped: it is shown, never run."""
    if not workload.pk:
        return "Save the workload to see a preview."
    sample = workload.sample_input if isinstance(workload.sample_input, dict) else {}
    values = {name: str(sample.get(name, f"<{name}>")) for name in workload.input_fields}
    job = Job(
        workload=workload,
        input_text=values.get("input", ""),
        input_data={k: v for k, v in values.items() if k != "input"},
        template_version=workload.template_version,
    )
    if workload.kind == Workload.Kind.DOCUMENT:
        # The map call of one chunk; the reduce call combines the chunk results.
        job.parent_id = -1
    request = kinds.build_request(job)
    parts = [f"— system —\n{request.system_prompt or '(none)'}", f"— user —\n{request.user_prompt}"]
    if request.labels:
        parts.append(f"— labels (logprobs requested) —\n{', '.join(request.labels)}")
    if request.json_schema is not None:
        parts.append(f"— response JSON Schema —\n{json.dumps(request.json_schema, indent=2)}")
    parts.append(
        f"— model {request.model}, max {request.max_output_tokens} output tokens, "
        f"{'streamed' if request.stream else 'not streamed'}, "
        f"template v{workload.template_version} —"
    )
    return format_html(
        '<pre style="white-space: pre-wrap; max-width: 60rem">{}</pre>', "\n\n".join(parts)
    )
