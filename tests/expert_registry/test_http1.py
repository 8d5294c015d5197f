"""The upstream HTTP/1.1 client against real servers on loopback: keep-alive reuse,
chunked streams, the stale keep-alive race, and each failure it must name."""

from __future__ import annotations

import asyncio
import json

import pytest

from expert_registry.http1 import ConnectFailed, ConnectionBroken, HTTP1Client, PoolExhausted, ReadTimeout, parse_origin
from tests.router_gateway.conftest import free_port, serve_in_thread


@pytest.fixture(scope="module")
def upstream():
    from tests.router_gateway.scripted_upstream import app

    with serve_in_thread(app) as url:
        yield url


def run(coro):
    return asyncio.run(coro)


def chat(model: str, stream: bool = False) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "x"}], "stream": stream}).encode()


def test_plain_answers_reuse_one_connection(upstream):
    async def go():
        client = HTTP1Client()
        try:
            for _ in range(5):
                resp = await client.request("POST", upstream + "/v1/chat/completions", chat("echo"),
                                            {"content-type": "application/json"})
                assert resp.status == 200
                assert json.loads(await resp.read())["received"]["model"] == "echo"
            pool = next(iter(client._pools.values()))
            return len(pool.idle)
        finally:
            await client.aclose()

    assert run(go()) == 1  # sequential requests share one keep-alive connection


def test_chunked_stream_arrives_in_order(upstream):
    async def go():
        client = HTTP1Client()
        try:
            resp = await client.request("POST", upstream + "/v1/chat/completions", chat("echo", stream=True),
                                        {"content-type": "application/json"})
            assert resp.headers["content-type"].startswith("text/event-stream")
            data = b"".join([c async for c in resp.iter_chunks()])
            resp.release()
            return data
        finally:
            await client.aclose()

    data = run(go())
    assert data.count(b"data: ") == 4 and data.endswith(b"data: [DONE]\n\n")


def test_broken_stream_raises_connection_broken(upstream):
    async def go():
        client = HTTP1Client()
        try:
            resp = await client.request("POST", upstream + "/v1/chat/completions", chat("breakstream", True),
                                        {"content-type": "application/json"})
            with pytest.raises(ConnectionBroken):
                async for _ in resp.iter_chunks():
                    pass
            resp.release()
            return len(next(iter(client._pools.values())).idle)
        finally:
            await client.aclose()

    assert run(go()) == 0  # a broken connection is never pooled


def test_connect_failure_and_timeout(upstream):
    async def go():
        client = HTTP1Client(connect_timeout=2, read_timeout=0.3)
        try:
            with pytest.raises(ConnectFailed, match="cannot connect"):
                await client.request("GET", f"http://127.0.0.1:{free_port()}/health")
            with pytest.raises(ReadTimeout):
                await client.request("POST", upstream + "/v1/chat/completions", chat("slow"),
                                     {"content-type": "application/json"})
            # the pool is still usable afterwards
            resp = await client.request("POST", upstream + "/v1/chat/completions", chat("echo"),
                                        {"content-type": "application/json"})
            return resp.status, await resp.read()
        finally:
            await client.aclose()

    status, _ = run(go())
    assert status == 200


def test_stale_keep_alive_connection_is_retried_once():
    """A server that closes each connection right after answering (without saying so):
    the second request lands on a dead pooled connection and must be retried transparently."""

    async def go():
        served = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
            await reader.readuntil(b"\r\n\r\n")
            served.append(1)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: text/plain\r\n\r\nok")
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = HTTP1Client()
        try:
            bodies = []
            for _ in range(3):
                resp = await client.request("GET", f"http://127.0.0.1:{port}/x")
                bodies.append(await resp.read())
                await asyncio.sleep(0.2)  # let the server close the idle connection
            return bodies, len(served)
        finally:
            await client.aclose()
            server.close()

    bodies, served = run(go())
    assert bodies == [b"ok"] * 3 and served == 3


def test_connection_limit_queues_requests(upstream):
    async def go():
        client = HTTP1Client(max_connections_per_origin=2)
        try:
            async def one():
                resp = await client.request("POST", upstream + "/v1/chat/completions", chat("echo"),
                                            {"content-type": "application/json"})
                await resp.read()
                return resp.status
            statuses = await asyncio.gather(*(one() for _ in range(10)))
            return statuses, len(next(iter(client._pools.values())).idle)
        finally:
            await client.aclose()

    statuses, idle = run(go())
    assert statuses == [200] * 10 and idle <= 2


def test_waiting_for_a_free_connection_gives_up_after_the_connect_timeout(upstream):
    """With every connection busy, a request waits for one as long as it would for a connect,
    then fails naming the pool; the connection, once back, serves the next request."""
    async def go():
        client = HTTP1Client(max_connections_per_origin=1, connect_timeout=0.3)
        url = upstream + "/v1/chat/completions"
        try:
            busy = await client.request("POST", url, chat("slowstream", stream=True), {"content-type": "application/json"})
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with pytest.raises(PoolExhausted, match="all 1 connections to 127.0.0.1:.* stayed in use for 0.3 s"):
                await client.request("POST", url, chat("echo"), {"content-type": "application/json"})
            waited = loop.time() - t0
            busy.release()   # closes it (the body was not read to the end): the slot is free again
            resp = await client.request("POST", url, chat("echo"), {"content-type": "application/json"})
            await resp.read()
            return waited, resp.status
        finally:
            await client.aclose()

    waited, status = run(go())
    assert 0.25 < waited < 2 and status == 200


def test_origin_parsing():
    o = parse_origin("https://api.example.com/v1")
    assert (o.scheme, o.host, o.port, o.path_prefix, o.host_header) == ("https", "api.example.com", 443, "/v1",
                                                                        b"api.example.com")
    assert parse_origin("http://127.0.0.1:8101/v1").host_header == b"127.0.0.1:8101"
    with pytest.raises(ValueError):
        parse_origin("ftp://x")


def test_connection_counts_follow_every_way_a_connection_comes_back(upstream):
    """In use while an answer is held; back to 0 in use after a read answer (kept idle), a
    released unread stream (closed), a timeout and a cancelled request (both discarded)."""
    async def go():
        client = HTTP1Client(read_timeout=0.3)
        url = upstream + "/v1/chat/completions"
        origin = "http://" + upstream.split("://", 1)[1]
        counts = lambda: {o: (u, i) for o, u, i, _ in client.connection_counts()}[origin]  # noqa: E731
        seen = []
        try:
            held = await client.request("POST", url, chat("slowstream", stream=True), {"content-type": "application/json"})
            second = await client.request("POST", url, chat("echo"), {"content-type": "application/json"})
            seen.append(counts())                       # both handed out
            await second.read()
            seen.append(counts())                       # one back, kept for reuse
            held.release()                              # unread stream: closed, not kept
            seen.append(counts())
            with pytest.raises(ReadTimeout):
                await client.request("POST", url, chat("slow"), {"content-type": "application/json"})
            seen.append(counts())
            task = asyncio.ensure_future(client.request("POST", url, chat("slow"), {"content-type": "application/json"}))
            await asyncio.sleep(0.1)
            seen.append(counts())                       # waiting for its answer
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            seen.append(counts())
            return seen, client.connection_counts()[0][3]
        finally:
            await client.aclose()

    seen, limit = run(go())
    assert seen == [(2, 0), (1, 1), (0, 1), (0, 0), (1, 0), (0, 0)]
    assert limit == 512
