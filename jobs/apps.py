from django.apps import AppConfig


class JobsConfig(AppConfig):
    name = "jobs"
    verbose_name = "Jobs"

    def ready(self) -> None:
        # Signal receivers: a saved budget releases held jobs; webhooks hear of a job's end;
        # a budget's alert is told (budget_alerts);
        # attempts settle budgets; the live
        # list updates' batcher registers itself with jobs.live.
        from jobs import budget_alerts, live_batch, services, webhooks  # noqa: F401
        from jobs.flow import budgets  # noqa: F401
