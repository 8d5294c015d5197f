"""Everything a client can get wrong, and every upstream failure: an OpenAI-shaped 4xx/5xx
error with a clear message, never a 500, and the server healthy afterwards."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.router_gateway.conftest import Gateway

CHAT = "/v1/chat/completions"
OK_BODY = {"model": "up-echo", "messages": [{"role": "user", "content": "hi"}]}


def assert_openai_error(r: httpx.Response, status: int, needle: str, error_type: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert needle.lower() in err["message"].lower(), err["message"]
    if error_type:
        assert err["type"] == error_type
    return err


def assert_still_healthy(gw: Gateway) -> None:
    with gw.client() as c:
        assert c.get("/health").json()["status"] == "ok"
        assert c.post(CHAT, json=OK_BODY).status_code == 200


@pytest.mark.parametrize("content, status, needle", [
    (b"{not json", 400, "not valid JSON"),
    (b"", 400, "empty"),
    (b"[1, 2]", 400, "JSON object"),
    (b'{"model": 5, "messages": [{"role": "user", "content": "x"}]}', 400, "'model'"),
    (b'{"model": "up-echo", "messages": []}', 400, "'messages'"),
    (b'{"model": "up-echo", "messages": "hi"}', 400, "'messages'"),
    (b'{"model": "up-echo", "messages": [{"content": "x"}]}', 400, "'messages.0.role'"),
    (b'{"model": "up-echo", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}', 400, "'stream'"),
    (b'{"model": "up-echo", "messages": [{"role": "user", "content": "x"}], "max_tokens": -3}', 400, "'max_tokens'"),
    (b'{"model": "up-echo", "messages": [{"role": "user", "content": "x"}], "temperature": 9}', 400, "'temperature'"),
    (b'{"messages": [{"role": "user", "content": "x"}]}', 400, "'model'"),
    (b'{"model": "router:gnn?lambda=-1", "messages": [{"role": "user", "content": "x"}]}', 400, "lambda"),
    (b'{"model": "up-echo?lambda=1", "messages": [{"role": "user", "content": "x"}]}', 400, "knobs"),
    (b'{"model": "", "messages": [{"role": "user", "content": "x"}]}', 400, "non-empty"),
])
def test_malformed_requests_are_400(gateway: Gateway, content: bytes, status: int, needle: str):
    with gateway.client() as c:
        r = c.post(CHAT, content=content, headers={"content-type": "application/json"})
    assert_openai_error(r, status, needle, "invalid_request_error")
    assert_still_healthy(gateway)


def test_completions_validates_prompt(gateway: Gateway):
    with gateway.client() as c:
        r = c.post("/v1/completions", json={"model": "up-echo", "prompt": {"a": 1}})
    assert_openai_error(r, 400, "'prompt")


def test_missing_and_invalid_keys_are_401(gateway: Gateway):
    with gateway.client(key=None) as c:
        assert_openai_error(c.post(CHAT, json=OK_BODY), 401, "missing API key", "authentication_error")
        assert_openai_error(c.post(CHAT, json=OK_BODY, headers={"authorization": "Basic abc"}), 401, "Bearer")
    with gateway.client(key="sy-wrong") as c:
        assert_openai_error(c.post(CHAT, json=OK_BODY), 401, "invalid API key")
        assert_openai_error(c.get("/v1/models"), 401, "invalid API key")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=gateway.url + "/v1", api_key="nope", max_retries=0).models.list()
    assert_still_healthy(gateway)


def test_body_too_large_is_413(gateway: Gateway):
    huge = {"model": "up-echo", "messages": [{"role": "user", "content": "x" * 100_000}]}
    with gateway.client() as c:
        assert_openai_error(c.post(CHAT, json=huge), 413, "limit")
        # chunked upload without Content-Length is cut off too
        def body():
            for _ in range(100):
                yield b"x" * 1024
        assert_openai_error(c.post(CHAT, content=body()), 413, "limit")
    assert_still_healthy(gateway)


def test_unknown_route_and_method_are_openai_shaped(gateway: Gateway):
    with gateway.client() as c:
        assert_openai_error(c.get("/v1/nope"), 404, "not found")
        assert_openai_error(c.get(CHAT), 405, "not allowed")


def test_upstream_down_is_502(gateway: Gateway):
    with gateway.client() as c:
        err = assert_openai_error(c.post(CHAT, json={**OK_BODY, "model": "down"}), 502, "unreachable")
        assert err["type"] == "upstream_error"
        r = c.post(CHAT, json={**OK_BODY, "model": "down", "stream": True})
        assert_openai_error(r, 502, "unreachable")
    assert_still_healthy(gateway)


def test_health_probe_marks_a_dead_upstream_unavailable(store, data_dir, scripted_upstream):
    from tests.router_gateway.conftest import make_settings, scripted_experts, serve_in_thread
    from router_gateway.app import create_app

    for spec in scripted_experts(scripted_upstream):
        store.put(spec)
    with serve_in_thread(create_app(make_settings(data_dir, health_interval_s=0.2), store)) as url:
        import time

        time.sleep(0.6)
        with httpx.Client(base_url=url, headers={"authorization": "Bearer sy-client-test"}) as c:
            err = assert_openai_error(c.post(CHAT, json={**OK_BODY, "model": "down"}), 503, "unhealthy")
            assert "ConnectFailed" in err["message"]
            assert c.post(CHAT, json=OK_BODY).status_code == 200
            assert c.get("/health").json()["healthy_experts"] == len(scripted_experts(scripted_upstream)) - 1
    assert store.health()["down"].healthy is False
    assert store.health()["up-echo"].healthy is True


def test_upstream_timeout_is_504(gateway: Gateway):
    with gateway.client() as c:
        assert_openai_error(c.post(CHAT, json={**OK_BODY, "model": "up-slow"}), 504, "did not answer in time",
                            "timeout")
        assert_openai_error(c.post(CHAT, json={**OK_BODY, "model": "up-slow", "stream": True}), 504, "in time")
    assert_still_healthy(gateway)


def test_upstream_5xx_is_502_with_its_message(gateway: Gateway):
    with gateway.client() as c:
        assert_openai_error(c.post(CHAT, json={**OK_BODY, "model": "up-fail500"}), 502, "engine crashed")
        assert_openai_error(c.post(CHAT, json={**OK_BODY, "model": "up-fail500", "stream": True}), 502, "HTTP 500")
        assert_openai_error(c.post(CHAT, json={**OK_BODY, "model": "up-garbage"}), 502, "invalid JSON")
    assert_still_healthy(gateway)


def test_upstream_4xx_passes_through_unchanged(gateway: Gateway):
    with gateway.client() as c:
        r = c.post(CHAT, json={**OK_BODY, "model": "up-bad400"})
    err = assert_openai_error(r, 400, "max_tokens too large")
    assert err["param"] == "max_tokens"


def test_stream_broken_midway_ends_with_error_frame_and_done(gateway: Gateway):
    with gateway.client() as c, c.stream("POST", CHAT, json={**OK_BODY, "model": "up-breakstream",
                                                             "stream": True}) as r:
        assert r.status_code == 200
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    assert '"error"' in lines[-2] and "broke the connection" in lines[-2]
    assert sum(1 for ln in lines if '"chat.completion.chunk"' in ln) == 2
    assert_still_healthy(gateway)


def test_unhealthy_expert_is_not_routed_to(gateway: Gateway):
    gateway.store.set_health("up-echo", False, "worker process exited")
    import time

    time.sleep(0.5)  # registry view refresh interval in tests is 0.2 s
    with gateway.client() as c:
        assert_openai_error(c.post(CHAT, json=OK_BODY), 503, "worker process exited", "service_unavailable")
        models = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
    assert models["up-echo"]["healthy"] is False
    gateway.store.set_health("up-echo", True)
    time.sleep(0.5)
    assert_still_healthy(gateway)


@pytest.mark.parametrize("whole", [True, False])
def test_read_json_refuses_a_body_over_the_limit_read_whole_or_streamed(whole: bool):
    """``read_json`` on a body the server read whole (``Request._body``) and on one it
    streams: the same limit, the same empty and invalid-JSON errors."""
    import asyncio

    from starlette.requests import Request

    from router_gateway.app_helpers import read_json
    from router_gateway.errors import InvalidRequest, PayloadTooLarge

    def request(body: bytes) -> Request:
        async def receive() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        scope = {"type": "http", "method": "POST", "path": CHAT,
                 "headers": [] if whole else [(b"content-length", str(len(body)).encode())]}
        req = Request(scope, receive)
        if whole:
            req._body = body
        return req

    assert asyncio.run(read_json(request(b'{"a": [1]}'), 10)) == {"a": [1]}
    with pytest.raises(PayloadTooLarge, match="11 bytes; the limit is 10"):
        asyncio.run(read_json(request(b'{"a": [12]}'), 10))
    with pytest.raises(InvalidRequest, match="empty"):
        asyncio.run(read_json(request(b""), 10))
    with pytest.raises(InvalidRequest, match="not valid JSON"):
        asyncio.run(read_json(request(b"{nope"), 10))
