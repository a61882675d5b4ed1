from __future__ import annotations

from django.contrib import admin

from batches.models import Batch


@admin.register(Batch)
class BatchAdmin(admin.ModelAdmin):
    list_display = ["filename", "workload", "status", "total_rows", "invalid_rows", "created_at"]
    list_filter = ["status", "workload"]
    search_fields = ["=code", "filename"]
    # State changes go through batches.services (pause, resume, cancel on the batch page).
    readonly_fields = [f.name for f in Batch._meta.fields if f.name != "max_in_flight"]

    def has_add_permission(self, request) -> bool:
        return False
