from django.urls import path

from jobs import lists_views, replay_views, views

app_name = "jobs"

urlpatterns = [
    path("", views.job_list, name="list"),
    path("new/", views.job_new, name="new"),
    path("cancel/", views.job_cancel_bulk, name="cancel-bulk"),
    path("replay/", replay_views.job_replay_bulk, name="replay-bulk"),
    *lists_views.urlpatterns,
    path("<uuid:code>/", views.job_detail, name="detail"),
    path("<uuid:code>/cancel/", views.job_cancel, name="cancel"),
    path("<uuid:code>/replay/", replay_views.job_replay, name="replay"),
]
