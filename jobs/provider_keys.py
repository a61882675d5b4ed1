"""Which environment variables a provider may name as its API key.

A worker sends the named variable's value to the provider's base URL as its bearer token (or
`x-api-key`). Both are set in the admin by whoever has `jobs.change_provider`, so a free-text
name would let them send any of the workers' variables (REDIS_URL, DATABASE_URL with its
password, the secret key) to a host of their choosing. Only names that look like a provider
key are taken (`..._API_KEY`), or, when `AIQUEUE_PROVIDER_KEY_VARS` is set, exactly the names
it lists; the app's own settings never, even when listed. Checked on the form (the field's
validator) and again where the key is read (`providers.base.BaseProvider.api_key`), for rows
written before the rule or around the form.
"""

from __future__ import annotations

import re

from django.conf import settings
from django.core.exceptions import ValidationError

KEY_VAR_RE = re.compile(r"[A-Z][A-Z0-9_]*_API_KEY")
# The settings aiqueue itself reads (README), and the usual secrets of a Django deployment.
OWN_SETTINGS = frozenset(
    {"DATABASE_URL", "REDIS_URL", "SECRET_KEY", "HOST", "PORT", "DJANGO_SETTINGS_MODULE"}
)
OWN_PREFIXES = ("AIQUEUE_", "DJANGO_")

HELP_TEXT = (
    "Name of the environment variable that holds the key: it must end in _API_KEY (for "
    "example OPENAI_API_KEY), or be listed in AIQUEUE_PROVIDER_KEY_VARS; aiqueue's own "
    "settings are never allowed. The key itself is never stored, queued, logged or shown."
)


def refusal(name: str) -> str:
    """Why `name` may not be a provider's key variable ('' if it may)."""
    if name in OWN_SETTINGS or name.startswith(OWN_PREFIXES):
        return f"{name} is one of aiqueue's own settings, not a provider key"
    allowed = settings.AIQUEUE_PROVIDER_KEY_VARS
    if allowed:
        if name not in allowed:
            return f"{name} is not one of AIQUEUE_PROVIDER_KEY_VARS ({', '.join(allowed)})"
    elif not KEY_VAR_RE.fullmatch(name):
        return (
            f"{name} does not look like a provider key: the name must end in _API_KEY "
            "(capital letters, digits and underscores), or be listed in "
            "AIQUEUE_PROVIDER_KEY_VARS"
        )
    return ""


def validate_key_var(name: str) -> None:
    if problem := refusal(name):
        raise ValidationError(f"{problem}.")
