from django.urls import path

from review import views

app_name = "review"

urlpatterns = [
    path("", views.inbox, name="inbox"),
    path("next/", views.next_item, name="next"),
    path("bulk/", views.bulk, name="bulk"),
    path("<int:pk>/", views.item_detail, name="item"),
    path("<uuid:code>/", views.item_for_job, name="item-for-job"),
    path("<int:pk>/claim/", views.claim, name="claim"),
    path("<int:pk>/release/", views.release, name="release"),
    path("<int:pk>/approve/", views.approve, name="approve"),
    path("<int:pk>/correct/", views.correct, name="correct"),
    path("<int:pk>/retry/", views.retry, name="retry"),
    path("<int:pk>/reject/", views.reject, name="reject"),
]
