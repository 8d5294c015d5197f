"""A gateway short of file descriptors: `serve` raises its own limit as far as it may and
says when that is low, and a gateway that runs out anyway answers 503 to retry, without
blaming (cooling down, failing over from) an expert that did nothing wrong."""

from __future__ import annotations

import asyncio
import json
import os
import resource
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.router_gateway.test_cli import sy
from tests.router_gateway.test_scale_out import serve_processes

STREAM = {"model": "up-slowstart", "messages": [{"role": "user", "content": "hi"}], "stream": True}


def _open_files_limit(pid: int) -> tuple[str, str]:
    """(soft, hard) open files limit of a live process, as /proc shows them."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return soft, hard
    raise AssertionError(f"no open files limit for {pid}")


def _limit_files(soft: int, hard: int | None = None):
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, resource.getrlimit(resource.RLIMIT_NOFILE)[1]
                                                    if hard is None else hard))
    return preexec


@pytest.mark.timeout(180)
def test_serve_raises_its_open_files_limit_and_warns_when_the_hard_limit_is_low(tmp_path: Path):
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert hard == resource.RLIM_INFINITY or hard > 256, "this test needs a hard limit above 256"
    want = 65536 if hard == resource.RLIM_INFINITY else min(65536, hard)
    with serve_processes(tmp_path / "data", preexec_fn=_limit_files(256)) as [(_, proc, out)]:
        assert _open_files_limit(proc.pid)[0] == str(want)
        assert "may open only" not in out.read_text()
    with serve_processes(tmp_path / "data", preexec_fn=_limit_files(256, 256)) as [(_, proc, out)]:
        assert _open_files_limit(proc.pid) == ("256", "256")
        text = " ".join(out.read_text().split())   # the console wraps long lines
        assert "may open only 256 files" in text and "ulimit" in text


async def _burst(url: str, n: int) -> list[tuple]:
    """``n`` streamed requests, each on its own connection: all ``n`` connections are
    opened first, then every request is sent at once (so the gateway holds as many
    accepted requests as it can when it needs their upstream connections). Per request
    (status, error code or whether the stream ended with [DONE], retry-after), or
    (exception name,) / ("closed",) for a connection the server could not take."""
    where = urlsplit(url)
    body = json.dumps(STREAM).encode()
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: {where.netloc}\r\ncontent-type: application/json\r\n"
               f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body
    conns = await asyncio.gather(*(asyncio.open_connection(where.hostname, where.port) for _ in range(n)),
                                 return_exceptions=True)

    async def one(conn) -> tuple:
        if isinstance(conn, BaseException):
            return (type(conn).__name__,)
        reader, writer = conn
        try:
            writer.write(request)
            await writer.drain()
            raw = await asyncio.wait_for(reader.read(), 60)
        except OSError as exc:   # reset by a server that could not take the connection
            return (type(exc).__name__,)
        finally:
            writer.close()
        if not raw:
            return ("closed",)
        head, _, rest = raw.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
        status = int(status_line.split()[1])
        if status == 200:
            return 200, b"data: [DONE]" in rest, None
        return status, json.loads(rest)["error"]["code"], headers.get("retry-after")

    return await asyncio.gather(*(one(c) for c in conns))


@pytest.mark.timeout(300)
def test_a_gateway_out_of_descriptors_answers_503_and_blames_no_expert(tmp_path: Path, scripted_upstream: str):
    d = tmp_path / "data"
    sy(d, "experts", "add", "up-slowstart", "--backend", "openai", "--base-url", scripted_upstream,
       "--served-model", "slowstart", "--no-check")   # the scripted upstream lists only "echo"
    # The upstream holds each stream for 0.5 s, so every request in the burst needs an
    # upstream connection of its own at once: more sockets than the gateway may open.
    with serve_processes(d, preexec_fn=_limit_files(160, 160)) as [(url, proc, out)]:
        base = len(os.listdir(f"/proc/{proc.pid}/fd"))
        assert base < 120, f"{base} descriptors open at rest: the burst below would not exhaust them"
        results = asyncio.run(_burst(url, 200))
        answered = [r for r in results if isinstance(r[0], int)]
        assert {r[0] for r in answered} <= {200, 503}, sorted({r[:2] for r in answered})
        assert all(r[1] is True for r in answered if r[0] == 200)
        overloaded = [r for r in answered if r[0] == 503]
        assert overloaded and all(r[1:] == ("gateway_overloaded", "1") for r in overloaded), overloaded[:3]
        # Connections beyond what it could accept were closed at once (libuv's way out of
        # EMFILE); the clients see a transport error, not a wrong answer.
        # Nobody blamed the expert: no cooldown, and a burst the gateway has room for is
        # answered in full as soon as the big one is over.
        health = httpx.get(f"{url}/health").json()
        assert health["healthy_experts"] == health["experts"] == 1, health
        assert asyncio.run(_burst(url, 30)) == [(200, True, None)] * 30
        r = httpx.post(f"{url}/v1/chat/completions", json={**STREAM, "stream": False}, timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "hello there"
        assert "gateway out of sockets" in out.read_text()


CHILD = r"""
import asyncio, os, resource, sys
from expert_registry.http1 import HTTP1Client, LocalResourcesExhausted
from expert_registry.spec import ExpertSpec
from router_gateway.registry_view import probe

url = sys.argv[1]
spec = ExpertSpec(name="up", backend="openai", base_url=url, served_model="echo")
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

async def main():
    warm = HTTP1Client()   # imports what a first request needs while files can still be opened
    await (await warm.request("GET", url + "/models")).read()
    await warm.aclose()
    await asyncio.sleep(0.2)   # its socket closes on a later turn of the loop
    client = HTTP1Client(connect_timeout=5)
    held = []
    try:
        while True:
            held.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass
    try:
        await client.request("GET", url + "/models")
    except LocalResourcesExhausted as exc:
        print("request:", type(exc).__name__)
    print("probe:", await probe(client, spec))
    for fd in held[-8:]:
        os.close(fd)
    resp = await client.request("GET", url + "/models")
    await resp.read()
    print("after:", resp.status, await probe(client, spec))
    await client.aclose()

asyncio.run(main())
"""


def test_out_of_descriptors_is_named_as_such_and_a_probe_then_judges_nothing(scripted_upstream: str):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", CHILD, scripted_upstream], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["request: LocalResourcesExhausted", "probe: None",
                                        "after: 200 (True, None)"], done.stdout


def test_the_request_paths_redis_connections_are_bounded(store):
    """However many commands are in flight, the async client keeps at most its pool's
    connections; a command that finds none free within the wait fails as a Redis
    connection error (which the request path treats as the store being away)."""
    import redis

    from expert_registry.store import open_async_redis

    async def scenario():
        r = open_async_redis(store.client, None, max_connections=4, wait_s=0.3)
        counts = await asyncio.gather(*(r.incr("bounded") for _ in range(300)))
        opened = len(r.connection_pool._available_connections) + len(r.connection_pool._in_use_connections)
        assert sorted(counts) == list(range(1, 301)) and opened == 4
        held = [await r.connection_pool.get_connection() for _ in range(4)]
        with pytest.raises(redis.ConnectionError):
            await r.incr("bounded")
        for conn in held:
            await r.connection_pool.release(conn)
        assert await r.incr("bounded") == 301
        await r.aclose()

    asyncio.run(scenario())
