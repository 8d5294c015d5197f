"""The load-test upstream speaks well-formed OpenAI: checked with the real ``openai`` SDK.

The server runs exactly as the benchmark runs it (``python benchmarks/loadtest_upstream.py
--port P`` in a subprocess) on a free loopback port.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "loadtest_upstream.py"
ANSWER = "This is a canned answer from the load-test upstream."
MESSAGES = [{"role": "user", "content": "Say hello in exactly one short sentence, please."}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                pytest.fail(f"upstream exited: {proc.stdout.read().decode(errors='replace')}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    pytest.fail("upstream did not become healthy in 15 s")
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        proc.stdout.close()


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
