"""uvicorn's httptools protocol, with the gateway's proxy routes answered without ASGI.

``switchyard serve`` runs uvicorn with ``http=GatewayProtocol``. uvicorn still does all
the HTTP/1.1 work (parsing, keep-alive, pipelining, flow control, 100-continue, the
concurrency limit, graceful shutdown, worker processes); everything that is not a
``POST`` to a hot route of the ``FastPath`` app (``/v1/chat/completions``,
``/v1/completions``, ``/v1/embeddings``) goes through ASGI exactly as before. A hot request instead runs its
handler on the request uvicorn parsed and writes the Starlette ``Response`` the handler
returned straight to the socket:

- the status line, headers and body of a plain answer in one write (uvicorn's ASGI
  cycle writes the head and the body separately: two system calls, two TCP segments);
- a ``StreamingResponse`` as chunked transfer encoding, chunk by chunk, waiting while
  the socket's buffer is full and stopping (closing the body iterator, and with it the
  upstream stream) once the client has gone;
- no ASGI message dicts, no ``ProxyHeadersMiddleware`` (the hot routes read no client
  address) and none of uvicorn's per-message checks beyond the header-value one.

This leans on uvicorn internals (``HttpToolsProtocol._start_asgi_task`` and the fields
of its ``RequestResponseCycle``). :func:`http_protocol` checks they are there and that
uvicorn is at least ``MIN_UVICORN`` (older releases decide keep-alive differently), and
otherwise falls back to plain ``"httptools"`` with a warning, so an unsuitable uvicorn
costs speed, not correctness; the gateway tests run through this class.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import time
from typing import Any, Callable

from starlette.responses import Response, StreamingResponse

log = logging.getLogger(__name__)

# The oldest uvicorn the protocol is used with: 0.45-0.52 have the same methods but keep a
# connection alive after a client's "Connection: close"; tests/router_gateway/
# test_http_server.py passes on 0.53 and 0.55.
MIN_UVICORN = (0, 53)


def too_old(version: str) -> str | None:
    """Why this uvicorn ``version`` is too old for :class:`GatewayProtocol`, or None."""
    release = []
    for piece in version.split(".")[:3]:
        digits = "".join(itertools.takewhile(str.isdigit, piece))
        if not digits:
            break
        release.append(int(digits))
    if tuple(release) >= MIN_UVICORN:
        return None
    return f"uvicorn {version} is older than {'.'.join(map(str, MIN_UVICORN))}"


try:
    import uvicorn
    from uvicorn.protocols.http.flow_control import service_unavailable
    from uvicorn.protocols.http.httptools_impl import (
        HEADER_VALUE_RE,
        STATUS_LINE,
        HttpToolsProtocol,
        RequestResponseCycle,
    )
except ImportError as exc:  # no httptools, or a uvicorn that moved these
    _MISSING: str | None = f"{type(exc).__name__}: {exc}"
    HttpToolsProtocol = object  # type: ignore[assignment,misc]
else:
    _CYCLE_FIELDS = ("scope", "transport", "flow", "receive", "keep_alive", "disconnected",
                     "response_started", "response_complete", "message_event", "on_response",
                     "default_headers", "waiting_for_100_continue")
    _missing = [f for f in _CYCLE_FIELDS if not hasattr(RequestResponseCycle, f)
                and f not in RequestResponseCycle.__init__.__code__.co_names]
    _MISSING = (None if hasattr(HttpToolsProtocol, "_start_asgi_task") and not _missing
                else f"uvicorn's HttpToolsProtocol lacks {_missing or ['_start_asgi_task']}")
    _MISSING = _MISSING or too_old(uvicorn.__version__)

CHUNK_END = b"0\r\n\r\n"


def http_protocol() -> Any:
    """What to pass as uvicorn's ``http=``: :class:`GatewayProtocol`, or ``"httptools"``
    (with a warning) where this uvicorn does not have what it needs."""
    if _MISSING is None:
        return GatewayProtocol
    log.warning("serving every route through ASGI (slower): %s", _MISSING)
    return "httptools"


def fast_path_of(app: Any) -> Any:
    """The ``FastPath`` under uvicorn's middleware wrappers (they keep it in ``.app``)."""
    from router_gateway.app import FastPath

    for _ in range(8):
        if isinstance(app, FastPath):
            return app
        app = getattr(app, "app", None)
    return None


