"""The response cache: a repeated request answered from Redis instead of an expert.

Off until ``SWITCHYARD_CACHE_TTL_S`` is above 0. Then every chat completion, text
completion and embeddings request is looked up by a hash of its endpoint and its whole
JSON body (keys sorted, so their order does not matter; with ``SWITCHYARD_CACHE_PER_KEY``
the caller's key id too). A hit is answered from the stored bytes at once, with
``x-switchyard-cache: hit`` and ``x-switchyard-cache-age``; nothing is paid for it and it
books no tokens (the key's request rate still counts it). A miss goes to the expert as
usual, and its answer is stored when it is a 200 (a stream: when it ended with
``data: [DONE]`` and carried no error) of at most ``SWITCHYARD_CACHE_MAX_ENTRY_BYTES``.

A miss that is not streamed, made while an identical request is being asked of an expert
in this process, waits for that answer and gets it as a hit (request coalescing); when
that request fails, each waiting one asks for itself.

A client decides per request with ``x-switchyard-cache``: ``on`` (the default), ``off``
(neither read nor write) or ``refresh`` (ask the expert, store its answer); the HTTP
``Cache-Control`` request directives ``no-store`` and ``no-cache`` mean ``off`` and
``refresh``. Entries are shared by every gateway process on the Redis::

    {prefix}cache:SHA256   string  one JSON line (stored at, stream, expert, router), then the body

and expire after the TTL. A Redis that does not answer makes every lookup a miss and
every store a no-op (counted in ``switchyard_cache_total{result="error"}``), never an
error for the client; a lookup waits at most ``LOOKUP_TIMEOUT_S`` for it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterator

import orjson
from starlette.responses import Response, StreamingResponse

from router_gateway.errors import InvalidRequest
from router_gateway.resp import Batcher, command, mget, roundtrip

log = logging.getLogger(__name__)

MODES = ("on", "off", "refresh")
LOOKUP_TIMEOUT_S = 1.0   # a Redis that hangs makes a lookup a miss after this, not a hung request


def cache_mode(headers: Any) -> str:
    """The request's cache mode from ``x-switchyard-cache`` (a 400 for anything but
    ``on``, ``off`` or ``refresh``), else from ``Cache-Control`` (``no-store``: off,
    ``no-cache``: refresh; other directives are ignored), else ``on``."""
    value = headers.get("x-switchyard-cache")
    if value is not None:
        mode = value.strip().lower()
        if mode not in MODES:
            raise InvalidRequest(f"x-switchyard-cache must be one of {', '.join(MODES)}; got {value[:40]!r}",
                                 code="invalid_cache")
        return mode
    control = headers.get("cache-control")
    if control:
        directives = {d.strip().lower().partition("=")[0] for d in control.split(",")}
        if "no-store" in directives:
            return "off"
        if "no-cache" in directives:
            return "refresh"
    return "on"


@dataclass(frozen=True, slots=True)
class Hit:
    content: bytes
    stream: bool
    expert: str
    router: str
    age_s: float

    def response(self) -> Response:
        headers = {"x-switchyard-cache": "hit", "x-switchyard-cache-age": str(int(self.age_s)),
                   "x-switchyard-expert": self.expert, "x-switchyard-router": self.router}
        return Response(self.content, media_type="text/event-stream" if self.stream else "application/json",
                        headers=headers)


class ResponseCache:
    """Lookups and stores for one gateway process (see the module docstring)."""

    def __init__(self, aredis: Any, prefix: str, ttl_s: float, max_entry_bytes: int, per_key: bool = False,
                 count: Callable[[str, int], None] = lambda result, n=1: None):
        self.r = aredis
        self.prefix = f"{prefix}cache:"
        self.ttl_ms = max(1, round(ttl_s * 1000)) if ttl_s > 0 else 0
        self.max_entry_bytes = max_entry_bytes
        self.per_key = per_key
        self.count = count
        self._tasks: set[asyncio.Task] = set()
        self._lookups = Batcher(lambda keys: mget(aredis, keys, LOOKUP_TIMEOUT_S))
        self._stores: list[bytes] = []
        self._flights: dict[str, asyncio.Future] = {}
        self._failing = False

    def key(self, endpoint: str, body: dict, key_id: str) -> str | None:
        """The entry's Redis key for this request, or None for a body that does not
        serialise back to JSON (then it is not cached)."""
        try:
            raw = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
        except (TypeError, orjson.JSONEncodeError):
            return None
        h = hashlib.sha256(endpoint.encode())
        if self.per_key:
            h.update(b"\0" + key_id.encode())
        h.update(b"\0" + raw)
        return self.prefix + h.hexdigest()

    async def get(self, key: str) -> Hit | None:
        """The entry under ``key``, or None (a miss; also when Redis fails or is slow).
        Lookups asked for in one turn of the event loop go to Redis as one ``MGET``."""
        try:
            raw = await self._lookups.call(key)
        except Exception as exc:   # Redis down or slow (or anything else): this lookup misses
            self._failed("read", exc if not isinstance(exc, TimeoutError) else f"no answer in {LOOKUP_TIMEOUT_S} s")
            return None
        self._recovered()
        hit = _decode(raw) if raw is not None else None
        self.count("hit" if hit is not None else "miss")
        return hit

    def put(self, key: str, content: bytes, *, stream: bool, expert: str, router: str) -> None:
        """Store an answer in the background; the answer to the client never waits on it.
        Stores made in one turn of the event loop go to Redis in one round trip."""
        if len(content) > self.max_entry_bytes:
            self.count("too_large")
            return
        meta = orjson.dumps({"t": time.time(), "stream": stream, "expert": expert, "router": router})
        self._stores.append(command("SET", key, meta + b"\n" + content, "PX", str(self.ttl_ms)))
        if len(self._stores) == 1:
            asyncio.get_running_loop().call_soon(self._send_stores)

    def _send_stores(self) -> None:
        batch, self._stores = self._stores, []
        if batch:
            self._spawn(self._set(batch))

    async def _set(self, batch: list[bytes]) -> None:
        try:
            await roundtrip(self.r, b"".join(batch), len(batch))
        except Exception as exc:   # the answers went out; these are not cached
            self._failed("write", exc, len(batch))
            return
        self._recovered()
        self.count("stored", len(batch))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def keep(self, response: Response, key: str, leads: bool = False) -> Response:
        """Store ``response`` (the expert's answer to the request ``key`` names) once it is
        known to be whole: a 200 JSON answer now, a stream when it has ended cleanly.
        ``leads``: the request leads a flight (:meth:`join`), which this settles."""
        if response.status_code != 200:
            if leads:
                self.settle(key, None)
            return response
        expert = response.headers.get("x-switchyard-expert", "")
        router = response.headers.get("x-switchyard-router", "")
        if isinstance(response, StreamingResponse):
            response.body_iterator = _Tap(response.body_iterator, self.max_entry_bytes, lambda whole: self.put(
                key, whole, stream=True, expert=expert, router=router))
        else:
            content = bytes(response.body)
            self.put(key, content, stream=False, expert=expert, router=router)
            if leads:
                self.settle(key, Hit(content, False, expert, router, 0.0))
        return response

    def join(self, key: str) -> asyncio.Future | None:
        """Request coalescing, for non-streamed answers: the answer of an identical request
        that is being asked of an expert in this process right now, to wait on (it gives
        the answer's :class:`Hit`, or None when that request did not get a 200); None when
        there is none, and then this request leads one and must :meth:`settle` it."""
        flight = self._flights.get(key)
        if flight is None:
            self._flights[key] = asyncio.get_running_loop().create_future()
        return flight

    def settle(self, key: str, hit: Hit | None) -> None:
        """End the flight ``key`` leads, handing its waiters ``hit``."""
        flight = self._flights.pop(key, None)
        if flight is not None and not flight.done():
            flight.set_result(hit)

    async def drain(self) -> None:
        """Send what waits and wait for what is in flight (at shutdown, and in tests)."""
        if self._stores:
            self._send_stores()
        await self._lookups.drain()
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _failed(self, what: str, exc: object, n: int = 1) -> None:
        self.count("error", n)
        if not self._failing:
            log.warning("response cache: could not %s Redis (lookups miss until it answers): %s", what, exc)
        self._failing = True

    def _recovered(self) -> None:
        if self._failing:
            log.info("response cache: Redis answers again")
            self._failing = False


def _decode(raw: bytes) -> Hit | None:
    """An entry as :meth:`ResponseCache.put` wrote it; anything else (written by hand, or
    by another version) is a miss."""
    line, sep, content = raw.partition(b"\n")
    try:
        meta = orjson.loads(line) if sep else None
    except orjson.JSONDecodeError:
        return None
    if not (isinstance(meta, dict) and isinstance(meta.get("t"), (int, float)) and isinstance(meta.get("stream"), bool)
            and isinstance(meta.get("expert"), str) and isinstance(meta.get("router"), str)):
        return None
    return Hit(content, meta["stream"], meta["expert"], meta["router"], max(0.0, time.time() - meta["t"]))


_DONE = b"data: [DONE]\n\n"


def whole_stream(data: bytes) -> bool:
    """A relayed stream that is worth replaying: it ended with ``data: [DONE]`` and no
    event in it is an error (the gateway's frame for a stream that broke, or the
    upstream's own)."""
    return data.endswith(_DONE) and b'data: {"error"' not in data


class _Tap:
    """A streamed answer's body, passed through unchanged, that hands the whole of it to
    ``store`` when it ended cleanly and was at most ``limit`` bytes (a client that left
    early, a broken stream or a long one stores nothing)."""

    __slots__ = ("_body", "_parts", "_size", "_limit", "_store")

    def __init__(self, body: AsyncIterator[bytes], limit: int, store: Callable[[bytes], None]):
        self._body, self._limit, self._store = body, limit, store
        self._parts: list[bytes] | None = []
        self._size = 0

    def __aiter__(self) -> _Tap:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = await self._body.__anext__()
        except StopAsyncIteration:
            parts, self._parts = self._parts, None
            if parts is not None:
                whole = b"".join(parts)
                if whole_stream(whole):
                    self._store(whole)
            raise
        parts = self._parts
        if parts is not None:
            self._size += len(chunk)
            if self._size > self._limit:
                self._parts = None
            else:
                parts.append(bytes(chunk))
        return chunk

    async def aclose(self) -> None:
        self._parts = None
        close = getattr(self._body, "aclose", None)
        if close is not None:
            await close()


# --- the CLI's view (``switchyard cache``): a synchronous client on the same Redis -----------

def _entries(client: Any, prefix: str) -> Iterator[list[str]]:
    """The cache's keys, in batches of SCAN's size (glob characters in ``prefix`` escaped)."""
    pattern = re.sub(r"([*?\[\]\\])", r"\\\1", f"{prefix}cache:") + "*"
    cursor = 0
    while True:
        cursor, keys = client.scan(cursor, match=pattern, count=1000)
        if keys:
            yield keys
        if not cursor:
            return


def cache_stats(client: Any, prefix: str) -> tuple[int, int]:
    """(entries, bytes of their values) stored now."""
    n = size = 0
    for keys in _entries(client, prefix):
        pipe = client.pipeline(transaction=False)
        for k in keys:
            pipe.strlen(k)
        lengths = pipe.execute()
        n += sum(1 for x in lengths if x)
        size += sum(lengths)
    return n, size


def clear_cache(client: Any, prefix: str) -> int:
    """Remove every cached answer (all of them: entries are keyed by a hash of the request,
    so there is no telling one expert's from another's); returns how many were removed."""
    removed = 0
    for keys in _entries(client, prefix):
        removed += client.unlink(*keys)
    return removed
