"""How long ago something happened, as lists show it: seconds count under a minute.

Django's `timesince` says "0 minutes" for anything under a minute, so a list of jobs
submitted in the last minute read "0 minutes ago" on every row.
"""

from __future__ import annotations

import datetime as dt

from django import template
from django.utils import timezone
from django.utils.timesince import timesince

register = template.Library()


@register.filter
def ago(value: dt.datetime | None, now: dt.datetime | None = None) -> str:
    if value is None:
        return ""
    seconds = int(((now or timezone.now()) - value).total_seconds())
    if seconds < 1:
        return "just now"
    if seconds < 60:
        return f"{seconds} s ago"
    if seconds < 600:
        return f"{seconds // 60} min {seconds % 60} s ago"
    return f"{timesince(value, now)} ago"
