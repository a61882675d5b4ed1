from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from jobs import api, views

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("jobs/", include("jobs.urls")),
    path("api/jobs", api.submit, name="api-submit"),
    path("api/jobs/<uuid:code>", api.detail, name="api-detail"),
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/django-rq/", include("django_rq.urls")),
    path("admin/", admin.site.urls),
]
