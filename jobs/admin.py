from __future__ import annotations

import os

from django.contrib import admin, messages
from django.db import models
from django.http import HttpResponse
from django.utils.html import format_html

from jobs import budget_admin, operator, provider_keys, rq_admin, webhook_admin  # noqa: F401 - they register
from jobs.breaker_admin import BreakerAdminMixin
from jobs.models import ApiToken, Attempt, Job, JobEvent, ModelPrice, Provider, Workload
from jobs.workload_admin import PromptTemplateVersionInline, prompt_preview


class ModelPriceInline(admin.TabularInline):
    model = ModelPrice
    extra = 1


@admin.register(Provider)
class ProviderAdmin(BreakerAdminMixin, admin.ModelAdmin):
    list_display = ["name", "kind", "base_url", "api_key_status", "max_concurrency", "is_active"]
    list_filter = ["kind", "is_active"]
    search_fields = ["name", "base_url"]
    inlines = [ModelPriceInline]
    readonly_fields = ["api_key_status", "breaker_status", "credit_status"]
    actions = ["reset_breakers", "clear_out_of_credit"]
    # A base URL typed without a scheme means https (Django 6's default; explicit for 5.2).
    formfield_overrides = {models.URLField: {"assume_scheme": "https"}}

    @admin.display(description="API key")
    def api_key_status(self, obj: Provider) -> str:
        # Only whether the variable is set is ever shown, never its value.
        if not obj.api_key_env:
            return "not required"
        if problem := provider_keys.refusal(obj.api_key_env):
            # Not even whether it is set: that too would tell about the workers' environment.
            return format_html('<strong style="color:#c0392b">refused: {}</strong>', problem)
        if os.environ.get(obj.api_key_env):
            return f"set ({obj.api_key_env})"
        return format_html(
            '<strong style="color:#c0392b">missing: {} is not set</strong>', obj.api_key_env
        )

    @admin.display(description="Credit")
    def credit_status(self, obj: Provider) -> str:
        if not obj.is_out_of_credit:
            return "ok"
        return format_html(
            '<strong style="color:#c0392b">out of credit since {}</strong>: {}',
            obj.out_of_credit_since,
            obj.out_of_credit_reason,
        )

    @admin.action(description="Credit added: clear out of credit and resume held jobs")
    def clear_out_of_credit(self, request, queryset) -> None:
        for provider in queryset:
            try:
                released = operator.do_clear_out_of_credit(provider, actor=request.user)
            except operator.OperatorError as exc:
                self.message_user(request, str(exc), messages.WARNING)
            else:
                self.message_user(request, f"{provider}: {released} held job(s) released.")


@admin.register(Workload)
class WorkloadAdmin(admin.ModelAdmin):
    list_display = ["name", "kind", "provider", "model", "default_priority", "is_paused"]
    list_filter = ["kind", "provider", "is_paused"]
    search_fields = ["name", "description"]
    actions = ["pause", "resume"]
    # Issue #9: the request a job would send, with the sample input, and the prompt history.
    readonly_fields = ["template_version", "prompt_preview"]
    inlines = [PromptTemplateVersionInline]

    @admin.display(description="Prompt preview (with the sample input)")
    def prompt_preview(self, obj: Workload) -> str:
        return prompt_preview(obj)

    @admin.action(description="Pause selected workloads")
    def pause(self, request, queryset) -> None:
        # The same audited action as the dashboard's control (issue #7).
        for workload in queryset:
            operator.do_pause_workload(workload, actor=request.user)

    @admin.action(description="Resume selected workloads")
    def resume(self, request, queryset) -> None:
        # Audited, and wakes the jobs parked while the workload was paused.
        for workload in queryset:
            operator.do_resume_workload(workload, actor=request.user)


class AttemptInline(admin.TabularInline):
    model = Attempt
    extra = 0
    can_delete = False
    fields = ["number", "provider", "model", "http_status", "tokens_in", "tokens_out", "cost"]
    readonly_fields = fields

    def has_add_permission(self, request, obj=None) -> bool:
        return False


class JobEventInline(admin.TabularInline):
    model = JobEvent
    extra = 0
    can_delete = False
    fields = ["created_at", "actor", "from_status", "to_status", "reason"]
    readonly_fields = fields

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Job)
class JobAdmin(admin.ModelAdmin):
    list_display = [
        "code", "workload", "status", "priority", "attempt_count", "cost_actual", "created_at",
        "finished_at",
    ]  # fmt: skip
    list_filter = ["status", "priority", "workload", "error_class"]
    search_fields = ["=code", "input_text", "wait_reason"]
    list_select_related = ["workload"]
    date_hierarchy = "created_at"
    inlines = [AttemptInline, JobEventInline]
    # Status only changes through services (compare-and-set + audit event), never by a form.
    readonly_fields = [f.name for f in Job._meta.fields]

    def has_add_permission(self, request) -> bool:
        return False


@admin.register(Attempt)
class AttemptAdmin(admin.ModelAdmin):
    """The cost ledger is append-only."""

    list_display = [
        "job", "number", "provider", "model", "started_at", "http_status", "error_class",
        "tokens_in", "tokens_out", "latency_ms", "cost",
    ]  # fmt: skip
    list_filter = ["provider", "error_class", "http_status"]
    search_fields = ["=job__code", "model"]
    list_select_related = ["job", "provider"]
    date_hierarchy = "started_at"

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


@admin.register(JobEvent)
class JobEventAdmin(admin.ModelAdmin):
    """The audit log: read-only, searchable by job code and reason."""

    list_display = ["created_at", "job", "actor", "from_status", "to_status", "reason"]
    list_filter = ["to_status", "from_status"]
    search_fields = ["=job__code", "reason", "actor__username"]
    list_select_related = ["job", "actor"]
    date_hierarchy = "created_at"

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ["name", "user", "prefix", "created_at", "last_used_at"]
    search_fields = ["name", "user__username"]
    fields = ["user", "name", "prefix", "created_at", "last_used_at"]
    readonly_fields = ["prefix", "created_at", "last_used_at"]

    def save_model(self, request, obj: ApiToken, form, change) -> None:
        if not change:
            # Kept on this instance only, for response_add. Not a message: the messages
            # framework keeps them in a cookie (signed, readable) until the next page.
            obj.new_key = obj.set_new_key()
        super().save_model(request, obj, form, change)

    def response_add(self, request, obj: ApiToken, post_url_continue=None) -> HttpResponse:
        return webhook_admin.shown_once(
            self,
            request,
            "admin/jobs/apitoken/created.html",
            title="API token created",
            token=obj,
            key=obj.new_key,
        )
