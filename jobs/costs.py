"""The one token and cost rule: the most one provider call can cost, known before it is made.

Byte-level BPE tokenizers (OpenAI's, Anthropic's, Llama's and the other open models') never make
more tokens of a text than it has UTF-8 bytes: every token stands for at least one byte. So
the UTF-8 bytes of everything the model reads, plus an allowance per message for the chat
template's role markers, plus the request's output limit, is a true upper bound of a call's
tokens in any language or script. Budgets reserve it, the tpm limit is charged with it, and a
call whose outcome is lost (cut off, cancelled) is charged at it.

The rule of thumb it replaces, ceil(characters / 4), is about right for English and far too
low elsewhere: real token counts divided by it were 1.42 for code, 2.43 for numbers, 3.78 for
Japanese, 4.33 for Chinese and 9.29 for emoji (bench/cost.py prints both side by side). The
bound overstates English about fourfold instead; the reservation is given back as soon as the
call settles at the usage the provider reports, so the overstatement costs headroom for the
length of a call, never money.

Pure: no database, no settings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from jobs.providers.base import SCHEMA_INSTRUCTION, CompletionRequest

if TYPE_CHECKING:
    from jobs.models import ModelPrice

# Chat templates wrap each message in a few special tokens (role, start, end); be generous.
MESSAGE_OVERHEAD_TOKENS = 8
# Per request: the reply primer and whatever a provider adds around a response format.
REQUEST_OVERHEAD_TOKENS = 32
BASIS = (
    "input: at most one token per UTF-8 byte of the prompts (what byte-level BPE tokenizers "
    f"allow) + {MESSAGE_OVERHEAD_TOKENS} per message + {REQUEST_OVERHEAD_TOKENS} per request; "
    "output: the workload's max output tokens"
)


def text_tokens(text: str) -> int:
    """The most tokens `text` can be: its UTF-8 bytes."""
    return len(text.encode("utf-8"))


def schema_text(schema: dict[str, Any]) -> str:
    # json.dumps' default escapes non-ASCII, never fewer bytes than the text it stands for.
    return json.dumps(schema)


def input_tokens(system: str, user: str, schema: dict[str, Any] | None = None) -> int:
    """The most input tokens of a call with these prompts (and response schema)."""
    messages = 2 if system else 1
    tokens = text_tokens(system) + text_tokens(user)
    tokens += messages * MESSAGE_OVERHEAD_TOKENS + REQUEST_OVERHEAD_TOKENS
    if schema is not None:
        tokens += text_tokens(SCHEMA_INSTRUCTION) + text_tokens(schema_text(schema))
    return tokens


def request_input_tokens(request: CompletionRequest) -> int:
    return input_tokens(request.system_prompt, request.user_prompt, request.json_schema)


@dataclass(frozen=True)
class CallBound:
    """The most tokens one call can use each way, and what that costs at a model's price."""

    tokens_in: int
    tokens_out: int

    def cost(self, price: ModelPrice) -> Decimal:
        return price.cost(self.tokens_in, self.tokens_out)


def call_bound(request: CompletionRequest) -> CallBound:
    return CallBound(request_input_tokens(request), request.max_output_tokens)
