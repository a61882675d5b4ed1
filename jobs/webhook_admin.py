"""The admin's webhooks: an operator sets the address (its secret is shown once, as an API
token's key is), and reads every delivery's attempts and sends one again."""

from __future__ import annotations

from django.contrib import admin, messages
from django.http import HttpResponse
from django.template.response import TemplateResponse
from django.utils.cache import add_never_cache_headers

from jobs import webhooks
from jobs.models import Webhook, WebhookDelivery


def shown_once(model_admin, request, template: str, **context) -> HttpResponse:
    """A secret (an API token's key, a webhook's signing secret) once, on the page that answers
    the POST itself: no redirect, so it never travels in a cookie, a URL or the session, and no
    cache keeps it."""
    context = {**model_admin.admin_site.each_context(request), "opts": model_admin.opts, **context}
    response = TemplateResponse(request, template, context)
    add_never_cache_headers(response)
    response["Cache-Control"] = "no-store"
    return response


@admin.register(Webhook)
class WebhookAdmin(admin.ModelAdmin):
    list_display = ["name", "url", "user", "workload", "is_active", "created_at"]
    list_filter = ["is_active"]
    fields = ["name", "url", "user", "workload", "is_active"]

    def save_model(self, request, obj: Webhook, form, change) -> None:
        if not change:
            obj.new_secret = obj.set_new_secret()  # on this instance only, for response_add
        super().save_model(request, obj, form, change)
        webhooks.forget_cache()  # this process hears of it at once; others within seconds

    def response_add(self, request, obj: Webhook, post_url_continue=None) -> HttpResponse:
        return shown_once(
            self,
            request,
            "admin/jobs/webhook/created.html",
            title="Webhook created",
            webhook=obj,
            secret=obj.new_secret,
        )


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(admin.ModelAdmin):
    list_display = [
        "event",
        "webhook",
        "job",
        "status",
        "attempts",
        "last_status_code",
        "created_at",
    ]
    list_filter = ["status", "event", "webhook"]
    search_fields = ["code", "job__code"]
    list_select_related = ["webhook", "job__workload"]
    actions = ["deliver_again"]
    readonly_fields = [
        "code",
        "webhook",
        "job",
        "batch",
        "event",
        "body",
        "status",
        "attempts",
        "last_status_code",
        "last_error",
        "log",
        "next_attempt_at",
        "created_at",
        "delivered_at",
    ]

    def has_add_permission(self, request) -> bool:
        return False  # deliveries are events that happened

    @admin.action(description="Deliver again", permissions=["change"])
    def deliver_again(self, request, queryset) -> None:
        count = 0
        for delivery in queryset:
            webhooks.redeliver(delivery)
            count += 1
        messages.success(request, f"{count} deliver{'y' if count == 1 else 'ies'} queued again.")
