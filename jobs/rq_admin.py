"""django-rq's pages in the admin, with "not found" as a 404 instead of a 500.

django-rq's views raise for addresses that name nothing: an unknown job id (NoSuchJobError),
worker key (ValueError), queue or scheduler index (IndexError), the scheduler page without
rq-scheduler installed (ImproperlyConfigured). Its placeholder "Dashboard" model has no table,
yet the admin served its change, delete and history pages and its "view on site" link
(OperationalError). Both the /admin/django-rq/ patterns (aiqueue.urls) and the model's admin
here wrap every view in `missing_is_404`, the model's admin has only the dashboard, and
`view_on_site` answers 404 for a model without a table.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps

from django.contrib import admin
from django.contrib.contenttypes.models import ContentType
from django.contrib.contenttypes.views import shortcut
from django.core.exceptions import ImproperlyConfigured
from django.http import Http404, HttpRequest, HttpResponse
from django.urls import URLPattern, path
from django_rq import admin as rq_admin
from django_rq import models as rq_models
from django_rq.urls import get_admin_urlpatterns, get_api_urlpatterns
from rq.exceptions import NoSuchJobError

MISSING = (NoSuchJobError, IndexError, ValueError, ImproperlyConfigured)


def missing_is_404(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    @wraps(view)
    def wrapped(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        try:
            return view(request, *args, **kwargs)
        except MISSING as exc:
            raise Http404(f"Not found: {exc}") from exc

    return wrapped


def urlpatterns() -> list[URLPattern]:
    """django_rq.urls, each view wrapped (its own views check staff first)."""
    return get_api_urlpatterns() + get_admin_urlpatterns(view_wrapper=missing_is_404)


class DashboardAdmin(rq_admin.QueueAdmin):
    def get_urls(self) -> list[URLPattern]:
        def wrap(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
            view = missing_is_404(view)

            @wraps(view)
            def wrapper(request: HttpRequest, *args, **kwargs) -> HttpResponse:
                request.current_app = self.admin_site.name
                return self.admin_site.admin_view(view)(request, *args, **kwargs)

            return wrapper

        name = f"{self.opts.app_label}_{self.opts.model_name}_changelist"
        return [
            *get_api_urlpatterns(name_prefix="django_rq_"),
            *get_admin_urlpatterns(name_prefix="django_rq_", view_wrapper=wrap),
            path("", wrap(self.changelist_view), name=name),
        ]


def view_on_site(request: HttpRequest, content_type_id: str, object_id: str) -> HttpResponse:
    """The admin's /admin/r/<content type>/<id>/ (contenttypes' shortcut), except for models
    without a table, which it would query."""
    content_type = ContentType.objects.filter(pk=content_type_id).first()
    model = content_type.model_class() if content_type is not None else None
    if model is not None and not model._meta.managed:
        raise Http404("That kind of object has no pages.")
    return shortcut(request, content_type_id, object_id)


if admin.site.is_registered(rq_models.Dashboard):
    admin.site.unregister(rq_models.Dashboard)
    admin.site.register(rq_models.Dashboard, DashboardAdmin)
