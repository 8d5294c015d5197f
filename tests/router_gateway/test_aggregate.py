"""Aggregation mode (``router:NAME?k=K``) through the real gateway, with real Redis,
real HTTP and the real OpenAI SDK. The upstream is the scripted one (it echoes what it
received), which stands in for experts whose answers are not under test here; the same
mode against real vLLM workers is in test_vllm_integration.py.

The router is test_routing's TF-IDF classifier: for an arithmetic question it ranks
math-expert (1.0) > generalist (0.7) > poet (0.0). Logged mean scores (competence):
log-general 0.70, log-math 0.67, log-poet 0.33.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterator

import openai
import pytest

from expert_registry.spec import ExpertSpec
from expert_registry.store import ExpertStore, open_redis
from router_gateway.aggregate import AGGREGATOR_PROMPT, answer_text
from router_gateway.app import create_app
from router_gateway.keys import KeyPolicy, KeyStore, cost_nano
from tests.router_gateway.conftest import ADMIN_KEY, CLIENT_KEY, Gateway, make_settings, serve_in_thread
from tests.router_gateway.test_routing import EXPERT_MAP, MATH_Q, routed_experts, train_router

HEADLINE = AGGREGATOR_PROMPT.split("{n}")[0]


@pytest.fixture(scope="module")
def agg(tmp_path_factory, recorder) -> Iterator[Gateway]:
    rec, upstream = recorder
    router_dir = train_router(tmp_path_factory.mktemp("router"))
    data_dir = tmp_path_factory.mktemp("agg") / "data"
    store = ExpertStore(open_redis(None, data_dir))
    for spec in routed_experts(upstream):
        store.put(spec)
    store.put(ExpertSpec(name="broken", backend="openai", base_url=upstream, served_model="fail500",
                         input_price_per_mtok=0.01, output_price_per_mtok=0.01))
    store.put(ExpertSpec(name="refuses", backend="openai", base_url=upstream, served_model="bad400"))
    deployments = [
        {"name": "plain", "router_dir": str(router_dir), "expert_map": EXPERT_MAP},
        {"name": "fixed", "router_dir": str(router_dir), "expert_map": EXPERT_MAP, "aggregator": "poet"},
        # log-unmapped is logged right on everything, so 'broken' ranks first and is recruited
        {"name": "flaky", "router_dir": str(router_dir), "aggregator": "generalist",
         "expert_map": {**EXPERT_MAP, "log-unmapped": "broken"}},
        {"name": "dead", "router_dir": str(router_dir), "aggregator": "generalist",
         "expert_map": {"log-unmapped": "broken", "log-general": "generalist"}},
        {"name": "refusing", "router_dir": str(router_dir), "aggregator": "generalist",
         "expert_map": {"log-unmapped": "refuses", "log-general": "generalist"}},
    ]
    try:
        with serve_in_thread(create_app(make_settings(data_dir), store)) as url:
            gw = Gateway(url, store)
            with gw.client(ADMIN_KEY) as c:
                for dep in deployments:
                    r = c.post("/v1/routers", json=dep)
                    assert r.status_code == 201, r.text
            yield gw
    finally:
        store.client.shutdown(nosave=True)


def sdk(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=30)


def ask(gw: Gateway, model: str, **kw):
    raw = sdk(gw).chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": MATH_Q}], max_tokens=7, **kw)
    return raw.headers, raw


def wait_for_recruits(gw: Gateway, model: str, want: list[str]) -> None:
    """Until the gateway's registry view has caught up with a health change."""
    deadline = time.monotonic() + 10
    with gw.client() as c:
        while c.post("/v1/route", json={"model": model, "messages": [{"role": "user", "content": MATH_Q}]}
                     ).json()["recruited"] != want:
            assert time.monotonic() < deadline, f"{model} never recruited {want}"
            time.sleep(0.05)


def test_recruits_top_k_and_the_aggregator_sees_their_answers(agg: Gateway, recorder):
    rec, _ = recorder
    before = len(rec.calls)
    headers, raw = ask(agg, "router:plain?k=2")
    assert headers["x-switchyard-recruited"] == "math-expert,generalist"  # the router's top two
    assert headers["x-switchyard-expert"] == "generalist"  # best logged score among the mapped experts
    assert int(headers["x-switchyard-recruited-tokens"]) == 20  # 10 per scripted answer
    assert "x-switchyard-recruited-failed" not in headers
    calls = rec.calls[before:]
    assert sorted(calls[:2]) == [("/v1/chat/completions", "served-generalist"),
                                 ("/v1/chat/completions", "served-math-expert")]
    assert calls[2:] == [("/v1/chat/completions", "served-generalist")]  # then the aggregator, once
    body = json.loads(raw.text)
    assert body["model"] == "router:plain?k=2"
    received = body["received"]  # what the aggregator got
    system, user = received["messages"]
    assert system["role"] == "system" and system["content"].startswith(HEADLINE.format())
    assert "[Answer 1]\nhello there" in system["content"] and "[Answer 2]\nhello there" in system["content"]
    assert user == {"role": "user", "content": MATH_Q}
    assert received["max_tokens"] == 7  # the client's parameters reach the aggregator


def test_k_beyond_the_experts_recruits_all_and_k1_is_plain_routing(agg: Gateway):
    headers, _ = ask(agg, "router:plain?k=9")
    assert headers["x-switchyard-recruited"].split(",") == ["math-expert", "generalist", "poet"]
    headers, _ = ask(agg, "router:plain?k=1")
    assert headers["x-switchyard-expert"] == "math-expert" and "x-switchyard-recruited" not in headers


