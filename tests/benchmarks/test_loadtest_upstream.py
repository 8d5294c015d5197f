"""The load-test upstream speaks well-formed OpenAI: checked with the real ``openai`` SDK.

Both server flavours run exactly as the benchmark runs them (``python
benchmarks/loadtest_upstream.py --port P --server raw|asgi`` in a subprocess) on free
loopback ports; every test runs against each, and one compares their answers over HTTP.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import openai
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "loadtest_upstream.py"
ANSWER = "This is a canned answer from the load-test upstream."
MESSAGES = [{"role": "user", "content": "Say hello in exactly one short sentence, please."}]
SERVERS = ("raw", "asgi")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _serving(server: str) -> Iterator[str]:
    """``loadtest_upstream.py --server <server>`` on a free port, until healthy; its URL."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--port", str(port), "--server", server],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                pytest.fail(f"{server} upstream exited: {proc.stdout.read().decode(errors='replace')}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    pytest.fail(f"{server} upstream did not become healthy in 15 s")
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        proc.stdout.close()


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, str]]:
    """Both flavours at once, by name."""
    with ExitStack() as stack:
        yield {server: stack.enter_context(_serving(server)) for server in SERVERS}


@pytest.fixture(params=SERVERS)
def base_url(request: pytest.FixtureRequest, servers: dict[str, str]) -> str:
    return servers[request.param]


@pytest.fixture()
def client(base_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=5) as c:
        yield c


def test_health_and_models(base_url: str, client: openai.OpenAI) -> None:
    assert httpx.get(f"{base_url}/health").json() == {"status": "ok"}
    assert [m.id for m in client.models.list()] == ["loadtest"]


def test_chat_completion_is_a_full_object(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model="any-name", messages=MESSAGES)
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    assert resp.model == "any-name"
    (choice,) = resp.choices
    assert choice.message.role == "assistant" and choice.message.content == ANSWER
    assert choice.finish_reason == "stop"
    usage = resp.usage
    assert usage.completion_tokens == 9 and usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_max_tokens_truncates_with_length(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=3)
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 3
    assert resp.choices[0].message.content == "This is a "


@pytest.mark.parametrize("include_usage", [False, True])
def test_chat_stream_chunks_then_done(client: openai.OpenAI, include_usage: bool) -> None:
    kwargs = {"stream_options": {"include_usage": True}} if include_usage else {}
    chunks = list(client.chat.completions.create(model="m", messages=MESSAGES, stream=True, **kwargs))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    content_chunks = [c for c in chunks if c.choices]
    assert content_chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in content_chunks) == ANSWER
    assert [c.choices[0].finish_reason for c in content_chunks][-1] == "stop"
    assert all(c.choices[0].finish_reason is None for c in content_chunks[:-1])
    if include_usage:
        last = chunks[-1]
        assert last.choices == [] and last.usage.completion_tokens == 9
        assert all(c.usage is None for c in chunks[:-1])
    else:
        assert all(c.usage is None for c in chunks)


def test_stream_wire_format_ends_with_done(base_url: str) -> None:
    body = {"model": "m", "messages": MESSAGES, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]" and events.count("data: [DONE]") == 1


def test_text_completions(client: openai.OpenAI) -> None:
    resp = client.completions.create(model="m", prompt="Once upon a time")
    assert resp.object == "text_completion" and resp.choices[0].text == ANSWER
    assert resp.usage.completion_tokens == 9
    streamed = list(client.completions.create(model="m", prompt="x", stream=True))
    assert "".join(c.choices[0].text for c in streamed) == ANSWER
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_responses_plain_short_and_streamed(base_url: str, client: openai.OpenAI) -> None:
    resp = client.responses.create(model="m", input="Say hello.")
    assert resp.object == "response" and resp.output_text == ANSWER and resp.model == "m"
    assert (resp.usage.input_tokens, resp.usage.output_tokens) == (2, 9)
    assert client.responses.create(model="m", input="x", max_output_tokens=2).output_text == "This is "
    events = list(client.responses.create(model="m", input=[{"role": "user", "content": "hi"}], stream=True))
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[-1].type == "response.completed" and events[-1].response.output_text == ANSWER
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == ANSWER
    raw = httpx.post(f"{base_url}/v1/responses", json={"model": "m", "input": "x", "stream": True})
    assert raw.text.startswith("event: response.created\ndata: {") and "[DONE]" not in raw.text
    assert httpx.post(f"{base_url}/v1/responses", json={"model": "m"}).status_code == 400


