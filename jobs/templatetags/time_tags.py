"""Relative times to the second, where Django's `timesince` says "0 minutes" for anything
under a minute."""

from __future__ import annotations

from datetime import datetime

from django import template
from django.utils import timezone

register = template.Library()


@register.filter
def ago(moment: datetime | None) -> str:
    """'12 s ago', '3 min 5 s ago', '2 h 7 min ago', '4 d 3 h ago'."""
    if moment is None:
        return "—"
    seconds = int((timezone.now() - moment).total_seconds())
    if seconds < 0:
        return "just now"  # another process's clock, a moment ahead
    minutes, secs = divmod(seconds, 60)
    hours, mins = divmod(minutes, 60)
    days, hrs = divmod(hours, 24)
    if not minutes:
        return f"{secs} s ago"
    if not hours:
        return f"{mins} min {secs} s ago"
    if not days:
        return f"{hrs} h {mins} min ago"
    return f"{days} d {hrs} h ago"
