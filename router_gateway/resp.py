"""Redis commands packed by hand and sent in one round trip, for the request path's
background writers (the decision log, the response cache).

redis-py's pipeline packs every argument of every command in Python and wraps each reply
in a timeout context; for the small, fixed commands these writers send, packing the
bytes once and reading the replies with redis-py's own (hiredis) parser costs a fraction
of that. Replies come back as the parser reads them; an error reply raises.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any


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
            return [await conn.read_response(disable_decoding=raw, timeout=math.inf) for _ in range(replies)]
    except BaseException:
        await conn.disconnect()
        raise
    finally:
        await pool.release(conn)