def test_errors_are_openai_shaped(base_url: str, client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=0)
    assert info.value.status_code == 400
    bad = httpx.post(f"{base_url}/v1/chat/completions", content=b"{not json")
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    assert httpx.post(f"{base_url}/v1/chat/completions", json={"model": "m"}).status_code == 400
    assert httpx.get(f"{base_url}/v1/nothing-here").status_code == 404
    assert httpx.get(f"{base_url}/v1/chat/completions").status_code == 405


def test_keep_alive_serves_many_requests_on_one_connection(base_url: str) -> None:
    body = {"model": "m", "messages": MESSAGES}
    with httpx.Client(base_url=base_url, limits=httpx.Limits(max_connections=1)) as c:
        ids = {c.post("/v1/chat/completions", json=body).json()["id"] for _ in range(50)}
    assert len(ids) == 50


def _normalized(resp: httpx.Response) -> object:
    """The answer without what differs between any two answers (ids, timestamps): the
    JSON body, or each SSE event's JSON (``[DONE]`` kept as is)."""
    def strip(obj: object) -> object:
        return {k: v for k, v in obj.items() if k not in ("id", "created")} if isinstance(obj, dict) else obj

    if resp.headers["content-type"].startswith("text/event-stream"):
        events = [line.removeprefix("data: ") for line in resp.text.split("\n\n") if line]
        return [e if e == "[DONE]" else strip(json.loads(e)) for e in events]
    return strip(resp.json())


SAME_ANSWERS = {
    "chat": ("POST", "/v1/chat/completions", {"model": "m", "messages": MESSAGES}, 200),
    "chat-max-tokens": ("POST", "/v1/chat/completions", {"model": "m", "messages": MESSAGES, "max_tokens": 4}, 200),
    "completions": ("POST", "/v1/completions", {"model": "m", "prompt": "Once upon a time"}, 200),
    "chat-stream-usage": ("POST", "/v1/chat/completions", {"model": "m", "messages": MESSAGES, "stream": True,
                                                           "stream_options": {"include_usage": True}}, 200),
    "completions-stream-usage": ("POST", "/v1/completions", {"prompt": "x", "stream": True, "max_tokens": 2,
                                                             "stream_options": {"include_usage": True}}, 200),
    "models": ("GET", "/v1/models", None, 200),
    "health": ("GET", "/health", None, 200),
    "no-messages": ("POST", "/v1/chat/completions", {"model": "m"}, 400),
    "bad-max-tokens": ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 0}, 400),
    "not-found": ("GET", "/v1/nothing-here", None, 404),
    "wrong-method": ("GET", "/v1/completions", None, 405),
}


@pytest.mark.parametrize("case", SAME_ANSWERS)
def test_asgi_flavour_answers_as_raw(servers: dict[str, str], case: str) -> None:
    """The same-stack upstream is the raw one on another HTTP stack: same status, content
    type, framing and bodies (ids and timestamps aside)."""
    method, path, body, status = SAME_ANSWERS[case]
    answers = {server: httpx.request(method, f"{url}{path}", json=body) for server, url in servers.items()}
    raw, asgi = answers["raw"], answers["asgi"]
    assert raw.status_code == asgi.status_code == status
    assert raw.headers["content-type"] == asgi.headers["content-type"]
    assert raw.headers.get("transfer-encoding") == asgi.headers.get("transfer-encoding")
    assert _normalized(raw) == _normalized(asgi)
    if body and body.get("stream"):
        assert asgi.headers["transfer-encoding"] == "chunked"
        events = _normalized(asgi)
        assert events[-1] == "[DONE]" and events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] > 0
    elif status == 200 and path.startswith("/v1/c"):
        assert _normalized(asgi)["usage"]["completion_tokens"] > 0


def test_asgi_flavour_is_uvicorn(servers: dict[str, str]) -> None:
    """It really is the gateway's stack (uvicorn), not the raw server started twice."""
    assert httpx.get(f"{servers['asgi']}/health").headers.get("server") == "uvicorn"
    assert "server" not in httpx.get(f"{servers['raw']}/health").headers
