"""The call loop: one thread per worker process on which every run waits for its provider
without holding a thread of its own.

Each run is a greenlet started on the loop's thread (`CallLoop.spawn`). Its code is the same
synchronous code as anywhere else (Django's ORM, redis-py, httpx's Client, tenacity); where it
would block on a provider (connecting, a socket read or write) or sleep (a retry's backoff), it
parks instead (`wait_io`, `sleep`) and the loop runs another run. So a thousand calls in flight
are a thousand small greenlets waiting on one selector, not a thousand OS threads, and the
interpreter is never handed between threads.

What parks and what does not: only provider sockets (`GreenBackend`, the network backend of
the loop's httpx clients) and sleeps. Database and Redis calls run as they are and hold the
loop for their round trip (a fraction of a millisecond on the same host). The runs share the
loop thread's database connection (Django's connections are per thread), which is safe
because no run parks inside a transaction: `wait_io` and `sleep` refuse to, loudly.

Outside a run on the loop (the web process, the test suite's inline worker, a worker's thread
for a plain RQ job) `sleep` is `time.sleep` and `GreenBackend` connects as httpcore does.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import logging
import selectors
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import greenlet
import httpcore
from django.db import connections

log = logging.getLogger(__name__)

READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE


class ParkedInTransaction(RuntimeError):
    """A run tried to wait on the loop inside a database transaction: the loop's runs share
    one connection, so another run's statements would land in that transaction."""


