from __future__ import annotations

from django import template

from review import roles

register = template.Library()


@register.filter
def can_read_reviews(user) -> bool:
    return roles.can_read(user)
