from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from batches import api as batches_api
from jobs import api, openapi, rq_admin
from jobs.errors import REJECTED_FORM
from ops import health, metrics
from ops import views as ops_views

# The admin is where operators set workloads, providers, budgets and limits: name it as such.
admin.site.site_header = "aiqueue administration"
admin.site.site_title = "aiqueue admin"
admin.site.index_title = "Workloads, providers, budgets and users"


class LoginView(auth_views.LoginView):
    def form_invalid(self, form):
        response = super().form_invalid(form)
        response.status_code = REJECTED_FORM  # like every other rejected form
        return response


urlpatterns = [
    path("", ops_views.dashboard, name="dashboard"),
    path("jobs/", include("jobs.urls")),
    path("batches/", include("batches.urls")),
    path("operator/workers/", include("ops.fleet_views")),
    path("operator/spend/", ops_views.spend, name="spend"),
    path("operator/", include("ops.operator_views")),
    path("metrics", metrics.metrics_view, name="metrics"),
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("review/", include("review.urls")),
    # The API (jobs.api, batches.api); jobs.openapi describes every route below but the last.
    path("api/jobs", api.jobs, name="api-jobs"),
    path("api/jobs/<uuid:code>", api.detail, name="api-detail"),
    path("api/jobs/<uuid:code>/cancel", api.cancel, name="api-cancel"),
    path("api/jobs/<uuid:code>/replay", api.replay, name="api-replay"),
    path("api/batches", batches_api.create, name="api-batches"),
    path("api/batches/<uuid:code>", batches_api.detail, name="api-batch"),
    path("api/batches/<uuid:code>/jobs", batches_api.jobs, name="api-batch-jobs"),
    path("api/openapi.json", openapi.document, name="api-openapi"),
    path("api/docs", openapi.docs_page, name="api-docs"),
    path("api/<path:rest>", api.not_found),
    path("accounts/login/", LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/django-rq/", include((rq_admin.urlpatterns(), "django_rq"))),
    path(
        "admin/r/<path:content_type_id>/<path:object_id>/",
        admin.site.admin_view(rq_admin.view_on_site),
        name="view-on-site",
    ),
    path("admin/", admin.site.urls),
]

# JSON under /api/, the site's pages elsewhere (jobs.errors).
handler400 = "jobs.errors.bad_request"
handler403 = "jobs.errors.permission_denied"
handler404 = "jobs.errors.page_not_found"
handler500 = "jobs.errors.server_error"
