"""Hand-packed Redis round trips (``router_gateway.resp.roundtrip``) against a real
embedded Redis: replies in order, decoded or raw, across many socket reads, an error
reply mid-batch, and the hiredis reader path that batches of replies take."""

from __future__ import annotations

import asyncio

import pytest
import redis
from redis.asyncio.connection import AbstractConnection

from expert_registry.store import ExpertStore, open_async_redis
from router_gateway.resp import command, roundtrip


def _run(store: ExpertStore, body) -> None:
    async def main() -> None:
        aredis = open_async_redis(store.client, None, 4)
        try:
            await body(aredis)
        finally:
            await aredis.aclose()

    asyncio.run(main())


def test_replies_come_back_in_order_decoded_or_raw(store: ExpertStore):
    async def body(aredis) -> None:
        payload = command("SET", "k", "välue") + command("GET", "k") + command("GET", "missing") + command(
            "INCRBY", "n", "5") + command("RPUSH", "l", "a", "b") + command("LRANGE", "l", "0", "-1")
        assert await roundtrip(aredis, payload, 6) == ["OK", "välue", None, 5, 2, ["a", "b"]]
        assert await roundtrip(aredis, command("GET", "k") + command("LRANGE", "l", "0", "-1"), 2, raw=True) == [
            "välue".encode(), [b"a", b"b"]]
        assert await roundtrip(aredis, command("GET", "k"), 1) == ["välue"]

    _run(store, body)


def test_a_batch_larger_than_one_socket_read(store: ExpertStore):
    """2,000 replies of 1 KiB: many reads of the socket, each reply whole and in order."""
    async def body(aredis) -> None:
        values = [f"{i:04d}" + "x" * 1020 for i in range(2000)]
        assert await roundtrip(aredis, b"".join(command("SET", f"k{i}", v) for i, v in enumerate(values)),
                               len(values)) == ["OK"] * len(values)
        got = await roundtrip(aredis, b"".join(command("GET", f"k{i}") for i in range(len(values))), len(values))
        assert got == values

    _run(store, body)


def test_an_error_reply_raises_and_its_connection_is_not_reused(store: ExpertStore):
    async def body(aredis) -> None:
        payload = command("SET", "s", "1") + command("LPUSH", "s", "x") + command("GET", "s")
        with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
            await roundtrip(aredis, payload, 3)
        # The next round trip reads its own replies, not the one left unread above.
        assert await roundtrip(aredis, command("GET", "s") + command("EXISTS", "s"), 2) == ["1", 1]

    _run(store, body)


def test_batches_are_read_without_a_read_response_per_reply(store: ExpertStore, monkeypatch):
    """With the installed redis-py and hiredis, a batch's replies come straight from the
    hiredis reader (about 2 us of Python less per reply). If a redis-py release moves
    what this leans on, this fails: the batch would still be read, one reply at a time."""
    def per_reply(*args, **kwargs):
        raise AssertionError("read_response called for a reply of a batch")

    async def body(aredis) -> None:
        assert await roundtrip(aredis, command("SET", "a", "1") + command("GET", "a"), 2) == ["OK", "1"]
        monkeypatch.setattr(AbstractConnection, "read_response", per_reply)
        assert await roundtrip(aredis, command("GET", "a") * 300, 300) == ["1"] * 300

    _run(store, body)
