from django.urls import path

from batches import views

app_name = "batches"

urlpatterns = [
    path("", views.batch_list, name="list"),
    path("new/", views.batch_new, name="new"),
    path("<uuid:code>/", views.batch_detail, name="detail"),
    path("<uuid:code>/mapping/", views.batch_mapping, name="mapping"),
    path("<uuid:code>/start/", views.batch_start, name="start"),
    path("<uuid:code>/pause/", views.batch_pause, name="pause"),
    path("<uuid:code>/resume/", views.batch_resume, name="resume"),
    path("<uuid:code>/cancel/", views.batch_cancel, name="cancel"),
    path("<uuid:code>/results.csv", views.batch_results, name="results"),
]
