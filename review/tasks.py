"""RQ entry points of the review app (thin: the work is in review.digest)."""

from __future__ import annotations

from review import digest


def send_digest() -> int:
    return digest.send()
