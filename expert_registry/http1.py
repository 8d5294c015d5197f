"""A small HTTP/1.1 keep-alive client for upstream calls: asyncio protocols + httptools.

Why not httpx or aiohttp: on the gateway's hot path their per-request bookkeeping cost
far more than the proxying itself (measured on 2 cores against a local upstream:
aiohttp ~310 us of CPU per request, this client ~20-50 us; httpcore's pool scans every
connection on every request). It does only what an OpenAI-style upstream needs: one
request per connection at a time, Content-Length bodies out, Content-Length or chunked
bodies in (httptools parses both), TLS through asyncio, keep-alive reuse, per-origin
connection limits, and a retry on a fresh connection when a *reused* connection turns
out to be closed before any byte of the answer arrived (the usual keep-alive race).

Errors: ``ConnectFailed`` (could not connect), ``ReadTimeout`` (no answer in time),
``ConnectionBroken`` (the connection died mid-answer or the answer was not HTTP),
``LocalResourcesExhausted`` (this process or host could not open a socket at all: out of
file descriptors, buffers or local ports; the upstream was never tried) and
``PoolExhausted`` (every connection the origin may have was in use for the whole wait:
the upstream is busy with this client's other requests, and was not tried).
"""

from __future__ import annotations

import asyncio
import errno
import ssl
from collections import deque
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any, AsyncIterator
from urllib.parse import urlsplit

import httptools


class HTTPClientError(Exception):
    """Base of the client's errors."""


class ConnectFailed(HTTPClientError):
    pass


class ReadTimeout(HTTPClientError):
    pass


class ConnectionBroken(HTTPClientError):
    pass


class LocalResourcesExhausted(HTTPClientError):
    """A socket could not be opened on this side (EMFILE, ENFILE, ENOBUFS, ENOMEM,
    EADDRNOTAVAIL): a fault of the caller's host, not of the upstream."""


class PoolExhausted(HTTPClientError):
    """All of the origin's connections stayed in use past the wait for one."""


LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL})


@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str
    port: int
    path_prefix: str

    @cached_property   # per request otherwise, and IDNA encoding is not cheap
    def host_header(self) -> bytes:
        default = 443 if self.scheme == "https" else 80
        return (self.host if self.port == default else f"{self.host}:{self.port}").encode("idna")


