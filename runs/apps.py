from django.apps import AppConfig


class RunsConfig(AppConfig):
    name = "runs"
    verbose_name = "Runs"

    def ready(self) -> None:
        # Signal receivers: a settled chunk moves its document on (jobs.signals); a cap raised
        # or removed wakes the jobs that now fit (post_save of Provider and Workload).
        from runs import capacity_waiters, mapreduce  # noqa: F401
