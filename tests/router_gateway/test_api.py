"""The OpenAI-compatible surface, through the real app on loopback, with the real SDK."""

from __future__ import annotations

import time

import openai
import pytest

from expert_registry.spec import ExpertSpec
from tests.router_gateway.conftest import CLIENT_KEY, Gateway


def sdk(gw: Gateway, key: str = CLIENT_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=30)


def test_chat_non_streaming_rewrites_model_and_forwards_unknown_fields(gateway: Gateway):
    extra = {"seed": 7, "logprobs": True, "response_format": {"type": "json_object"},
             "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
             "vendor_field": {"nested": [1, 2, 3]}}
    with gateway.client() as c:
        r = c.post("/v1/chat/completions", json={"model": "up-echo", "messages": [{"role": "user", "content": "hi"}],
                                                 **extra})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "up-echo"  # the client's name, not the upstream's id
    received = body["received"]
    assert received["model"] == "echo"  # the upstream got its own served id
    for key, value in extra.items():
        assert received[key] == value
    assert r.headers["x-switchyard-expert"] == "up-echo"
    assert r.headers["x-switchyard-router"] == "direct"
    assert float(r.headers["x-switchyard-overhead-ms"]) >= 0
    assert r.headers["x-request-id"]


def test_openai_sdk_chat_and_stream_with_usage(gateway: Gateway):
    client = sdk(gateway)
    resp = client.chat.completions.create(model="up-echo", messages=[{"role": "user", "content": "hi"}])
    assert resp.choices[0].message.content == "hello there"
    assert resp.model == "up-echo"
    assert resp.usage.total_tokens == 10

    chunks = list(client.chat.completions.create(model="up-echo", messages=[{"role": "user", "content": "hi"}],
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "hello there"
    assert all(c.model == "up-echo" for c in chunks)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


def test_completions_endpoint(gateway: Gateway):
    client = sdk(gateway)
    resp = client.completions.create(model="up-echo", prompt="say hi", max_tokens=5)
    assert resp.choices[0].text == "hello there"
    assert resp.model == "up-echo"
    streamed = "".join(c.choices[0].text for c in client.completions.create(model="up-echo", prompt="x", stream=True))
    assert streamed == "hello there"


def test_models_list_is_openai_shaped(gateway: Gateway):
    models = sdk(gateway).models.list()
    ids = {m.id for m in models.data}
    assert {"up-echo", "echo", "down"} <= ids
    assert all(m.object == "model" for m in models.data)
    one = sdk(gateway).models.retrieve("up-echo")   # GET /v1/models/{model}
    assert one.id == "up-echo" and one.object == "model"
    assert one.model_dump() == next(m for m in models.data if m.id == "up-echo").model_dump()
    with pytest.raises(openai.NotFoundError, match="model 'nope' does not exist"):
        sdk(gateway).models.retrieve("nope")


def test_embeddings_go_to_the_named_expert(gateway: Gateway):
    raw = sdk(gateway).embeddings.with_raw_response.create(model="up-echo", input=["a cat", "the dog"],
                                                           dimensions=3)
    emb = raw.parse()
    assert [d.embedding for d in emb.data] == [[5.0, 0.0, 0.5], [7.0, 1.0, 0.5]]
    assert emb.model == "up-echo" and raw.headers["x-switchyard-expert"] == "up-echo"
    assert float(raw.headers["x-switchyard-overhead-ms"]) >= 0 and raw.headers["x-request-id"]
    with gateway.client() as c:
        echoed = c.post("/v1/embeddings", json={"model": "up-echo", "input": "x", "user": "u1"}).json()
        assert echoed["received"] == {"model": "echo", "input": "x", "user": "u1"}   # served model, extras kept
        refused = {name: c.post("/v1/embeddings", json=body) for name, body in {
            "router": {"model": "router:classifier", "input": "x"},
            "auto": {"model": "auto", "input": "x"},
            "stream": {"model": "up-echo", "input": "x", "stream": True},
            "no input": {"model": "up-echo"},
            "bad input": {"model": "up-echo", "input": [{"text": "x"}]},
            "unknown": {"model": "nope", "input": "x"},
            "failing": {"model": "up-fail500", "input": "x"},
            "refusing": {"model": "up-bad400", "input": "x"},
        }.items()}
    statuses = {name: (r.status_code, r.json()["error"]["param"]) for name, r in refused.items()}
    assert statuses == {"router": (400, "model"), "auto": (400, "model"), "stream": (400, "stream"),
                        "no input": (400, "input"), "bad input": (400, "input.str"), "unknown": (404, "model"),
                        "failing": (502, None), "refusing": (400, "max_tokens")}, statuses
    assert "one expert" in refused["router"].json()["error"]["message"]


def test_embeddings_through_the_litellm_backend(gateway: Gateway, scripted_upstream: str, monkeypatch):
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    gateway.store.put(ExpertSpec(name="lite-echo", backend="litellm", base_url=scripted_upstream,
                                 served_model="openai/echo"))
    client = sdk(gateway)
    deadline = time.monotonic() + 10
    while "lite-echo" not in {m.id for m in client.models.list()}:   # the registry refresh picks it up
        assert time.monotonic() < deadline
        time.sleep(0.1)
    emb = client.embeddings.create(model="lite-echo", input="a cat", encoding_format="float")
    assert emb.model == "lite-echo" and [d.embedding for d in emb.data] == [[5.0, 0.0, 0.5]]
    assert emb.usage.prompt_tokens == 4


def test_expert_named_like_its_served_model_is_passed_through(gateway: Gateway):
    with gateway.client() as c:
        r = c.post("/v1/chat/completions", json={"model": "echo", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 200 and r.json()["model"] == "echo"


@pytest.mark.parametrize("model, needle", [
    ("router:gnn", "router 'gnn' is not available"),
    ("router:classifier?lambda=0.3", "router 'classifier'"),
    ("auto", "'auto' needs a default router"),
    ("collab:math", "collaboration group 'math'"),
    ("no-such-expert", "model 'no-such-expert' does not exist"),
])
def test_unavailable_targets_are_404_naming_what_exists(gateway: Gateway, model: str, needle: str):
    with pytest.raises(openai.NotFoundError) as info:
        sdk(gateway).chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}])
    err = info.value.body
    assert needle in err["message"]
    assert "up-echo" in err["message"]  # names what is available
    assert err["code"] == "model_not_found"
