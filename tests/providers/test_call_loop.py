"""The call loop (jobs.providers.loop): runs that wait without a thread each, over real
sockets to the simulator."""

from __future__ import annotations

import threading

import httpx
import pytest
from django.db import transaction
from rq.timeouts import JobTimeoutException

from jobs.providers import loop
from jobs.providers.base import AbortableBackend, CallHandle, abortable_transport
from runs.worker import ThreadDeathPenalty


@pytest.fixture
def call_loop():
    started = loop.CallLoop("test-calls").start()
    loop.install(started)
    yield started
    loop.install(None)
    started.stop()
    started.thread.join(timeout=10)


def run_all(call_loop: loop.CallLoop, fns, timeout: float = 30) -> list:
    """Run each fn as a run on the loop; their results (or exceptions), in order."""
    results: list = [None] * len(fns)
    done = threading.Semaphore(0)

    def wrap(i, fn):
        try:
            results[i] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            results[i] = exc
        finally:
            done.release()

    for i, fn in enumerate(fns):
        call_loop.spawn(wrap, i, fn)
    for _ in fns:
        assert done.acquire(timeout=timeout), "a run did not end"
    return results


def chat_body(text: str) -> dict:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}


def test_a_hundred_calls_wait_at_once_on_one_thread(call_loop, simulator):
    simulator.control(latency_ms=1500)
    client = httpx.Client(transport=abortable_transport(on_loop=True), timeout=30)
    threads_seen = set()

    def call(i):
        def run():
            threads_seen.add(threading.get_ident())
            assert loop.current() is call_loop
            response = client.post(
                f"{simulator.url}/v1/chat/completions",
                json=chat_body(f"question {i}"),
                headers={"Authorization": "Bearer test"},
            )
            return response.status_code

        return run

    results = run_all(call_loop, [call(i) for i in range(100)])
    assert results == [200] * 100
    assert threads_seen == {call_loop.thread.ident}
    assert simulator.counters()["peak_in_flight"] == 100
    client.close()


def test_outside_a_run_the_backend_and_sleep_block_as_usual(simulator):
    # The web process, the inline worker and a plain RQ job's thread: no loop.
    assert loop.current() is None
    client = httpx.Client(transport=abortable_transport(on_loop=True), timeout=10)
    response = client.post(
        f"{simulator.url}/v1/chat/completions",
        json=chat_body("hello"),
        headers={"Authorization": "Bearer test"},
    )
    assert response.status_code == 200
    loop.sleep(0)
    client.close()


def test_an_exception_thrown_into_one_waiting_run_leaves_the_others_alone(call_loop):
    order = []
    first_waiting = threading.Event()
    runs = {}

    def doomed():
        import greenlet

        runs["doomed"] = greenlet.getcurrent()
        first_waiting.set()
        loop.sleep(30)
        order.append("doomed woke")  # never: the exception is raised where it waited

    def survivor():
        loop.sleep(0.3)
        order.append("survivor done")
        return "done"

    done = threading.Semaphore(0)
    results = {}

    def wrap(name, fn):
        try:
            results[name] = fn()
        except BaseException as exc:  # noqa: BLE001
            results[name] = exc
        finally:
            done.release()

    call_loop.spawn(wrap, "doomed", doomed)
    call_loop.spawn(wrap, "survivor", survivor)
    assert first_waiting.wait(10)
    call_loop.throw(runs["doomed"], KeyboardInterrupt("stopped"))
    assert done.acquire(timeout=10)
    assert done.acquire(timeout=10)
    assert isinstance(results["doomed"], KeyboardInterrupt)
    assert results["survivor"] == "done"
    assert order == ["survivor done"]


def test_a_job_timeout_on_the_loop_ends_only_that_run(call_loop):
    def timed(seconds, timeout):
        def run():
            with ThreadDeathPenalty(timeout, JobTimeoutException, job_id="x"):
                loop.sleep(seconds)
            return "finished"

        return run

    slow, quick = run_all(call_loop, [timed(30, 1), timed(0.2, 10)])
    assert isinstance(slow, JobTimeoutException)
    assert "maximum timeout value (1 seconds)" in str(slow)
    assert quick == "finished"
    # The loop is still there for the next run, and no stray timeout reaches it.
    assert run_all(call_loop, [timed(0.1, 1)]) == ["finished"]


@pytest.mark.django_db(transaction=True)
def test_a_run_may_not_wait_inside_a_transaction(call_loop):
    # The runs share the loop thread's database connection: another run's statements would
    # land in this one's transaction.
    def waits_in_transaction():
        with transaction.atomic():
            loop.sleep(0.01)

    (result,) = run_all(call_loop, [waits_in_transaction])
    assert isinstance(result, loop.ParkedInTransaction)


def test_an_aborted_call_on_the_loop_stops_at_once(call_loop, simulator):
    # CallHandle.abort (a cancel, from the heartbeat's thread) shuts the socket the run waits
    # on; the loop wakes the run, which sees the call cut off.
    simulator.control(latency_ms=20_000)
    transport = abortable_transport(on_loop=True)
    assert isinstance(transport._pool._network_backend, AbortableBackend)
    client = httpx.Client(transport=transport, timeout=30)
    handle = CallHandle()
    started = threading.Event()

    def call():
        with handle:
            started.set()
            return client.post(
                f"{simulator.url}/v1/chat/completions",
                json=chat_body("a long answer"),
                headers={"Authorization": "Bearer test"},
            )

    def abort_soon():
        assert started.wait(10)
        import time

        time.sleep(0.5)
        handle.abort("cancelled")

    aborter = threading.Thread(target=abort_soon)
    aborter.start()
    (result,) = run_all(call_loop, [call], timeout=10)
    aborter.join()
    assert isinstance(result, httpx.TransportError)
    assert handle.abort_reason == "cancelled"
    client.close()
