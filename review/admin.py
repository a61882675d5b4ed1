from __future__ import annotations

from django.contrib import admin

from review.models import ReviewItem


@admin.register(ReviewItem)
class ReviewItemAdmin(admin.ModelAdmin):
    """Read-mostly: reviews are worked in /review/, where every action is audited."""

    list_display = ["id", "job", "reason", "status", "resolution", "claimed_by", "created_at"]
    list_filter = ["status", "reason", "resolution", "job__workload"]
    search_fields = ["job__code", "note"]
    list_select_related = ["job__workload", "claimed_by"]
    raw_id_fields = ["job", "claimed_by", "resolved_by"]
    readonly_fields = [
        "job",
        "reason",
        "evidence",
        "output_text",
        "confidence",
        "status",
        "resolution",
        "corrected_output",
        "resolved_by",
        "resolved_at",
        "created_at",
        "notified_at",
    ]

    def has_add_permission(self, request) -> bool:
        return False
