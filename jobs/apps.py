from django.apps import AppConfig


class JobsConfig(AppConfig):
    name = "jobs"
    verbose_name = "Jobs"

    def ready(self) -> None:
        # Signal receivers: attempts settle budgets; a saved budget releases held jobs.
        from jobs.flow import budgets  # noqa: F401
