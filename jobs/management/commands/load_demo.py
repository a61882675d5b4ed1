"""Load the demo provider (the built-in simulator) and one workload of each kind. Idempotent:
existing rows with the same names are left as an operator may have edited them."""

from __future__ import annotations

from decimal import Decimal

from django.core.management.base import BaseCommand
from django.db import transaction

from jobs.models import ModelPrice, Provider, Workload

DEMO_MODEL = "sim-small"

DEMO_WORKLOADS = [
    {
        # Named template fields: the form shows one input per field, and a CSV batch maps one
        # column to each (columns named "product" and "review" are mapped automatically).
        "name": "Product review sentiment",
        "kind": Workload.Kind.CLASSIFY,
        "description": "Tag customer reviews by sentiment; built for CSV batches.",
        "system_prompt": "Classify the sentiment of the product review.",
        "prompt_template": "Product: {product}\nReview: {review}",
        "labels": ["positive", "neutral", "negative"],
        "max_output_tokens": 5,
        "confidence_threshold": 0.5,
        "default_priority": "low",
        "sample_input": {"product": "Kettle", "review": "Boils fast, but the lid rattles."},
    },
    {
        "name": "Contract digest",
        "kind": Workload.Kind.DOCUMENT,
        "description": "Upload a contract (PDF, .docx, text): each part is summarized, then "
        "combined into one digest.",
        "system_prompt": "You summarize parts of legal documents for busy staff.",
        "prompt_template": "Summarize the obligations, dates and amounts in this part:\n\n{input}",
        "reduce_prompt": "Combine these part summaries into one digest of the whole contract, "
        "with a bullet list of obligations and deadlines:\n\n{input}",
        "chunk_chars": 3000,
        "max_output_tokens": 400,
        "sample_input": {"input": "1. The supplier delivers 200 units by 1 March 2025."},
    },
    {
        "name": "Support ticket triage",
        "kind": Workload.Kind.CLASSIFY,
        "description": "Route a support ticket to the right team.",
        "system_prompt": "Classify the support ticket. Answer with one label only.\n"
        "Labels: billing, bug, feature_request, account, other",
        "labels": ["billing", "bug", "feature_request", "account", "other"],
        "max_output_tokens": 5,
        "default_priority": "high",
    },
    {
        "name": "Invoice field extraction",
        "kind": Workload.Kind.EXTRACT,
        "description": "Pull vendor, total and due date out of invoice text.",
        "system_prompt": "Extract the invoice fields as JSON.",
        "max_output_tokens": 300,
        "output_schema": {
            "type": "object",
            "properties": {
                "vendor": {"type": "string"},
                "total": {"type": "number", "minimum": 0},
                "currency": {"type": "string", "enum": ["EUR", "USD", "GBP"]},
                "due_date": {"type": "string", "format": "date"},
            },
            "required": ["vendor", "total", "due_date"],
            "additionalProperties": False,
        },
        "sample_input": {"input": "ACME GmbH invoice 1042: total 1,250.00 EUR, due 2025-07-01."},
    },
    {
        "name": "Meeting notes summary",
        "kind": Workload.Kind.SUMMARIZE,
        "description": "Summarize meeting notes into a short paragraph.",
        "system_prompt": "Summarize the text in at most five sentences.",
        "max_output_tokens": 300,
    },
    {
        "name": "Product description writer",
        "kind": Workload.Kind.GENERATE,
        "description": "Write a product description from a few facts.",
        "system_prompt": "Write an engaging product description.",
        "max_output_tokens": 400,
        "default_priority": "low",
    },
]


class Command(BaseCommand):
    help = "Create the simulator provider and demo workloads (idempotent)."

    @transaction.atomic
    def handle(self, *args, **options) -> None:
        provider, _ = Provider.objects.get_or_create(
            name="Simulator",
            defaults={"kind": Provider.Kind.SIMULATED, "read_timeout_s": 30.0},
        )
        ModelPrice.objects.get_or_create(
            provider=provider,
            model=DEMO_MODEL,
            defaults={"input_per_mtok": Decimal("0.50"), "output_per_mtok": Decimal("1.50")},
        )
        created = 0
        for spec in DEMO_WORKLOADS:
            spec = dict(spec)
            name = spec.pop("name")
            workload, was_created = Workload.objects.get_or_create(
                name=name, defaults={**spec, "provider": provider, "model": DEMO_MODEL}
            )
            created += was_created
            if not was_created and spec.get("output_schema") and not workload.output_schema:
                # A demo database from before extract schemas existed: give it the schema.
                workload.output_schema = spec["output_schema"]
                workload.save(update_fields=["output_schema", "updated_at"])
        self.stdout.write(f"demo data ready ({created} workload(s) created)")
