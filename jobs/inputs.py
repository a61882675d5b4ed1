"""What the app accepts from outside, checked once at the edge (API, forms, uploaded files).

Each of these got past the old checks and failed later, deep inside, as a 500:

- text that cannot be encoded as UTF-8: a JSON `"\\ud800"` escape decodes to a lone surrogate,
  which SQLite and PostgreSQL refuse (UnicodeEncodeError), and which no page can be encoded
  with; NUL characters, which PostgreSQL refuses in text and in jsonb;
- JSON nested deeper than anything the app reads (100,000 `[` raised RecursionError);
- times that exist in their own offset but not in UTC (`9999-12-31T23:59:59-12:00`), or are so
  far off that adding a few hours, or showing them in the site's time zone, overflows;
- ids the database cannot hold (SQLite: at most 2**63 - 1).

Every check raises InvalidInput with a message fit to show to whoever sent it.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

from django.utils import timezone

# Nothing the app reads nests deeper than 2 (a body, its `fields` object); a file's JSON line
# may hold nested values, which become text. 32 is far above either and far below recursion.
MAX_JSON_DEPTH = 32
# Primary keys are 64-bit signed integers on every database the app runs on.
MAX_ID = 2**63 - 1
# A start time or deadline further away than this is a typo or a probe, not a plan.
MAX_TIME_DISTANCE = timedelta(days=100 * 366)
# The only str values that cannot be encoded as UTF-8.
SURROGATE_RE = re.compile("[\ud800-\udfff]")


class InvalidInput(ValueError):
    """Refused input; the message names what was wrong and is safe to show."""


def text_problem(value: str) -> str:
    """Why `value` cannot be stored or shown ('' if it can)."""
    if "\x00" in value:
        return "holds a NUL character"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (
            f"holds U+{ord(value[exc.start]):04X}, a lone surrogate that is not text "
            "(it cannot be encoded as UTF-8)"
        )
    return ""


def check_text(value: str, label: str) -> str:
    if problem := text_problem(value):
        raise InvalidInput(f"{label} {problem}.")
    return value


def scrub(value: str) -> str:
    """`value` with anything that cannot be encoded as UTF-8 replaced by U+FFFD: for showing
    text that was stored before it was checked."""
    if value.isascii():  # O(1): CPython keeps the flag
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return SURROGATE_RE.sub("\ufffd", value)
    return value


def check_json(value: Any, label: str = "The JSON", *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Walk a parsed JSON value (iteratively: a deep one must not recurse here either): every
    key and string must be text, and it may nest at most `max_depth` levels."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            check_text(item, f"{label} has a string that")
        elif isinstance(item, dict | list):
            if depth > max_depth:
                raise InvalidInput(f"{label} nests deeper than {max_depth} levels.")
            if isinstance(item, dict):
                for key, child in item.items():
                    check_text(key, f"{label} has a key that")
                    stack.append((child, depth + 1))
            else:
                stack.extend((child, depth + 1) for child in item)
    return value


def load_json(data: bytes | str, label: str = "The body") -> Any:
    """Parse JSON from outside: InvalidInput if it is not JSON, nests too deep, or holds text
    that is not text."""
    try:
        value = json.loads(data)
    except RecursionError:
        raise InvalidInput(f"{label} nests deeper than {MAX_JSON_DEPTH} levels.") from None
    except ValueError as exc:  # JSONDecodeError, and bytes that are not UTF-8
        raise InvalidInput(f"{label} is not valid JSON: {exc}.") from None
    return check_json(value, label)


def check_time(value: datetime, label: str) -> datetime:
    """An aware time (a naive one is read in the site's time zone) that exists in UTC and lies
    within MAX_TIME_DISTANCE of now."""
    try:
        if timezone.is_naive(value):
            value = timezone.make_aware(value)
        in_utc = value.astimezone(UTC)
        distance = abs(in_utc - timezone.now())
    except (OverflowError, ValueError):
        raise InvalidInput(f"{label} is out of range.") from None
    if distance > MAX_TIME_DISTANCE:
        years = MAX_TIME_DISTANCE.days // 366
        raise InvalidInput(f"{label} is out of range: it must be within {years} years of now.")
    return in_utc


def parse_id(raw: object, label: str = "The id") -> int:
    """A database id from outside: a whole number from 1 to MAX_ID (not a bool, not text
    with signs or spaces)."""
    if isinstance(raw, bool):
        raise InvalidInput(f"{label} must be a whole number, not {json.dumps(raw)}.")
    if isinstance(raw, int):
        value = raw
    elif isinstance(raw, str) and raw.isascii() and raw.isdigit():
        # Python refuses to read more than 4,300 digits; no id has more than 19.
        value = int(raw) if len(raw) <= len(str(MAX_ID)) else MAX_ID + 1
    else:
        raise InvalidInput(f"{label} must be a whole number.")
    if not 1 <= value <= MAX_ID:
        raise InvalidInput(f"{label} is out of range (1 to {MAX_ID}).")
    return value
