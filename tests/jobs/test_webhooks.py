"""Webhooks end to end: a receiver on localhost, the real worker running the jobs, the webhook
worker delivering on its own queue; signatures, retries with their log, the admin's re-send."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest
from django.core.management import call_command

from jobs import services, webhooks
from jobs.models import Job, Webhook, WebhookDelivery

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def hook_for(settings, user):
    settings.AIQUEUE_WEBHOOK_RETRY_DELAYS = [0, 0]  # retried at once: no waiting in a test

    def make(url: str) -> tuple[Webhook, str]:
        hook = Webhook(name="ci", url=url, user=user)
        secret = hook.set_new_secret()
        hook.save()
        webhooks.forget_cache()
        return hook, secret

    yield make
    webhooks.forget_cache()


def deliver_all() -> None:
    call_command("webhook_worker", "--burst")


def verify(secret: str, headers: dict, body: bytes) -> bool:
    """What a receiver does (docs/deploy.md)."""
    fields = dict(part.split("=", 1) for part in headers["Aiqueue-Signature"].split(","))
    expected = hmac.new(secret.encode(), f"{fields['t']}.".encode() + body, hashlib.sha256)
    return hmac.compare_digest(expected.hexdigest(), fields["v1"])


def test_a_receiver_gets_every_terminal_event_once_signed(
    redis_conn, workload, user, run_worker, receiver, hook_for, simulator
):
    target = receiver()
    _, secret = hook_for(target.url)
    done = services.do_submit_job(workload=workload, input_text="A note to sum up.", user=user)[0]
    cancelled = services.do_submit_job(workload=workload, input_text="Never mind.", user=user)[0]
    services.do_cancel_job(cancelled, actor=user)
    run_worker()
    deliver_all()
    events = sorted(
        (json.loads(r["body"])["event"], json.loads(r["body"])["job"]["code"])
        for r in target.received
    )
    assert events == sorted(
        [("job.succeeded", str(done.code)), ("job.cancelled", str(cancelled.code))]
    )
    for request in target.received:
        assert verify(secret, request["headers"], request["body"])
        assert not verify("another secret", request["headers"], request["body"])
    succeeded = next(json.loads(r["body"]) for r in target.received if b"succeeded" in r["body"])
    assert succeeded["job"]["output"] == Job.objects.get(pk=done.pk).output_text
    assert set(WebhookDelivery.objects.values_list("status", flat=True)) == {"delivered"}


def test_a_failing_receiver_is_retried_and_each_attempt_logged(
    redis_conn, workload, user, receiver, hook_for
):
    target = receiver([500, 503])  # then 200
    hook_for(target.url)
    job = services.do_submit_job(workload=workload, input_text="x", user=user)[0]
    services.do_cancel_job(job, actor=user)
    deliver_all()
    delivery = WebhookDelivery.objects.get()
    assert delivery.status == "delivered"
    assert [entry["status_code"] for entry in delivery.log] == [500, 503, 200]
    # Every attempt sent the same event under the same delivery id.
    assert len({r["headers"]["Aiqueue-Delivery"] for r in target.received}) == 1
    assert len({r["body"] for r in target.received}) == 1


def test_a_receiver_that_keeps_failing_is_given_up_on_then_sent_again_from_the_admin(
    redis_conn, workload, user, operator, receiver, hook_for, client
):
    target = receiver([500, 500, 500])
    hook_for(target.url)
    job = services.do_submit_job(workload=workload, input_text="x", user=user)[0]
    services.do_cancel_job(job, actor=user)
    deliver_all()
    delivery = WebhookDelivery.objects.get()
    assert (delivery.status, delivery.attempts, delivery.last_status_code) == ("failed", 3, 500)
    operator.is_superuser = operator.is_staff = True
    operator.save()
    client.force_login(operator)
    response = client.post(
        "/admin/jobs/webhookdelivery/",
        {"action": "deliver_again", "_selected_action": [delivery.pk], "index": 0},
    )
    assert response.status_code == 302
    deliver_all()
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts) == ("delivered", 4)
    assert len(target.received) == 4


def test_a_delivery_whose_attempt_redis_lost_is_sent_by_the_reconciler_once(
    redis_conn, workload, user, receiver, hook_for
):
    from datetime import timedelta

    from django.utils import timezone

    from runs import reconcile

    target = receiver()
    hook_for(target.url)
    job = services.do_submit_job(workload=workload, input_text="x", user=user)[0]
    services.do_cancel_job(job, actor=user)
    delivery = WebhookDelivery.objects.get()
    # Long enough ago to be late; its attempt is still on the queue, so no second one is added.
    WebhookDelivery.objects.update(created_at=timezone.now() - timedelta(minutes=5))
    assert reconcile.run().webhooks_requeued == 0
    assert redis_conn.llen(f"rq:queue:{webhooks.QUEUE}") == 1

    redis_conn.flushdb()  # Redis restarted without its data: the attempt is gone
    assert reconcile.run().webhooks_requeued == 1
    deliver_all()  # its maintenance pass reconciles too: the attempt is on the queue, not added
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts, len(target.received)) == ("delivered", 1, 1)
    assert reconcile.run().webhooks_requeued == 0  # delivered: nothing more to send


def test_a_slow_receiver_holds_back_no_other_delivery_and_sigterm_lets_it_finish(
    redis_conn, workload, user, receiver, hook_for, tmp_path
):
    import signal
    import sys

    from tests.helpers import spawn, wait_for, worker_env

    slow, fast = receiver(delay_s=4), receiver()
    hook_for(slow.url)
    first = services.do_submit_job(workload=workload, input_text="x", user=user)[0]
    services.do_cancel_job(first, actor=user)  # the slow receiver's delivery is queued first
    hook_for(fast.url)
    second = services.do_submit_job(workload=workload, input_text="y", user=user)[0]
    services.do_cancel_job(second, actor=user)
    assert WebhookDelivery.objects.count() == 3

    env = worker_env(heartbeat=1, stale_after=30)
    worker = spawn([sys.executable, "manage.py", "webhook_worker"], tmp_path, env=env)
    try:
        delivered = WebhookDelivery.objects.filter(status="delivered")
        wait_for(lambda: delivered.exists() and len(slow.received) == 2, timeout=20)
        # Both slow attempts are still being answered: the fast one did not wait for them.
        assert [d.webhook.url for d in delivered] == [fast.url]
        worker.send_signal(signal.SIGTERM)  # a warm stop: the attempts in flight finish
        assert worker.wait(timeout=30) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
    assert set(WebhookDelivery.objects.values_list("status", "attempts")) == {("delivered", 1)}
    assert (len(slow.received), len(fast.received)) == (2, 1)


def test_a_dead_receiver_never_holds_up_the_job(redis_conn, workload, user, run_worker, hook_for):
    hook_for("http://127.0.0.1:9/nobody")  # the discard port: nothing listens
    job = services.do_submit_job(workload=workload, input_text="A note.", user=user)[0]
    run_worker()  # the job worker does not deliver: it only records and enqueues
    job.refresh_from_db()
    assert job.status == "succeeded"
    assert WebhookDelivery.objects.get().attempts == 0


def test_a_webhook_url_must_be_http_or_https(db):
    from django.core.exceptions import ValidationError

    for url in ("file:///etc/passwd", "gopher://127.0.0.1/", "ftp://example.com/x"):
        with pytest.raises(ValidationError):
            Webhook(name="x", url=url, secret="s").full_clean()
    Webhook(name="x", url="https://example.com/hook", secret="s").full_clean()


def test_the_secret_is_shown_once_on_creation(operator, client, db):
    operator.is_superuser = operator.is_staff = True
    operator.save()
    client.force_login(operator)
    response = client.post(
        "/admin/jobs/webhook/add/",
        {"name": "crm", "url": "https://example.com/hook", "is_active": "on"},
    )
    hook = Webhook.objects.get()
    assert hook.secret in response.content.decode()
    assert "no-store" in response["Cache-Control"]
    page = client.get(f"/admin/jobs/webhook/{hook.pk}/change/").content.decode()
    assert hook.secret not in page


def test_a_batch_that_ends_is_told_too(redis_conn, workload, user, receiver, hook_for):
    from batches import services as batch_services

    target = receiver()
    hook_for(target.url)
    batch = batch_services.do_create_batch(
        workload=workload, filename="x.jsonl", data=b'{"input": "x"}', user=user
    )
    batch_services.do_start_batch(batch)
    batch_services.do_cancel_batch(batch, actor=user)
    deliver_all()
    events = sorted(json.loads(r["body"])["event"] for r in target.received)
    assert events == ["batch.cancelled", "job.cancelled"]
    told = next(json.loads(r["body"]) for r in target.received if b"batch.cancelled" in r["body"])
    assert told["batch"]["code"] == str(batch.code)
