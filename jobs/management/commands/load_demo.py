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
            _, was_created = Workload.objects.get_or_create(
                name=name, defaults={**spec, "provider": provider, "model": DEMO_MODEL}
            )
            created += was_created
        self.stdout.write(f"demo data ready ({created} workload(s) created)")