@lru_cache(maxsize=1024)
def split_url(url: str) -> tuple[Origin, str]:
    """The origin and the request target (path and query) of a URL; cached, as the
    gateway sends to the same few URLs over and over."""
    parts = urlsplit(url)
    return parse_origin(url), (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def parse_origin(url: str) -> Origin:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return Origin(parts.scheme, parts.hostname, port, parts.path.rstrip("/"))


_SENTINEL = object()


async def _wait(fut: asyncio.Future, timeout: float | None) -> Any:
    """``await fut``, raising ``TimeoutError`` once ``timeout`` seconds have passed: a
    timer that fails the future, cheaper than ``asyncio.timeout`` (which cancels and
    un-cancels the task) on a path taken twice per proxied request."""
    if timeout is None:
        return await fut
    timer = asyncio.get_running_loop().call_later(timeout, _expire, fut)
    try:
        return await fut
    finally:
        timer.cancel()


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


class _Conn(asyncio.Protocol):
    """One connection; carries one exchange at a time. Body chunks (then ``_SENTINEL`` or
    an exception) go to ``inbox``; ``waiter`` wakes the reader when it has caught up."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.headers_done: asyncio.Future | None = None
        self.inbox: deque = deque()
        self.waiter: asyncio.Future | None = None
        self.headers: dict[str, str] = {}
        self.got_bytes = False
        self.complete = False
        self.closed = False
        self.reused = False
        self.keep_alive = False

    # --- asyncio.Protocol -------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionBroken(f"upstream sent invalid HTTP: {exc}"))
            self.transport.close()

    def connection_lost(self, exc) -> None:
        self.closed = True
        if not self.complete:
            self._fail(ConnectionBroken("upstream closed the connection" + (f" ({exc})" if exc else "")))

    # --- httptools callbacks --------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        # Read it now: llhttp resets the flag once the message is complete.
        self.keep_alive = self.parser.should_keep_alive()
        if self.headers_done is not None and not self.headers_done.done():
            self.headers_done.set_result(self.parser.get_status_code())

    def on_body(self, body: bytes) -> None:
        self._deliver(body)

    def on_message_complete(self) -> None:
        self.complete = True
        self._deliver(_SENTINEL)

    # --- helpers ----------------------------------------------------------------
    def _deliver(self, item) -> None:
        self.inbox.append(item)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _fail(self, exc: Exception) -> None:
        if self.headers_done is not None and not self.headers_done.done():
            self.headers_done.set_exception(exc)
        self._deliver(exc)

    def start(self, request: bytes) -> asyncio.Future:
        self.headers_done = asyncio.get_running_loop().create_future()
        self.headers = {}
        self.got_bytes = self.complete = self.keep_alive = False
        self.inbox = deque()
        self.transport.write(request)
        return self.headers_done

    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.closed and not self.transport.is_closing()


@dataclass
class Response:
    """An answer whose body is read with ``read()`` or ``iter_chunks()``; ``release()``
    returns the connection to the pool (or closes it if the body was not read to the end)."""

    status: int
    headers: dict[str, str]
    _conn: _Conn
    _pool: "_OriginPool"
    _read_timeout: float | None
    _released: bool = field(default=False)

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """Body chunks as they arrive; chunks already received are merged into one, so a
        consumer that falls behind catches up in fewer (and larger) writes."""
        conn = self._conn
        while True:
            if not conn.inbox:
                conn.waiter = asyncio.get_running_loop().create_future()
                try:
                    await _wait(conn.waiter, self._read_timeout)
                except TimeoutError:
                    raise ReadTimeout("upstream stopped sending") from None
                finally:
                    conn.waiter = None
            item = conn.inbox.popleft()
            if item is _SENTINEL:
                return
            if isinstance(item, Exception):
                raise item
            parts = [item]
            while conn.inbox and isinstance(conn.inbox[0], bytes):
                parts.append(conn.inbox.popleft())
            yield parts[0] if len(parts) == 1 else b"".join(parts)

    async def read(self) -> bytes:
        try:
            inbox = self._conn.inbox
            if inbox and inbox[-1] is _SENTINEL:   # all here already (a short answer): no waiting
                inbox.pop()
                if all(type(c) is bytes for c in inbox):
                    body = b"".join(inbox)
                    inbox.clear()
                    return body
                inbox.append(_SENTINEL)
            return b"".join([c async for c in self.iter_chunks()])
        finally:
            self.release()

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._pool.put(self._conn)


class _OriginPool:
    def __init__(self, origin: Origin, limit: int, ssl_ctx: ssl.SSLContext | None):
        self.origin = origin
        self.idle: deque[_Conn] = deque()
        self.limit = limit
        self.slots = asyncio.Semaphore(limit)
        self.ssl_ctx = ssl_ctx
        self.in_use = 0   # connections handed out and not yet put back or discarded

    async def get(self, connect_timeout: float | None) -> _Conn:
        if not self.slots.locked():
            await self.slots.acquire()
        else:   # every connection is in use: wait for one as long as for a connect
            try:
                await asyncio.wait_for(self.slots.acquire(), connect_timeout)
            except asyncio.TimeoutError:
                raise PoolExhausted(f"all {self.limit} connections to {self.origin.host}:{self.origin.port} "
                                    f"stayed in use for {connect_timeout} s") from None
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed and not conn.transport.is_closing():
                conn.reused = True
                self.in_use += 1
                return conn
        try:
            loop = asyncio.get_running_loop()
            _, conn = await asyncio.wait_for(
                loop.create_connection(_Conn, self.origin.host, self.origin.port, ssl=self.ssl_ctx),
                connect_timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            self.slots.release()
            if getattr(exc, "errno", None) in LOCAL_ERRNOS:
                raise LocalResourcesExhausted(f"cannot open a connection to {self.origin.host}:{self.origin.port} "
                                              f"here: {exc.strerror or exc}") from exc
            raise ConnectFailed(f"cannot connect to {self.origin.host}:{self.origin.port} "
                                f"({type(exc).__name__}: {exc})") from exc
        except BaseException:
            self.slots.release()
            raise
        self.in_use += 1
        return conn

    def put(self, conn: _Conn) -> None:
        if conn.reusable():
            self.idle.append(conn)
        elif conn.transport is not None:
            conn.transport.close()
        self.in_use -= 1
        self.slots.release()

    def discard(self, conn: _Conn) -> None:
        if conn.transport is not None:
            conn.transport.close()
        self.in_use -= 1
        self.slots.release()

    def close(self) -> None:
        while self.idle:
            self.idle.pop().transport.close()


class HTTP1Client:
    """``await client.request("POST", url, body, headers)`` -> ``Response`` once headers arrived."""

    def __init__(self, max_connections_per_origin: int = 512, connect_timeout: float = 5.0,
                 read_timeout: float = 120.0):
        self.limit = max_connections_per_origin
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._pools: dict[tuple, _OriginPool] = {}
        self._ssl: ssl.SSLContext | None = None

    def _pool(self, origin: Origin) -> _OriginPool:
        key = (origin.scheme, origin.host, origin.port)
        pool = self._pools.get(key)
        if pool is None:
            if origin.scheme == "https" and self._ssl is None:
                self._ssl = ssl.create_default_context()
            pool = self._pools[key] = _OriginPool(origin, self.limit, self._ssl if origin.scheme == "https" else None)
        return pool

    async def request(self, method: str, url: str, body: bytes = b"", headers: dict[str, str] | None = None,
                      read_timeout: float | None = -1.0) -> Response:
        """Send; wait for the status line and headers (within ``read_timeout``, default the client's)."""
        origin, path = split_url(url)
        lines = [f"{method} {path} HTTP/1.1".encode(), b"host: " + origin.host_header,
                 b"content-length: " + str(len(body)).encode()]
        lines += [f"{k}: {v}".encode("latin-1") for k, v in (headers or {}).items()]
        raw = b"\r\n".join(lines) + b"\r\n\r\n" + body
        timeout = self.read_timeout if read_timeout == -1.0 else read_timeout
        pool = self._pool(origin)
        for attempt in (0, 1):
            conn = await pool.get(self.connect_timeout)
            timer = None
            try:
                headers_done = conn.start(raw)   # what _wait does, without a coroutine per request
                if timeout is not None:
                    timer = headers_done.get_loop().call_later(timeout, _expire, headers_done)
                status = await headers_done
            except ConnectionBroken:
                pool.discard(conn)
                if attempt == 0 and conn.reused and not conn.got_bytes:
                    continue  # a stale keep-alive connection: try once more on a fresh one
                raise
            except TimeoutError:
                pool.discard(conn)
                raise ReadTimeout(f"no answer from {origin.host}:{origin.port} within {timeout} s") from None
            except BaseException:
                pool.discard(conn)  # cancelled (client went away): the connection is mid-exchange
                raise
            finally:
                if timer is not None:
                    timer.cancel()
            return Response(status, conn.headers, conn, pool, timeout)
        raise AssertionError("unreachable")

    def in_use(self, url: str) -> int:
        """Connections to ``url``'s origin handed out and not yet back: this client's
        requests in flight there (a stream holds its connection to the end)."""
        try:
            origin = split_url(url)[0]
        except ValueError:
            return 0
        pool = self._pools.get((origin.scheme, origin.host, origin.port))
        return 0 if pool is None else pool.in_use

    def connection_counts(self) -> list[tuple[str, int, int, int]]:
        """``(origin, in use, idle, limit)`` per origin this client has called, the
        origin as ``scheme://host:port``. A connection in use that never comes back
        (an answer nobody read to the end or released) shows here as a lasting in-use
        count; once all ``limit`` are, calls to that origin fail with ``PoolExhausted``."""
        return [(f"{scheme}://{host}:{port}", pool.in_use, len(pool.idle), pool.limit)
                for (scheme, host, port), pool in self._pools.items()]

    async def aclose(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
