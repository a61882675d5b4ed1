"""The review inbox pages. Thin: check the role, parse, call review.services, render.

Readers (review.view_reviewitem) see everything; only Reviewers and superusers act. Every
action is a POST (CSRF-checked) and lands on the next open item, so a reviewer can work the
queue without going back to the list.
"""

from __future__ import annotations

import uuid
from urllib.parse import urlencode

from django.conf import settings
from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db.models import Count, F, Q
from django.http import Http404, HttpRequest, HttpResponse, QueryDict
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_POST

from jobs.errors import REJECTED_FORM
from jobs.models import Job
from review import digest, services
from review.forms import BulkForm, CorrectForm, InboxFilterForm, RejectForm, RetryForm
from review.models import ReviewItem
from review.roles import can_act, can_read


def _require_read(request: HttpRequest) -> None:
    if not can_read(request.user):
        raise PermissionDenied("The review inbox is for reviewers.")


def _require_act(request: HttpRequest) -> None:
    if not can_act(request.user):
        raise PermissionDenied("Only members of the Reviewers group can act on review items.")


def _get_item(pk: int) -> ReviewItem:
    return get_object_or_404(
        ReviewItem.objects.select_related(
            "job__workload__provider", "job__submitted_by", "claimed_by", "resolved_by"
        ),
        pk=pk,
    )


def inbox(request: HttpRequest) -> HttpResponse:
    _require_read(request)
    return _render_inbox(request, request.GET, poll_url=request.get_full_path())


def _render_inbox(
    request: HttpRequest, params: QueryDict, *, poll_url: str, status: int = 200
) -> HttpResponse:
    now = timezone.now()
    form = InboxFilterForm(params or None)
    open_items = services.open_items()
    counts = dict(open_items.order_by().values_list("reason").annotate(n=Count("id")))
    items = open_items
    sort = "oldest"
    if form.is_bound:
        # A bad value (a hand-edited or stale link) drops only its own filter, and the table
        # says which (_filter_errors.html); cleaned_data keeps the valid ones.
        form.is_valid()
        data = form.cleaned_data
        if data.get("reason"):
            items = items.filter(reason=data["reason"])
        if data.get("workload"):
            items = items.filter(job__workload=data["workload"])
        live_claim = Q(claimed_by__isnull=False, claim_expires_at__gt=now)
        if data.get("claim") == "claimed":
            items = items.filter(live_claim)
        elif data.get("claim") == "unclaimed":
            items = items.exclude(live_claim)
        elif data.get("claim") == "mine":
            items = items.filter(live_claim, claimed_by=request.user)
        sort = data.get("sort") or "oldest"
    if sort == "confidence":
        items = items.order_by(F("job__confidence").asc(nulls_first=True), "created_at", "id")
    else:
        items = items.order_by("created_at", "id")
    page = Paginator(items, settings.AIQUEUE_REVIEW_PER_PAGE).get_page(params.get("page"))
    query = params.copy()
    query.pop("page", None)
    template = "review/inbox.html"
    if request.htmx and not request.htmx.boosted:
        template += "#review-table"
    context = {
        "form": form,
        "page": page,
        "query": query.urlencode(),
        "poll_url": poll_url,
        "counts": [
            (value, label, counts.get(value, 0)) for value, label in ReviewItem.Reason.choices
        ],
        "total_open": sum(counts.values()),
        "can_act": can_act(request.user),
        "now": now,
        "nobody_told": digest.nobody_told(),
    }
    return render(request, template, context, status=status)


def item_detail(request: HttpRequest, pk: int) -> HttpResponse:
    _require_read(request)
    item = _get_item(pk)
    return render(request, "review/item.html", _item_context(request, item))


def _item_context(request: HttpRequest, item: ReviewItem, **forms) -> dict:
    job = item.job
    overrides = job.overrides or {}
    default_prompt = job.workload.render_prompt(job.input_text)
    return {
        "item": item,
        "job": job,
        "holder": item.claim_holder(),
        "attempts": job.attempts.select_related("provider"),
        "events": job.events.select_related("actor"),
        "history": job.review_items.exclude(pk=item.pk).select_related("resolved_by"),
        "evidence": sorted((item.evidence or {}).items()),
        "can_act": can_act(request.user) and item.is_open,
        "correct_form": forms.get("correct_form")
        or CorrectForm(workload=job.workload, initial={"corrected_output": job.final_output}),
        "retry_form": forms.get("retry_form")
        or RetryForm(
            initial={
                "provider": overrides.get("provider_id"),
                "model": overrides.get("model", ""),
                "temperature": overrides.get("temperature"),
                "prompt": overrides.get("prompt") or default_prompt,
            }
        ),
        "reject_form": forms.get("reject_form") or RejectForm(),
        "labels": job.workload.labels if job.workload.kind == "classify" else [],
    }


def item_for_job(request: HttpRequest, code: uuid.UUID) -> HttpResponse:
    """/review/<job code>/: the job's open item, else its latest one."""
    _require_read(request)
    job = get_object_or_404(Job, code=code)
    item = job.review_items.filter(status=ReviewItem.Status.OPEN).first()
    item = item or job.review_items.order_by("-created_at", "-id").first()
    if item is None:
        raise Http404("This job was never sent to review.")
    return redirect(item)


