"""CORS for browser clients (SWITCHYARD_CORS_ORIGINS), over real HTTP: preflights and the
ASGI routes through Starlette's middleware, the two hot proxy routes through the gateway's
own protocol (and its ASGI fallback), streams and errors included; off by default."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from pydantic import ValidationError

from expert_registry.store import ExpertStore
from router_gateway.app import create_app
from router_gateway.http_server import GatewayProtocol
from router_gateway.settings import Settings
from tests.router_gateway.conftest import CLIENT_KEY, make_settings, scripted_experts, serve_in_thread

APP = "https://app.example.com"
CHAT = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
KEY = {"authorization": f"Bearer {CLIENT_KEY}"}


def _serve(store: ExpertStore, data_dir: Path, upstream: str, http, **settings) -> Iterator[str]:
    for spec in scripted_experts(upstream):
        store.put(spec)
    with serve_in_thread(create_app(make_settings(data_dir, **settings), store), http=http) as url:
        yield url


@pytest.fixture(params=["gateway-protocol", "asgi"])
def cors_gateway(request, store: ExpertStore, data_dir: Path, scripted_upstream: str) -> Iterator[str]:
    http = GatewayProtocol if request.param == "gateway-protocol" else "httptools"
    yield from _serve(store, data_dir, scripted_upstream, http, cors_origins=[APP, "http://localhost:3000"])


def test_a_browser_on_an_allowed_origin_can_call_and_read_every_answer(cors_gateway: str):
    with httpx.Client(base_url=cors_gateway, timeout=30) as c:
        pre = c.options("/v1/chat/completions", headers={
            "origin": APP, "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type"})
        assert pre.status_code == 200, pre.text
        assert pre.headers["access-control-allow-origin"] == APP
        assert "POST" in pre.headers["access-control-allow-methods"]
        assert "authorization" in pre.headers["access-control-allow-headers"].lower()

        answers = {
            "chat": c.post("/v1/chat/completions", json=CHAT, headers={**KEY, "origin": APP}),
            "stream": c.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers={**KEY, "origin": APP}),
            "completion": c.post("/v1/completions", json={"model": "echo", "prompt": "hi"},
                                 headers={**KEY, "origin": APP}),
            "error": c.post("/v1/chat/completions", json={**CHAT, "model": "nope"}, headers={**KEY, "origin": APP}),
            "no key": c.post("/v1/chat/completions", json=CHAT, headers={"origin": APP}),
            "models": c.get("/v1/models", headers={**KEY, "origin": APP}),
        }
        statuses = {name: r.status_code for name, r in answers.items()}
        assert statuses == {"chat": 200, "stream": 200, "completion": 200, "error": 404, "no key": 401,
                            "models": 200}, statuses
        for name, r in answers.items():
            assert r.headers.get("access-control-allow-origin") == APP, (name, r.headers)
            assert "origin" in r.headers.get("vary", "").lower(), (name, r.headers)
            exposed = r.headers.get("access-control-expose-headers", "")
            assert "x-request-id" in exposed and "x-switchyard-expert" in exposed, (name, exposed)
        assert answers["stream"].text.rstrip().endswith("data: [DONE]")
        assert answers["chat"].headers["x-switchyard-expert"] == "echo"

        other = "https://evil.example"
        r = c.post("/v1/chat/completions", json=CHAT, headers={**KEY, "origin": other})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        pre = c.options("/v1/chat/completions", headers={"origin": other, "access-control-request-method": "POST"})
        assert pre.status_code == 400 and "access-control-allow-origin" not in pre.headers


def test_any_origin(store: ExpertStore, data_dir: Path, scripted_upstream: str):
    for url in _serve(store, data_dir, scripted_upstream, GatewayProtocol, cors_origins=["*"]):
        r = httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers={**KEY, "origin": "https://x.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"


def test_off_by_default(store: ExpertStore, data_dir: Path, scripted_upstream: str):
    for url in _serve(store, data_dir, scripted_upstream, GatewayProtocol):
        r = httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers={**KEY, "origin": APP})
        assert r.status_code == 200 and not any(h.startswith("access-control-") for h in r.headers)
        pre = httpx.options(f"{url}/v1/chat/completions", headers={"origin": APP,
                                                                    "access-control-request-method": "POST"})
        assert pre.status_code == 405 and "access-control-allow-origin" not in pre.headers


@pytest.mark.parametrize("origin", ["https://app.example.com/", "app.example.com", "ftp://x", "https://"])
def test_a_bad_origin_is_refused_at_start(origin: str, tmp_path: Path):
    with pytest.raises(ValidationError, match="is not an origin"):
        Settings(data_dir=tmp_path, cors_origins=[origin])
    env = {**os.environ, "SWITCHYARD_DATA_DIR": str(tmp_path), "SWITCHYARD_CORS_ORIGINS": f'["{origin}"]'}
    done = subprocess.run([sys.executable, "-m", "router_gateway.cli", "experts", "list"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "SWITCHYARD_CORS_ORIGINS" in done.stdout and "Traceback" not in done.stderr, \
        (done.stdout, done.stderr)


def test_a_list_setting_that_is_not_json_is_named_not_a_traceback(tmp_path: Path):
    env = {**os.environ, "SWITCHYARD_DATA_DIR": str(tmp_path), "SWITCHYARD_CORS_ORIGINS": APP}
    done = subprocess.run([sys.executable, "-m", "router_gateway.cli", "experts", "list"], env=env,
                          capture_output=True, text=True, timeout=60)
    out = " ".join(done.stdout.split())
    assert done.returncode == 2 and "cors_origins" in out and "list settings are JSON" in out, (out, done.stderr)
    assert "Traceback" not in done.stderr
