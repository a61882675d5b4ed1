from django.apps import AppConfig


class ReviewConfig(AppConfig):
    name = "review"
    verbose_name = "Review inbox"

    def ready(self) -> None:
        # Signal receivers: a stopped job's inbox items are withdrawn (jobs.signals); a
        # replayed job's open items close (jobs.replay).
        from review import receivers, services  # noqa: F401