def test_configured_aggregator_and_streaming(agg: Gateway, recorder):
    rec, _ = recorder
    stream = sdk(agg).chat.completions.create(model="router:fixed?k=2", stream=True,
                                              messages=[{"role": "user", "content": MATH_Q}])
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hello there"
    assert {c.model for c in chunks} == {"router:fixed?k=2"}
    assert rec.calls[-1] == ("/v1/chat/completions", "served-poet")  # the configured aggregator streamed


def test_a_failing_recruit_is_left_out(agg: Gateway):
    headers, raw = ask(agg, "router:flaky?k=3")
    assert headers["x-switchyard-recruited-failed"] == "broken"
    assert headers["x-switchyard-recruited"] == "math-expert,generalist"
    assert json.loads(raw.text)["received"]["messages"][0]["content"].count("[Answer") == 2


def test_all_recruits_failing_is_an_upstream_error_and_4xx_a_client_error(agg: Gateway):
    with agg.client() as c:
        # k=1 is plain routing: the threshold picks 'broken' (the only one >= 0.99), it
        # answers 500, and the request falls back to the next-ranked expert.
        r = c.post("/v1/chat/completions", json={"model": "router:dead?k=1&min_quality=0.99",
                                                 "messages": [{"role": "user", "content": MATH_Q}]})
        assert r.status_code == 200
        assert (r.headers["x-switchyard-expert"], r.headers["x-switchyard-fallback-from"]) == ("generalist", "broken")
        r = c.post("/v1/chat/completions", json={"model": "router:dead?k=2&lambda=1000",
                                                 "messages": [{"role": "user", "content": MATH_Q}]})
        assert r.status_code == 200  # generalist answered; broken failed and was left out
        assert r.headers["x-switchyard-recruited-failed"] == "broken"
        r = c.post("/v1/chat/completions", json={"model": "router:refusing?k=2",
                                                 "messages": [{"role": "user", "content": MATH_Q}]})
        assert r.status_code == 200
    # only the refusing expert recruited: its 4xx is the client's error, shaped like OpenAI's
    agg.store.set_health("generalist", False, "down for the test")
    try:
        wait_for_recruits(agg, "router:refusing?k=2", ["refuses"])
        with agg.client() as c:
            r = c.post("/v1/chat/completions", json={"model": "router:refusing?k=2",
                                                     "messages": [{"role": "user", "content": MATH_Q}]})
        assert r.status_code == 400, r.text
        assert "every recruited expert refused" in r.json()["error"]["message"]
    finally:
        agg.store.set_health("generalist", True)
        wait_for_recruits(agg, "router:refusing?k=2", ["refuses", "generalist"])


def test_completions_endpoint_cannot_aggregate(agg: Gateway):
    with pytest.raises(openai.BadRequestError) as info:
        sdk(agg).completions.create(model="router:plain?k=2", prompt=MATH_Q)
    assert "needs /v1/chat/completions" in info.value.message


def test_route_dry_run_names_recruits_and_aggregator(agg: Gateway):
    with agg.client() as c:
        r = c.post("/v1/route", json={"model": "router:plain?k=2", "messages": [{"role": "user", "content": MATH_Q}]})
    body = r.json()
    assert body["recruited"] == ["math-expert", "generalist"] and body["aggregator"] == "generalist"
    with agg.client() as c:
        body = c.post("/v1/route", json={"model": "router:plain", "messages": [{"role": "user", "content": MATH_Q}]}).json()
    assert body["recruited"] is None and body["aggregator"] is None


def test_deployment_rejects_unknown_aggregator(agg: Gateway, tmp_path: Path):
    with agg.client(ADMIN_KEY) as c:
        r = c.post("/v1/routers", json={"name": "bad", "router_dir": c.get("/v1/routers/plain").json()["router_dir"],
                                        "expert_map": EXPERT_MAP, "aggregator": "nobody"})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "aggregator" and "not a registered expert" in r.json()["error"]["message"]


@pytest.mark.parametrize("content, text", [
    (b'{"choices": [{"message": {"content": "hi"}}]}', "hi"),
    (b'{"choices": [{"text": "yo"}]}', "yo"),
    (b'{"choices": []}', ""),
    (b'not json', ""),
    (b'{"choices": [{"message": {"content": null}}]}', ""),
])
def test_answer_text(content: bytes, text: str):
    assert answer_text(content) == text


def test_a_key_pays_for_every_recruited_answer_and_counts_one_request(agg: Gateway):
    keys = KeyStore(agg.store.client, agg.store.prefix)
    secret, rec = keys.create("agg-payer", KeyPolicy())
    client = openai.OpenAI(base_url=agg.url + "/v1", api_key=secret, max_retries=0, timeout=30)
    raw = client.chat.completions.with_raw_response.create(
        model="router:plain?k=2", messages=[{"role": "user", "content": MATH_Q}], max_tokens=7)
    recruited = raw.headers["x-switchyard-recruited"].split(",")
    paid = [*recruited, raw.headers["x-switchyard-expert"]]
    assert len(recruited) == 2
    deadline = time.monotonic() + 5
    while keys.usage(rec)["input_tokens"] < 7 * len(paid) and time.monotonic() < deadline:
        time.sleep(0.05)
    usage = keys.usage(rec)
    # The scripted upstream reports 7 + 3 tokens per answer: three answers, one request.
    assert usage["requests"] == 1
    assert (usage["input_tokens"], usage["output_tokens"]) == (7 * len(paid), 3 * len(paid))
    specs = {s.name: s for s in agg.store.list()}
    want = sum(cost_nano(7, 3, specs[n].input_price_per_mtok, specs[n].output_price_per_mtok) for n in paid)
    assert round(usage["spend_usd"] * 1e9) == want
