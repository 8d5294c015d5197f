"""Gateway fixtures: embedded real Redis, the real app under uvicorn on 127.0.0.1 in a
thread (after httpx's own test suite), and a scripted real-HTTP upstream."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import uvicorn

from expert_registry.spec import ExpertSpec
from expert_registry.store import ExpertStore, open_redis
from router_gateway.app import create_app
from router_gateway.settings import Settings

ADMIN_KEY = "sy-admin-test"
CLIENT_KEY = "sy-client-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadServer(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # the main thread keeps its handlers
        pass


@contextlib.contextmanager
def serve_in_thread(app, port: int | None = None, http: Any = None) -> Iterator[str]:
    """``app`` on uvicorn in a thread; ``http``: uvicorn's protocol, by default the one
    ``switchyard serve`` uses (``router_gateway.http_server.http_protocol()``)."""
    if http is None:
        from router_gateway.http_server import http_protocol

        http = http_protocol()
    port = port or free_port()
    server = ThreadServer(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                         loop="asyncio", lifespan="on", http=http))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def scripted_upstream() -> Iterator[str]:
    from tests.router_gateway.scripted_upstream import app

    with serve_in_thread(app) as url:
        yield url + "/v1"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def store(data_dir: Path) -> Iterator[ExpertStore]:
    client = open_redis(None, data_dir)
    yield ExpertStore(client)
    client.shutdown(nosave=True)  # never leave an embedded server behind


def make_settings(data_dir: Path, **kw) -> Settings:
    base = dict(data_dir=data_dir, admin_key=ADMIN_KEY, api_keys=[CLIENT_KEY], upstream_timeout_s=2.0,
                upstream_connect_timeout_s=1.0, health_interval_s=0, registry_refresh_s=0.2,
                max_body_bytes=64 * 1024)
    base.update(kw)
    return Settings(**base)


@dataclass
class Gateway:
    url: str
    store: ExpertStore

    def client(self, key: str | None = CLIENT_KEY, **kw) -> httpx.Client:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **kw)


def scripted_experts(upstream: str) -> list[ExpertSpec]:
    names = ["echo", "fail500", "bad400", "slow", "breakstream", "garbage"]
    specs = [ExpertSpec(name=f"up-{n}", backend="openai", base_url=upstream, served_model=n,
                        input_price_per_mtok=1.0, output_price_per_mtok=2.0) for n in names]
    specs.append(ExpertSpec(name="down", backend="openai", base_url=f"http://127.0.0.1:{free_port()}/v1",
                            served_model="down"))
    specs.append(ExpertSpec(name="echo", backend="openai", base_url=upstream, served_model="echo"))
    return specs


@pytest.fixture
def gateway(store: ExpertStore, data_dir: Path, scripted_upstream: str) -> Iterator[Gateway]:
    for spec in scripted_experts(scripted_upstream):
        store.put(spec)
    with serve_in_thread(create_app(make_settings(data_dir), store)) as url:
        yield Gateway(url, store)


class Recorder:
    """Wraps the scripted upstream app and records which served model each call was for."""

    def __init__(self, app):
        self.app = app
        self.calls: list[tuple[str, str]] = []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        chunks: list[bytes] = []

        async def recording_receive():
            message = await receive()
            if message["type"] == "http.request":
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    body = b"".join(chunks)
                    self.calls.append((scope["path"], json.loads(body).get("model") if body else None))
            return message

        await self.app(scope, recording_receive, send)


@pytest.fixture(scope="module")
def recorder() -> Iterator[tuple[Recorder, str]]:
    from tests.router_gateway.scripted_upstream import app

    rec = Recorder(app)
    with serve_in_thread(rec) as url:
        yield rec, url + "/v1"