def next_item(request: HttpRequest) -> HttpResponse:
    _require_read(request)
    item = services.next_item_for(request.user)
    if item is None:
        messages.success(request, "All clear: nothing is waiting for review.")
        return redirect("review:inbox")
    return redirect(item)


def _after_action(request: HttpRequest, item: ReviewItem) -> HttpResponse:
    following = services.next_item_for(request.user, exclude=[item.pk])
    if following is None:
        return redirect(reverse("review:inbox"))
    return redirect(following)


@require_POST
def claim(request: HttpRequest, pk: int) -> HttpResponse:
    _require_act(request)
    item = _get_item(pk)
    if services.do_claim(item, request.user):
        messages.success(request, f"Claimed for {services.claim_minutes()} minutes.")
    else:
        item.refresh_from_db()
        holder = item.claim_holder()
        who = holder.get_username() if holder else "someone else"
        messages.warning(request, f"Not claimed: {who} is working on this item.")
    return redirect(item)


@require_POST
def release(request: HttpRequest, pk: int) -> HttpResponse:
    _require_act(request)
    item = _get_item(pk)
    services.do_release(item, request.user)
    return redirect(item)


@require_POST
def approve(request: HttpRequest, pk: int) -> HttpResponse:
    _require_act(request)
    item = _get_item(pk)
    try:
        services.do_approve(item, request.user, note=request.POST.get("note", "")[:2000])
    except services.ReviewError as exc:
        messages.error(request, str(exc))
        return redirect(item)
    messages.success(request, f"Approved review #{item.pk}.")
    return _after_action(request, item)


@require_POST
def correct(request: HttpRequest, pk: int) -> HttpResponse:
    _require_act(request)
    item = _get_item(pk)
    form = CorrectForm(request.POST, workload=item.job.workload)
    if form.is_valid():
        try:
            services.do_correct(
                item,
                request.user,
                corrected_output=form.cleaned_data["corrected_output"],
                note=form.cleaned_data["note"],
            )
        except services.ReviewError as exc:
            messages.error(request, str(exc))
            return redirect(item)
        messages.success(request, f"Corrected and approved review #{item.pk}.")
        return _after_action(request, item)
    context = _item_context(request, item, correct_form=form)
    context["open_panel"] = "edit"
    return render(request, "review/item.html", context, status=400)


@require_POST
def retry(request: HttpRequest, pk: int) -> HttpResponse:
    _require_act(request)
    item = _get_item(pk)
    form = RetryForm(request.POST)
    if form.is_valid():
        default_prompt = item.job.workload.render_prompt(item.job.input_text)
        try:
            services.do_retry(
                item,
                request.user,
                overrides=form.overrides(default_prompt),
                note=form.cleaned_data["note"],
            )
        except services.ReviewError as exc:
            messages.error(request, str(exc))
            return redirect(item)
        messages.success(request, f"Review #{item.pk}: the job is back in the queue.")
        return _after_action(request, item)
    context = _item_context(request, item, retry_form=form)
    context["open_panel"] = "retry"
    return render(request, "review/item.html", context, status=400)


@require_POST
def reject(request: HttpRequest, pk: int) -> HttpResponse:
    _require_act(request)
    item = _get_item(pk)
    form = RejectForm(request.POST)
    if form.is_valid():
        try:
            services.do_reject(item, request.user, reason=form.cleaned_data["reason"])
        except services.ReviewError as exc:
            messages.error(request, str(exc))
            return redirect(item)
        messages.success(request, f"Rejected review #{item.pk}; the job failed.")
        return _after_action(request, item)
    context = _item_context(request, item, reject_form=form)
    context["open_panel"] = "reject"
    return render(request, "review/item.html", context, status=400)


@require_POST
def bulk(request: HttpRequest) -> HttpResponse:
    _require_act(request)
    form = BulkForm(request.POST)
    back = _safe_query(request.POST.get("query", ""))
    if not form.is_valid():
        # Sent back like every rejected form (400), on the inbox it came from.
        messages.error(request, " ".join(e for errors in form.errors.values() for e in errors))
        url = reverse("review:inbox") + back
        return _render_inbox(
            request, QueryDict(back.removeprefix("?")), poll_url=url, status=REJECTED_FORM
        )
    action = form.cleaned_data["action"]
    result = services.do_bulk(
        request.user, form.cleaned_data["items"], action, reason=form.cleaned_data["reason"]
    )
    verb = {"approve": "Approved", "retry": "Retried", "reject": "Rejected"}[action]
    messages.info(request, result.summary(verb))
    return redirect(reverse("review:inbox") + back)


def _safe_query(query: str) -> str:
    """The inbox filters to go back to after a bulk action (only our own, re-encoded)."""
    form = InboxFilterForm(QueryDict(query))
    if not query or not form.is_valid():
        return ""
    keep = {k: v for k, v in form.cleaned_data.items() if v}
    if "workload" in keep:
        keep["workload"] = keep["workload"].pk
    return "?" + urlencode(keep) if keep else ""