class CallLoop:
    """The loop's thread: a selector, a heap of timers and the runs' greenlets.

    Other threads talk to it through `spawn`, `throw` and `call_soon` only (each wakes the
    selector through a socket pair); everything else is called on the loop's own thread."""

    def __init__(self, name: str = "calls") -> None:
        self.name = name
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, READ, None)
        self._inbox: deque[Callable[[], None]] = deque()
        self._ready: deque[tuple[greenlet.greenlet, Any, BaseException | None]] = deque()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._cancelled: set[int] = set()
        self._order = itertools.count()
        self._parked: dict[greenlet.greenlet, _Wait] = {}
        self._pending: dict[greenlet.greenlet, BaseException] = {}
        self._runs = 0
        self._stopping = False
        self._resolver: ThreadPoolExecutor | None = None
        self.hub: greenlet.greenlet | None = None
        self.thread = threading.Thread(target=self._main, name=name, daemon=True)

    # --- from any thread ----------------------------------------------------------------
    def start(self) -> CallLoop:
        self.thread.start()
        return self

    def spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn(*args)` as a new run on the loop. An exception it lets out is logged."""
        self.call_soon(lambda: self._start_run(fn, args))

    def call_soon(self, fn: Callable[[], None]) -> None:
        self._inbox.append(fn)
        self._wake()

    def throw(self, run: greenlet.greenlet, exception: BaseException) -> None:
        """Raise `exception` in `run` where it waits (or at its next wait)."""
        self.call_soon(lambda: self._throw(run, exception))

    def stop(self) -> None:
        """End the thread once no run is left (the worker stops after its runs ended)."""
        self.call_soon(self._stop)

    @property
    def runs(self) -> int:
        return self._runs

    # --- on the loop's thread, in a run --------------------------------------------------
    def wait_io(self, sock: socket.socket, events: int, timeout: float | None) -> bool:
        """Park the current run until `sock` is ready for `events`; False on timeout."""
        return self._park(_Wait(sock=sock, events=events), timeout)

    def sleep(self, seconds: float) -> None:
        self._park(_Wait(), max(0.0, seconds))

    def wait_future(self, future, timeout: float | None) -> bool:
        """Park until a concurrent.futures.Future is done (work done in another thread)."""
        run = greenlet.getcurrent()
        wait = _Wait()
        future.add_done_callback(lambda _: self.call_soon(lambda: self._wake_run(run, wait)))
        if future.done():
            return True
        return self._park(wait, timeout)

    def resolve(self, host: str, port: int, timeout: float | None) -> list:
        """getaddrinfo without holding the loop: on a small thread pool."""
        if self._resolver is None:
            self._resolver = ThreadPoolExecutor(4, thread_name_prefix=f"{self.name}-dns")
        future = self._resolver.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
        if not self.wait_future(future, timeout):
            future.cancel()
            raise httpcore.ConnectTimeout(f"resolving {host} took longer than {timeout} s")
        return future.result()

    def _park(self, wait: _Wait, timeout: float | None) -> bool:
        run = greenlet.getcurrent()
        if run is self.hub or self.hub is None:
            raise RuntimeError("only a run on the call loop can wait on it")
        for conn in connections.all(initialized_only=True):
            if conn.in_atomic_block:
                raise ParkedInTransaction(
                    f"a run waited on the call loop inside a transaction on {conn.alias!r}"
                )
        pending = self._pending.pop(run, None)
        if pending is not None:
            raise pending
        if wait.sock is not None:
            self._selector.register(wait.sock, wait.events, run)
        if timeout is not None:
            wait.timer = self._call_later(timeout, lambda: self._time_out(run, wait))
        self._parked[run] = wait
        return self.hub.switch()

    # --- the loop itself ----------------------------------------------------------------
    def _main(self) -> None:
        self.hub = greenlet.getcurrent()
        while not (self._stopping and self._runs == 0):
            while self._inbox:
                self._inbox.popleft()()
            while self._ready:
                run, value, exception = self._ready.popleft()
                if run.dead:
                    continue
                if exception is not None:
                    run.throw(exception)
                elif value is _START:
                    run.switch()
                else:
                    run.switch(value)
            if self._inbox:
                continue
            timeout = None
            now = time.monotonic()
            while self._timers:
                when, order, fn = self._timers[0]
                if order in self._cancelled:
                    heapq.heappop(self._timers)
                    self._cancelled.discard(order)
                    continue
                if when <= now:
                    heapq.heappop(self._timers)
                    fn()
                    continue
                timeout = when - now
                break
            if self._ready:
                continue
            for key, _ in self._selector.select(timeout):
                if key.data is None:
                    self._drain_wake()
                    continue
                run = key.data
                wait = self._parked.get(run)
                if wait is not None:
                    self._resume(run, wait, True)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()
        if self._resolver is not None:
            self._resolver.shutdown(wait=False)

    def _start_run(self, fn: Callable[..., Any], args: tuple) -> None:
        def run() -> None:
            try:
                fn(*args)
            except BaseException:  # one run must never end the loop
                log.exception("a run on the call loop ended abnormally")
            finally:
                self._runs -= 1

        self._runs += 1
        self._ready.append((greenlet.greenlet(run, parent=self.hub), _START, None))

    def _resume(self, run: greenlet.greenlet, wait: _Wait, value: Any, exception=None) -> None:
        self._parked.pop(run, None)
        if wait.sock is not None:
            try:
                self._selector.unregister(wait.sock)
            except (KeyError, ValueError, OSError):
                pass  # closed under the wait: the run finds out when it reads
        if wait.timer is not None:
            self._cancelled.add(wait.timer)
        self._ready.append((run, value, exception))

    def _time_out(self, run: greenlet.greenlet, wait: _Wait) -> None:
        if self._parked.get(run) is not wait:
            return
        if wait.sock is None:
            self._resume(run, wait, True)  # a sleep ends well
            return
        # A wait times out, unless its socket is ready after all: after a stall (SIGSTOP, a
        # starved CPU) the timer and the answer are both due, and the answer wins, as a
        # blocking read with a timeout would have returned it.
        self._resume(run, wait, _is_ready(wait.sock, wait.events))

    def _wake_run(self, run: greenlet.greenlet, wait: _Wait) -> None:
        if self._parked.get(run) is wait:
            self._resume(run, wait, True)

    def _throw(self, run: greenlet.greenlet, exception: BaseException) -> None:
        if run.dead:
            return
        wait = self._parked.get(run)
        if wait is not None:
            self._resume(run, wait, None, exception)
            return
        for i, (ready, value, _) in enumerate(self._ready):
            if ready is run and value is not _START:
                self._ready[i] = (run, value, exception)  # resume it with the exception instead
                return
        self._pending[run] = exception  # not started yet: raised at its first wait

    def _call_later(self, delay: float, fn: Callable[[], None]) -> int:
        order = next(self._order)
        heapq.heappush(self._timers, (time.monotonic() + delay, order, fn))
        return order

    def call_later(self, delay: float, fn: Callable[[], None]) -> int:
        """On the loop's thread: run `fn` on the loop after `delay` s; cancel with `cancel`."""
        return self._call_later(delay, fn)

    def cancel(self, timer: int) -> None:
        self._cancelled.add(timer)

    def _stop(self) -> None:
        self._stopping = True

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # full: a wake-up is pending already, or the loop has ended

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass


_START = object()  # a run's first turn: its greenlet is started, not resumed


class _Wait:
    __slots__ = ("sock", "events", "timer")

    def __init__(self, sock: socket.socket | None = None, events: int = 0) -> None:
        self.sock = sock
        self.events = events
        self.timer: int | None = None


_active: CallLoop | None = None


def install(loop: CallLoop | None) -> None:
    """The process's call loop (the worker starts one); None: none."""
    global _active
    _active = loop


def current() -> CallLoop | None:
    """The call loop, if the caller is a run on it."""
    loop = _active
    if loop is None or loop.hub is None or threading.current_thread() is not loop.thread:
        return None
    return loop if greenlet.getcurrent() is not loop.hub else None


def sleep(seconds: float) -> None:
    """`time.sleep`, except that a run on the call loop parks instead of holding the loop."""
    loop = current()
    if loop is None:
        time.sleep(seconds)
    else:
        loop.sleep(seconds)


# --- the provider sockets ------------------------------------------------------------------


class GreenStream(httpcore.NetworkStream):
    """A non-blocking socket whose reads and writes park the run until it is ready."""

    def __init__(self, sock: socket.socket, loop: CallLoop) -> None:
        self._sock = sock
        self._loop = loop

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        while True:
            try:
                return self._sock.recv(max_bytes)
            except (BlockingIOError, ssl.SSLWantReadError):
                events = READ
            except ssl.SSLWantWriteError:
                events = WRITE
            except OSError as exc:
                raise httpcore.ReadError(exc) from exc
            if not self._loop.wait_io(self._sock, events, timeout):
                raise httpcore.ReadTimeout(f"no data for {timeout} s")

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        view = memoryview(buffer)
        while view:
            try:
                sent = self._sock.send(view)
                view = view[sent:]
                continue
            except (BlockingIOError, ssl.SSLWantWriteError):
                events = WRITE
            except ssl.SSLWantReadError:
                events = READ
            except OSError as exc:
                raise httpcore.WriteError(exc) from exc
            if not self._loop.wait_io(self._sock, events, timeout):
                raise httpcore.WriteTimeout(f"could not write for {timeout} s")

    def close(self) -> None:
        self._sock.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None) -> GreenStream:
        try:
            sock = ssl_context.wrap_socket(
                self._sock, server_hostname=server_hostname, do_handshake_on_connect=False
            )
        except OSError as exc:
            raise httpcore.ConnectError(exc) from exc
        while True:
            try:
                sock.do_handshake()
                return GreenStream(sock, self._loop)
            except ssl.SSLWantReadError:
                events = READ
            except ssl.SSLWantWriteError:
                events = WRITE
            except OSError as exc:
                sock.close()
                raise httpcore.ConnectError(exc) from exc
            if not self._loop.wait_io(sock, events, timeout):
                sock.close()
                raise httpcore.ConnectTimeout(f"TLS handshake took longer than {timeout} s")

    def get_extra_info(self, info: str) -> Any:
        if info == "ssl_object":
            return self._sock._sslobj if isinstance(self._sock, ssl.SSLSocket) else None
        if info == "client_addr":
            return self._sock.getsockname()
        if info == "server_addr":
            return self._sock.getpeername()
        if info == "socket":
            return self._sock
        if info == "is_readable":
            # As httpcore's own check: a pooled connection the server closed reads as readable.
            return _is_ready(self._sock, READ)
        return None


def _is_ready(sock: socket.socket, events: int) -> bool:
    if sock.fileno() < 0:
        return True  # closed under the wait: the run finds out when it reads
    selector = selectors.DefaultSelector()
    try:
        selector.register(sock, events)
        return bool(selector.select(0))
    finally:
        selector.close()


class GreenBackend(httpcore.NetworkBackend):
    """httpcore's network backend for a run on the call loop: connects without blocking and
    hands out GreenStreams. Called outside a run, it is httpcore's own sync backend."""

    def __init__(self) -> None:
        self._sync = httpcore.SyncBackend()

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        loop = current()
        if loop is None:
            return self._sync.connect_tcp(host, port, timeout, local_address, socket_options)
        deadline = None if timeout is None else time.monotonic() + timeout
        error: Exception | None = None
        for family, kind, proto, _, address in loop.resolve(host, port, timeout):
            sock = socket.socket(family, kind, proto)
            try:
                sock.setblocking(False)
                for option in socket_options or ():
                    sock.setsockopt(*option)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if local_address is not None:
                    sock.bind((local_address, 0))
                code = sock.connect_ex(address)
                if code in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
                    left = None if deadline is None else max(0.0, deadline - time.monotonic())
                    if not loop.wait_io(sock, WRITE, left):
                        raise httpcore.ConnectTimeout(f"connecting took longer than {timeout} s")
                    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    raise OSError(code, errno.errorcode.get(code, str(code)))
                return GreenStream(sock, loop)
            except httpcore.ConnectTimeout:
                sock.close()
                raise
            except OSError as exc:
                sock.close()
                error = exc
        raise httpcore.ConnectError(error or OSError(f"no address for {host}"))

    def connect_unix_socket(self, path, timeout=None, socket_options=None):
        return self._sync.connect_unix_socket(path, timeout, socket_options)

    def sleep(self, seconds: float) -> None:
        sleep(seconds)
