"""Redis commands packed by hand and sent in one round trip, for the request path's
Redis traffic (the decision log, the response cache, the Responses API's pins), and a
batcher that sends the calls of one event-loop turn together.

redis-py's pipeline packs every argument of every command in Python and wraps each reply
in a timeout context; for the small, fixed commands these writers send, packing the
bytes once and reading the replies with redis-py's own (hiredis) parser costs a fraction
of that. Replies come back as the parser reads them; an error reply raises.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any, Awaitable, Callable


def bulk(value: str | bytes) -> bytes:
    """One bulk string of the Redis protocol (text is sent as UTF-8, a lone surrogate as '?')."""
    data = value.encode("utf-8", "replace") if isinstance(value, str) else value
    return b"$%d\r\n%s\r\n" % (len(data), data)


def command(*args: str | bytes) -> bytes:
    """One command (a RESP2 array of bulk strings)."""
    return b"*%d\r\n" % len(args) + b"".join(bulk(a) for a in args)


async def roundtrip(aredis: Any, payload: bytes, replies: int, raw: bool = False) -> list[Any]:
    """Send ``payload`` (packed commands) down one pooled connection of ``aredis`` and read
    ``replies`` replies, all within one timeout of the connection's ``socket_timeout``;
    ``raw``: bulk strings come back as bytes even on a decoding client. A connection that
    failed midway may hold unread replies, so it is dropped, never reused."""
    pool = aredis.connection_pool
    conn = await pool.get_connection()
    try:
        await conn.send_packed_command(payload, check_health=False)
        async with asyncio.timeout(getattr(conn, "socket_timeout", None)):
            return await _read_replies(conn, replies, raw)
    except BaseException:
        await conn.disconnect()
        raise
    finally:
        await pool.release(conn)


try:
    from redis._parsers.hiredis import NOT_ENOUGH_DATA as _NOT_ENOUGH_DATA
except ImportError:   # a redis-py that lays its parsers out otherwise: hiredis's own "not yet"
    _NOT_ENOUGH_DATA = False


async def _read_replies(conn: Any, n: int, raw: bool) -> list[Any]:
    """``n`` replies from ``conn``. Where redis-py parses with hiredis, straight from its
    ``hiredis.Reader``: ``read_response`` costs about 2 us of Python per reply (a
    coroutine, a timeout, checks), which for a batch of decision-log entries was about as
    much as packing them. Elsewhere (no hiredis, another redis-py layout), one
    ``read_response`` per reply."""
    parser = getattr(conn, "_parser", None)
    reader = getattr(parser, "_reader", None)
    fill = getattr(parser, "read_from_socket", None)
    if n < 2 or reader is None or fill is None or not hasattr(reader, "gets"):
        return [await conn.read_response(disable_decoding=raw, timeout=math.inf) for _ in range(n)]
    out: list[Any] = []
    gets = reader.gets
    while len(out) < n:
        reply = gets(False) if raw else gets()
        if reply is _NOT_ENOUGH_DATA or reply is False:
            await fill()
            continue
        if isinstance(reply, Exception):   # an error reply; redis-py raises the same
            raise reply
        out.append(reply)
    return out


class Batcher:
    """Calls made in one turn of the event loop, sent together: ``await call(item)`` waits
    for ``send(items)`` (one round trip for the whole batch) and returns the result for
    its own item; when ``send`` raises, every call of that batch raises the same error.
    A caller that goes away (cancelled) leaves its batch to finish for the others."""

    def __init__(self, send: Callable[[list[Any]], Awaitable[list[Any]]]):
        self._send = send
        self._pending: list[tuple[Any, asyncio.Future]] = []
        self._tasks: set[asyncio.Task] = set()

    async def call(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        answer = loop.create_future()
        self._pending.append((item, answer))
        if len(self._pending) == 1:
            loop.call_soon(self._flush)
        ok, value = await answer
        if not ok:
            raise value
        return value

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:   # drain() sent it already
            return
        task = asyncio.ensure_future(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Send what waits and wait for every batch in flight (at shutdown, and in tests)."""
        self._flush()
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(self, batch: list[tuple[Any, asyncio.Future]]) -> None:
        # Results travel as (ok, value) so that a failure no caller waits for any more is
        # not reported as an exception never retrieved.
        try:
            results = [(True, r) for r in await self._send([item for item, _ in batch])]
        except Exception as exc:
            results = [(False, exc)] * len(batch)
        for (_, answer), result in zip(batch, results):
            if not answer.done():
                answer.set_result(result)


async def mget(aredis: Any, keys: list[str], timeout_s: float) -> list[bytes | None]:
    """One ``MGET`` of ``keys`` (values as bytes), within ``timeout_s``."""
    async with asyncio.timeout(timeout_s):
        [values] = await roundtrip(aredis, command("MGET", *keys), 1, raw=True)
    return values
