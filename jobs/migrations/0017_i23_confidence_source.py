"""Workload.self_rated_confidence becomes Workload.confidence_source.

New workloads get "auto" (a confidence for every kind). Existing ones keep what they did: a
self-rated one stays self-rated, a classify one keeps its label's probability ("auto" is that),
and the others had no confidence ("off"), so no prompt or request changes under them.
"""

from django.db import migrations, models


def carry_over(apps, schema_editor):
    Workload = apps.get_model("jobs", "Workload")
    Workload.objects.filter(self_rated_confidence=True).update(confidence_source="self_rated")
    Workload.objects.filter(self_rated_confidence=False).exclude(kind="classify").update(
        confidence_source="off"
    )


def carry_back(apps, schema_editor):
    Workload = apps.get_model("jobs", "Workload")
    Workload.objects.filter(confidence_source="self_rated").update(self_rated_confidence=True)


class Migration(migrations.Migration):
    dependencies = [
        ("jobs", "0016_i23_scoped_budgets_and_alerts"),
    ]

    operations = [
        migrations.AddField(
            model_name="workload",
            name="confidence_source",
            field=models.CharField(
                choices=[
                    ("auto", "Automatic: logprobs where the provider gives them, else self-rated"),
                    ("logprobs", "Token logprobs (OpenAI-compatible providers)"),
                    ("self_rated", "Self-rated: the model ends with 'Confidence: 0..1'"),
                    ("off", "None"),
                ],
                default="auto",
                help_text="Where a job's confidence comes from, for the review rule "
                "'confidence below' (jobs.kinds.confidence_from).",
                max_length=20,
            ),
        ),
        migrations.RunPython(carry_over, carry_back),
        migrations.RemoveField(
            model_name="workload",
            name="self_rated_confidence",
        ),
    ]
