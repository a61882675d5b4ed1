from django.apps import AppConfig


class BatchesConfig(AppConfig):
    name = "batches"
    verbose_name = "Batches"

    def ready(self) -> None:
        # Signal receivers (jobs.signals): a settled job refills its batch's wave.
        from batches import services  # noqa: F401
