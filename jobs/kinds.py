"""What each workload kind sends to the model and how its answer is judged.

`build_request(job)` turns a job into a CompletionRequest; `handle_output(job, token, ...)`
parses and validates the answer and either finishes the job or escalates it to review:

| kind      | request                                   | output                                  |
|-----------|-------------------------------------------|-----------------------------------------|
| classify  | a "Labels: a, b" line + logprobs          | label(s) from the set; confidence from  |
|           |                                           | the first token's logprob               |
| extract   | the workload's JSON Schema as the         | JSON that validates (jsonschema); one   |
|           | response format                           | repair call with the validation error   |
| summarize | streamed free text, length instructions   | free text within min/max characters;    |
| generate  |                                           | optional self-rated "Confidence: 0.8"   |
| document  | map: one call per chunk (child jobs);     | like summarize (see jobs/documents.py)  |
|           | reduce: one call over the chunk results   |                                         |

Model output is untrusted: it is parsed, never executed, and stored as data.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import uuid
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import jsonschema
from jsonschema.exceptions import best_match

from jobs import services
from jobs.models import Job, Workload
from jobs.providers.base import Completion, CompletionRequest, ProviderError
from review import rules as review_rules
from review import services as review_services

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger(__name__)

Kind = Workload.Kind
TEXT_KINDS = frozenset({Kind.SUMMARIZE, Kind.GENERATE, Kind.DOCUMENT})
LABELS_LINE_RE = re.compile(r"^[ \t]*labels[ \t]*:", re.IGNORECASE | re.MULTILINE)
CONFIDENCE_LINE_RE = re.compile(
    r"\n?[ \t]*\**confidence\**[ \t]*[:=][ \t]*([01](?:\.\d+)?|\.\d+)[ \t]*%?[ \t]*$",
    re.IGNORECASE,
)
FENCE_RE = re.compile(r"^\s*```[a-zA-Z]*\s*\n(.*?)\n\s*```\s*$", re.DOTALL)
DEFAULT_REDUCE_PROMPT = (
    "Below are results for consecutive parts of one document. Combine them into one "
    "coherent answer for the whole document.\n\n{input}"
)
REPAIR_PROMPT = (
    "\n\nYour previous answer was:\n{answer}\n\nIt is not valid: {error}\n"
    "Answer again with corrected JSON only."
)


@dataclass
class Verdict:
    """A parsed answer. `problem` is set when it cannot be accepted as it is; `reason` then
    names the review reason (invalid_output or low_confidence)."""

    output_text: str
    output_data: Any = None
    confidence: float | None = None
    problem: str = ""
    reason: str = ""

    @property
    def ok(self) -> bool:
        return not self.problem


# --------------------------------------------------------------------------- workload checks


def workload_errors(workload: Workload) -> dict[str, str]:
    """Configuration errors per field (Workload.clean and the admin show them)."""
    errors: dict[str, str] = {}
    labels = workload.labels
    if not isinstance(labels, list) or not all(isinstance(x, str) and x.strip() for x in labels):
        errors["labels"] = 'Labels must be a JSON list of non-empty strings, e.g. ["a", "b"].'
    elif workload.kind == Kind.CLASSIFY and len(labels) < 2:
        errors["labels"] = "A classify workload needs at least two labels."
    if workload.kind == Kind.EXTRACT:
        schema = workload.output_schema
        if not isinstance(schema, dict) or not schema:
            errors["output_schema"] = "An extract workload needs a JSON Schema (a JSON object)."
        else:
            try:
                jsonschema.validators.validator_for(schema).check_schema(schema)
            except jsonschema.SchemaError as exc:
                errors["output_schema"] = f"Not a valid JSON Schema: {exc.message}"
    if (
        workload.min_output_chars is not None
        and workload.max_output_chars is not None
        and workload.min_output_chars > workload.max_output_chars
    ):
        errors["max_output_chars"] = "The maximum is below the minimum."
    if not isinstance(workload.sample_input, dict):
        errors["sample_input"] = 'Sample input must be a JSON object: {"field": "value"}.'
    return errors


# --------------------------------------------------------------------------- requests


def prompt_values(job: Job) -> dict[str, str]:
    """The template's field values for this job: {input} is the input text, named fields come
    from input_data (a document's input_data is metadata, not fields)."""
    values = {"input": job.input_text}
    if job.workload.kind != Kind.DOCUMENT and isinstance(job.input_data, dict):
        values.update({k: "" if v is None else str(v) for k, v in job.input_data.items()})
    return values


def render_input_text(fields: dict[str, str]) -> str:
    """The human-readable input of a job with named fields (shown on pages, searchable)."""
    if list(fields) == ["input"]:
        return fields["input"]
    return "\n".join(f"{name}: {value}" for name, value in fields.items())


def system_prompt_for(workload: Workload) -> str:
    system = workload.system_prompt
    if workload.kind == Kind.CLASSIFY:
        if not LABELS_LINE_RE.search(system + "\n" + workload.prompt_template):
            system = f"{system}\nLabels: {', '.join(workload.labels)}".strip()
        if workload.multi_label:
            system += "\nAnswer with every label that applies, separated by commas."
        else:
            system += "\nAnswer with exactly one label and nothing else."
    elif workload.kind in TEXT_KINDS:
        limits = []
        if workload.max_output_chars:
            limits.append(f"at most {workload.max_output_chars} characters")
        if workload.min_output_chars:
            limits.append(f"at least {workload.min_output_chars} characters")
        if limits:
            system += f"\nAnswer in {' and '.join(limits)}."
        if workload.self_rated_confidence and workload.kind != Kind.DOCUMENT:
            system += (
                "\nOn a last line of its own, rate your confidence in the answer as "
                "'Confidence: <number between 0 and 1>'."
            )
    return system.strip()


def build_request(job: Job) -> CompletionRequest:
    """The provider request for one run of `job`, and record the template version it uses."""
    workload: Workload = job.workload
    if job.template_version != workload.template_version:
        Job.objects.filter(pk=job.pk).update(template_version=workload.template_version)
        job.template_version = workload.template_version
    request = CompletionRequest(
        model=workload.model,
        system_prompt=system_prompt_for(workload),
        user_prompt=workload.render_prompt(prompt_values(job)),
        max_output_tokens=workload.max_output_tokens,
        temperature=workload.temperature,
    )
    if workload.kind == Kind.CLASSIFY:
        request.labels = list(workload.labels or [])
    elif workload.kind == Kind.EXTRACT:
        request.json_schema = workload.output_schema or {"type": "object"}
    elif workload.kind in (Kind.SUMMARIZE, Kind.GENERATE):
        request.stream = True
    elif workload.kind == Kind.DOCUMENT and job.parent_id is None:
        # The reduce call of a document: its input is the chunk results (jobs.documents).
        from jobs import documents

        combined = documents.combined_chunk_outputs(job)
        template = workload.reduce_prompt or DEFAULT_REDUCE_PROMPT
        request.user_prompt = template.replace("{input}", combined)
        request.stream = True
    return request


# --------------------------------------------------------------------------- parsing


def parse(workload: Workload, completion: Completion) -> Verdict:
    if workload.kind == Kind.CLASSIFY:
        verdict = parse_labels(workload, completion)
    elif workload.kind == Kind.EXTRACT:
        verdict = parse_json(workload, completion.text)
    else:
        verdict = parse_text(workload, completion)
    threshold = workload.confidence_threshold
    if (
        verdict.ok
        and threshold is not None
        and verdict.confidence is not None
        and verdict.confidence < threshold
    ):
        verdict.problem = f"confidence {verdict.confidence:.3f} is below {threshold:g}"
        verdict.reason = "low_confidence"
    return verdict


def _clean_label(raw: str) -> str:
    return raw.strip().strip("\"'`*.").strip()


def parse_labels(workload: Workload, completion: Completion) -> Verdict:
    allowed = {label.lower(): label for label in workload.labels or []}
    text = completion.text.strip()
    raw = re.split(r"[,;\n]", text) if workload.multi_label else [text]
    found = [_clean_label(part) for part in raw if _clean_label(part)]
    labels = list(dict.fromkeys(allowed.get(label.lower(), label) for label in found))
    verdict = Verdict(
        output_text=", ".join(labels),
        output_data={"labels": labels},
        confidence=completion.confidence,
    )
    unknown = [label for label in labels if label.lower() not in allowed]
    if not labels:
        verdict.problem, verdict.reason = "the answer holds no label", "invalid_output"
    elif unknown:
        verdict.problem = f"label {unknown[0]!r} is not one of: {', '.join(workload.labels)}"
        verdict.reason = "invalid_output"
    elif not workload.multi_label and len(labels) > 1:
        verdict.problem, verdict.reason = "expected exactly one label", "invalid_output"
    return verdict


def parse_json(workload: Workload, text: str) -> Verdict:
    body = text.strip()
    fenced = FENCE_RE.match(body)
    if fenced:
        body = fenced.group(1)
    verdict = Verdict(output_text=text)
    try:
        data = json.loads(body)
    except ValueError as exc:
        verdict.problem, verdict.reason = f"not valid JSON: {exc}", "invalid_output"
        return verdict
    verdict.output_data = data
    verdict.output_text = json.dumps(data, indent=2, ensure_ascii=False)
    schema = workload.output_schema or {"type": "object"}
    validator_class = jsonschema.validators.validator_for(schema)
    validator = validator_class(schema, format_checker=validator_class.FORMAT_CHECKER)
    error = best_match(validator.iter_errors(data))
    if error is not None:
        where = "/".join(str(part) for part in error.absolute_path) or "(root)"
        verdict.problem = f"does not match the schema at {where}: {error.message}"
        verdict.reason = "invalid_output"
    return verdict


def parse_text(workload: Workload, completion: Completion) -> Verdict:
    text = completion.text.strip()
    confidence = None
    if workload.self_rated_confidence:
        match = CONFIDENCE_LINE_RE.search(text)
        if match:
            value = float(match.group(1))
            confidence = value / 100 if value > 1 else value
            text = text[: match.start()].rstrip()
    verdict = Verdict(output_text=text, confidence=confidence)
    if not text:
        verdict.problem = "the answer is empty"
    elif workload.min_output_chars and len(text) < workload.min_output_chars:
        verdict.problem = (
            f"the answer has {len(text)} characters, fewer than {workload.min_output_chars}"
        )
    elif workload.max_output_chars and len(text) > workload.max_output_chars:
        verdict.problem = (
            f"the answer has {len(text)} characters, more than {workload.max_output_chars}"
        )
    if verdict.problem:
        verdict.reason = "invalid_output"
    return verdict


# --------------------------------------------------------------------------- outcomes


def handle_output(
    job: Job,
    token: uuid.UUID,
    completion: Completion,
    request: CompletionRequest,
    *,
    call: Callable[[Job, CompletionRequest], Completion],
) -> None:
    """Judge the answer; finish the job, repair once (extract), or escalate to review.

    `call` is the runner's ledgered provider call through the retry layer, so a repair is an
    Attempt like any other and a transient failure of it is retried.
    """
    workload = job.workload
    verdict = parse(workload, completion)
    evidence: dict[str, Any] = {}
    if not verdict.ok and workload.kind == Kind.EXTRACT and verdict.reason == "invalid_output":
        evidence = {"first_answer": completion.text[:4000], "first_error": verdict.problem}
        repair = dataclasses.replace(
            request,
            user_prompt=request.user_prompt
            + REPAIR_PROMPT.format(answer=completion.text[:4000], error=verdict.problem),
        )
        services.do_set_progress(job, stage="repairing", message=verdict.problem, token=token)
        try:
            completion = call(job, repair)
        except ProviderError as exc:
            # Retried already (or the job's attempts are used up): a reviewer gets the first
            # answer and its problem, and can fix it by hand.
            evidence["repair_error"] = exc.message[:500]
            escalate(job, token, verdict, {**evidence, "problem": verdict.problem})
            return
        verdict = parse(workload, completion)
        evidence["repaired"] = verdict.ok
    if verdict.ok:
        finish(job, token, verdict)
    else:
        escalate(job, token, verdict, {**evidence, "problem": verdict.problem})


def _store_output(job: Job, token: uuid.UUID, verdict: Verdict) -> None:
    # Written before the status change so the finished (or escalated) job is never seen
    # without its parsed output; the run token keeps a stale run from writing.
    if verdict.output_data is None and job.output_data is None:
        return  # nothing stored, nothing to store (read when the run began)
    Job.objects.filter(pk=job.pk, run_token=token).update(output_data=verdict.output_data)
    job.output_data = verdict.output_data


def finish(job: Job, token: uuid.UUID, verdict: Verdict) -> None:
    """A valid answer: the review rules (sampling for QA) may still send it to a human."""
    _store_output(job, token, verdict)
    accepted = Completion(
        text=verdict.output_text, tokens_in=0, tokens_out=0, confidence=verdict.confidence
    )
    escalation = review_rules.rule_for_output(job, accepted)
    if escalation is not None:
        reason, evidence = escalation
        _escalate(job, token, verdict, reason, evidence)
        return
    services.do_finish_run(
        job, token, output_text=verdict.output_text, confidence=verdict.confidence
    )
    log.info("job=%s succeeded", job.code)
    after_run(job)


def escalate(job: Job, token: uuid.UUID, verdict: Verdict, evidence: dict[str, Any]) -> None:
    """Send the job to the review inbox with its output kept for the reviewer."""
    _store_output(job, token, verdict)
    _escalate(job, token, verdict, verdict.reason, evidence)


def _escalate(
    job: Job, token: uuid.UUID, verdict: Verdict, reason: str, evidence: dict[str, Any]
) -> None:
    review_services.do_escalate(
        job,
        token,
        reason=reason,
        evidence=evidence,
        output_text=verdict.output_text,
        confidence=verdict.confidence,
    )
    log.info("job=%s escalated (%s): %s", job.code, reason, verdict.problem)
    after_run(job)


def after_run(job: Job) -> None:
    """A run ended (finished, escalated or failed), or review settled the job: let the job's
    document and batch move on."""
    if job.parent_id is not None:
        from jobs import documents

        documents.on_chunk_settled(job)
    if job.batch_id is not None:
        from batches import services as batch_services

        batch_services.on_job_settled(job)


# --------------------------------------------------------------------------- cost estimates


def estimate_tokens(chars: int) -> int:
    # ~4 characters per token: the usual rule of thumb for English with OpenAI-style BPE.
    return max(1, math.ceil(chars / 4))


def estimate_cost(workload: Workload, prompt_chars: int, *, price=None) -> Decimal | None:
    """Worst-case cost of one job whose user message has `prompt_chars` characters (None
    when the model has no price). Extract counts its repair call, which resends the prompt."""
    price = price if price is not None else workload.provider.price_for(workload.model)
    if price is None:
        return None
    tokens_in = estimate_tokens(prompt_chars + len(system_prompt_for(workload)))
    cost = price.cost(tokens_in, workload.max_output_tokens)
    if workload.kind == Kind.EXTRACT:
        cost += price.cost(tokens_in + workload.max_output_tokens, workload.max_output_tokens)
    return cost