class GatewayProtocol(HttpToolsProtocol):  # type: ignore[misc,valid-type]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fast = fast_path_of(self.app)

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        scope = cycle.scope
        handler = None
        if self.fast is not None and app is not service_unavailable and scope["method"] == "POST":
            handler = self.fast.routes.get(scope["path"])
        if handler is None:
            super()._start_asgi_task(cycle, app)
            return
        coro = self._serve(cycle, handler)
        if getattr(self.config, "reset_contextvars", False):   # uvicorn's opt-in, where it has it
            task = self.loop.create_task(coro, context=contextvars.Context())
        else:
            task = self.loop.create_task(coro)
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    async def _serve(self, cycle: RequestResponseCycle, handler: Callable) -> None:
        fast = self.fast
        trace = fast.begin(cycle.scope)
        token = trace.enter()
        try:
            body = None if cycle.more_body else bytes(cycle.body)   # all there: no receive()
            response = await fast.answer(handler, cycle.scope, cycle.receive, body)
            await send_response(cycle, response, trace)
        except BaseException as exc:
            # What uvicorn does when an ASGI app fails: a 500 if nothing was sent yet,
            # else drop the connection (the client sees a cut-off answer, not a wrong one).
            if not isinstance(exc, Exception):
                cycle.transport.close()
                raise
            log.error("error while answering %s", trace.rid, exc_info=exc)
            if not cycle.response_started and not cycle.disconnected:
                from router_gateway.dispatch import internal_error_response

                cycle.keep_alive = False
                await send_response(cycle, internal_error_response(exc), trace)
            else:
                cycle.transport.close()
        finally:
            cycle.on_response = _nothing
            fast.finish(trace)
            trace.leave(token)


def _nothing() -> None:
    pass


async def send_response(cycle: RequestResponseCycle, response: Response, trace: Any) -> None:
    """Write ``response`` on ``cycle``'s connection as uvicorn's ASGI ``send`` would, and
    note its status, ``x-switchyard-*`` headers and end time on ``trace``."""
    headers = response.raw_headers
    headers.append((b"x-request-id", trace.rid.encode()))
    trace.read_response_headers(response.status_code, headers)
    if cycle.flow.write_paused and not cycle.disconnected:
        await cycle.flow.drain()
    if cycle.disconnected:
        trace.ended = time.perf_counter()
        if isinstance(response, StreamingResponse):
            await _close(response.body_iterator)
        return
    if HEADER_VALUE_RE.search(b"\t".join([v for _, v in headers])):   # tab is allowed
        bad = next(n for n, v in headers if HEADER_VALUE_RE.search(v))
        if isinstance(response, StreamingResponse):
            await _close(response.body_iterator)   # its upstream connection goes back
        raise RuntimeError(f"invalid value for response header {bad!r}")
    head = [STATUS_LINE[response.status_code]]
    for name, value in (*cycle.default_headers, *headers):
        head += (name, b": ", value, b"\r\n")
    if not cycle.keep_alive:
        head.append(b"connection: close\r\n")
    transport = cycle.transport
    cycle.response_started = True
    cycle.waiting_for_100_continue = False
    if isinstance(response, StreamingResponse):
        head.append(b"transfer-encoding: chunked\r\n\r\n")
        await _stream_body(cycle, response, b"".join(head))
    else:
        head += (b"\r\n", response.body)
        transport.write(b"".join(head))
    trace.ended = time.perf_counter()
    cycle.response_complete = True
    cycle.message_event.set()
    if not cycle.keep_alive:
        transport.close()
    cycle.on_response()
    if response.background is not None:
        await response.background()


async def _stream_body(cycle: RequestResponseCycle, response: StreamingResponse, head: bytes) -> None:
    """The head, then each chunk of the body in chunked encoding, then the last chunk.
    What is written in one turn of the event loop goes out in one system call (see
    :class:`_Corked`): the head with the first events (already read when the answer
    starts), the last events with the terminating chunk."""
    flow = cycle.flow
    out = _Corked(cycle.transport)
    out.write(head)
    body = response.body_iterator
    ended = False
    try:
        async for chunk in body:
            if not isinstance(chunk, (bytes, memoryview)):
                chunk = chunk.encode(response.charset)
            if not chunk:
                continue
            if flow.write_paused and not cycle.disconnected:
                out.flush()
                await flow.drain()
            if cycle.disconnected:
                return
            out.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        ended = True
    finally:
        await _close(body)
        if ended and not cycle.disconnected:   # a body that failed leaves the answer cut off
            out.write(CHUNK_END)
        out.flush()


class _Corked:
    """A transport's writes held until the writer's task waits or calls :meth:`flush`.

    Writing a chunk to a socket costs one system call and, on loopback, the work of
    waking its reader; a stream's pieces that are ready together (the head and the first
    events, the last events and the terminating chunk) go out together. A piece waits at
    most until the current task next suspends: the flush is scheduled with ``call_soon``.
    """

    __slots__ = ("transport", "parts")

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self.parts:
            asyncio.get_running_loop().call_soon(self.flush)
        self.parts.append(data)

    def flush(self) -> None:
        if self.parts:
            data = b"".join(self.parts)
            self.parts.clear()
            if not self.transport.is_closing():
                self.transport.write(data)


async def _close(body: Any) -> None:
    close = getattr(body, "aclose", None)
    if close is not None:
        await close()
