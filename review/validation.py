"""Is an output acceptable for its workload? Model output and a reviewer's corrected output
pass the same checks: both go through `jobs.kinds.parse` (labels for classify, JSON Schema for
extract, length limits for text kinds), so there is one definition of "valid".
"""

from __future__ import annotations

from typing import Any

from jobs import kinds
from jobs.models import Workload
from jobs.providers.base import Completion


class InvalidOutput(ValueError):
    """The output does not satisfy the workload's contract; the message says why (safe to show)."""


def validate_output(workload: Workload, text: str) -> tuple[str, Any]:
    """Return (normalized text, parsed data) for an acceptable output, else raise InvalidOutput.

    Confidence plays no part here: a human's text has none, and a model's is judged by the
    review rules separately.
    """
    verdict = kinds.parse(workload, Completion(text=text, tokens_in=0, tokens_out=0))
    if verdict.problem:
        raise InvalidOutput(verdict.problem[:1:].upper() + verdict.problem[1:])
    return verdict.output_text, verdict.output_data
