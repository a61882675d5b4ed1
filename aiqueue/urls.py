from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from jobs import api, health, metrics, views

# The admin is where operators set workloads, providers, budgets and limits: name it as such.
admin.site.site_header = "aiqueue administration"
admin.site.site_title = "aiqueue admin"
admin.site.index_title = "Workloads, providers, budgets and users"

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("jobs/", include("jobs.urls")),
    path("batches/", include("batches.urls")),
    path("operator/", include("jobs.operator_views")),
    path("metrics", metrics.metrics_view, name="metrics"),
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("review/", include("review.urls")),
    path("api/jobs", api.submit, name="api-submit"),
    path("api/jobs/<uuid:code>", api.detail, name="api-detail"),
    path("api/jobs/<uuid:code>/cancel", api.cancel, name="api-cancel"),
    path("api/<path:rest>", api.not_found),
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/django-rq/", include("django_rq.urls")),
    path("admin/", admin.site.urls),
]
