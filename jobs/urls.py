from django.urls import path

from jobs import views

app_name = "jobs"

urlpatterns = [
    path("", views.job_list, name="list"),
    path("new/", views.job_new, name="new"),
    path("cancel/", views.job_cancel_bulk, name="cancel-bulk"),
    path("<uuid:code>/", views.job_detail, name="detail"),
    path("<uuid:code>/cancel/", views.job_cancel, name="cancel"),
]
