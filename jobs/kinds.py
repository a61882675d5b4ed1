"""What each workload kind sends to the model and how its answer is judged.

`build_request(job)` turns a job into a CompletionRequest; `parse(workload, completion)` judges
the answer as a `Verdict` (runs.outcomes acts on it: finish, repair, escalate):

| kind      | request                                   | output                                  |
|-----------|-------------------------------------------|-----------------------------------------|
| classify  | a "Labels: a, b" line + logprobs          | label(s) from the set; confidence from  |
|           |                                           | the first token's logprob               |
| extract   | the workload's JSON Schema as the         | JSON that validates (jsonschema); one   |
|           | response format                           | repair call with the validation error   |
| summarize | streamed free text, length instructions   | free text within min/max characters     |
| generate  |                                           |                                         |
| document  | map: one call per chunk (child jobs);     | like summarize (runs/mapreduce.py)     |
|           | reduce: one call over the chunk results   |                                         |

Confidence, for the review rule "confidence below" (`confidence_from`, the workload's
`confidence_source`): classify from its label token's probability; summarize, generate and
extract from the answer's token logprobs (the geometric mean of its tokens' probabilities)
where the provider gives them (OpenAI-compatible), else summarize and generate self-rate (a
last line "Confidence: 0.8", asked for and stripped) and extract reads a top-level "confidence"
of its JSON answer if its schema asks for one. Documents have none.

Model output is untrusted: it is parsed, never executed, and stored as data.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import jsonschema
from jsonschema.exceptions import best_match

from jobs import inputs
from jobs.models import Job, Provider, Workload
from jobs.providers.base import Completion, CompletionRequest, structured_confidence

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


class FieldsError(inputs.InvalidInput):
    """Named fields refused: which are missing (or blank), which the template does not have."""

    def __init__(self, workload: Workload, missing: list[str], unknown: list[str]) -> None:
        self.missing, self.unknown = missing, unknown
        problems = []
        if missing:
            problems.append(f"missing or empty: {', '.join(missing)}")
        if unknown:
            problems.append(f"unknown: {', '.join(unknown)}")
        expected = ", ".join(workload.input_fields)
        super().__init__(f"Fields of {workload.name!r} ({expected}): {'; '.join(problems)}.")


def named_input(workload: Workload, values: dict[str, str]) -> tuple[str, dict[str, str]]:
    """The one reading of a job's named fields, wherever they come from (the form's
    `field_<name>` inputs, the API's `fields`, a batch row through its column mapping): every
    field of the workload's template present and not blank, no other. Returns the job's
    (input_text, input_data); raises FieldsError. The text's own limits (length, what a database
    can store) are services.do_submit_job's, for every way in."""
    names = workload.input_fields
    missing = [name for name in names if not str(values.get(name) or "").strip()]
    unknown = sorted(set(values) - set(names))
    if missing or unknown:
        raise FieldsError(workload, missing, unknown)
    data = {name: str(values[name]) for name in names}
    return render_input_text(data), data


SELF_RATED_KINDS = frozenset({Kind.SUMMARIZE, Kind.GENERATE})


def confidence_from(workload: Workload) -> str:
    """Where a job's confidence comes from: "logprobs", "self_rated" or "" (none)."""
    source = workload.confidence_source
    Source = Workload.ConfidenceSource
    if source == Source.OFF or workload.kind == Kind.DOCUMENT:
        return ""
    # Judging a reviewer's text (review.validation) may need no provider at all.
    provider = workload.provider if workload.provider_id else None
    gives_logprobs = provider is None or provider.kind != Provider.Kind.ANTHROPIC
    if workload.kind == Kind.CLASSIFY or source == Source.LOGPROBS:
        return "logprobs" if gives_logprobs else ""
    if source == Source.AUTO and gives_logprobs:
        return "logprobs"
    # Self-rated, chosen or for want of logprobs. An extract answer is JSON: it rates itself
    # only through its schema (a top-level "confidence", read by parse_json).
    return "self_rated"


def without_rating(workload: Workload, text: str) -> str:
    """Text as people see it: a self-rated answer's last line ("Confidence: 0.8") is the
    model's note to aiqueue, not output (parse_text strips it from the result; jobs.live from
    the text streamed so far)."""
    if workload.kind in SELF_RATED_KINDS and confidence_from(workload) == "self_rated":
        match = CONFIDENCE_LINE_RE.search(text.rstrip())
        if match:
            return text[: match.start()].rstrip()
    return text


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
        if workload.kind in SELF_RATED_KINDS and confidence_from(workload) == "self_rated":
            system += (
                "\nOn a last line of its own, rate your confidence in the answer as "
                "'Confidence: <number between 0 and 1>'."
            )
    return system.strip()


def response_schema(workload: Workload) -> dict[str, Any] | None:
    """The JSON Schema the answer is asked to follow: an extract workload's, else none."""
    if workload.kind != Kind.EXTRACT:
        return None
    return workload.output_schema or {"type": "object"}


def build_request(job: Job) -> CompletionRequest:
    """The provider request for one run of `job` (the runner records the template version
    it uses: `services.do_note_template_version`)."""
    workload: Workload = job.workload
    request = CompletionRequest(
        model=workload.model,
        system_prompt=system_prompt_for(workload),
        user_prompt=workload.render_prompt(prompt_values(job)),
        max_output_tokens=workload.max_output_tokens,
        temperature=workload.temperature,
    )
    request.logprobs = confidence_from(workload) == "logprobs"
    if workload.kind == Kind.CLASSIFY:
        request.labels = list(workload.labels or [])
    elif workload.kind == Kind.EXTRACT:
        request.json_schema = response_schema(workload)
    elif workload.kind in (Kind.SUMMARIZE, Kind.GENERATE):
        request.stream = True
    elif workload.kind == Kind.DOCUMENT and job.parent_id is None:
        # The reduce call of a document: its input is the chunk results.
        combined = combined_chunk_outputs(job)
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
        source = confidence_from(workload) if verdict.ok else ""  # none for what is not it
        if source == "logprobs":
            verdict.confidence = completion.confidence
        elif source == "self_rated":
            verdict.confidence = structured_confidence(completion.text)
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
        # Not JSON, nested deeper than anything here walks, or its own escapes spell text no
        # column can hold (a lone "\ud800"): invalid output, repaired or shown to a human.
        data = inputs.load_json(body, "the answer")
    except inputs.InvalidInput as exc:
        verdict.problem, verdict.reason = str(exc), "invalid_output"
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
    source = confidence_from(workload)
    confidence = completion.confidence if source == "logprobs" else None
    if source == "self_rated":
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


def combined_chunk_outputs(job: Job) -> str:
    """A document's reduce input: every chunk's final answer under its "Part N:" heading."""
    parts = []
    for child in job.children.order_by("chunk_index"):
        parts.append(f"Part {child.chunk_index + 1}:\n{child.final_output.strip()}")
    return "\n\n".join(parts)
