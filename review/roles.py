"""Who may do what in the inbox: Reviewers (and superusers) act; readers only look."""

from __future__ import annotations

from review.models import REVIEWERS_GROUP


def can_act(user) -> bool:
    if not (user.is_authenticated and user.is_active):
        return False
    if user.is_superuser:
        return True
    # Cached on the user object: templates and views ask several times per request.
    if not hasattr(user, "_is_reviewer"):
        user._is_reviewer = user.groups.filter(name=REVIEWERS_GROUP).exists()
    return user._is_reviewer


def can_read(user) -> bool:
    return can_act(user) or (user.is_authenticated and user.has_perm("review.view_reviewitem"))
