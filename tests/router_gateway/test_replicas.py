"""Experts served by several replicas (``ExpertSpec.replicas``): requests spread over
them by requests in flight, a failing replica is stepped over and set aside without
cooling the expert down, and health probes judge each one. Two real scripted upstreams
on loopback are the replicas; a port nobody listens on is a dead one."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import pytest
from pydantic import ValidationError

from expert_registry.http1 import HTTP1Client
from expert_registry.spec import ExpertSpec
from expert_registry.store import ExpertStore
from expert_registry.upstream import HTTPUpstream, LiteLLMUpstream
from router_gateway.app import create_app
from router_gateway.dispatch import Dispatcher, RouteDecision
from router_gateway.model_string import parse_model
from router_gateway.registry_view import RegistryView
from tests.router_gateway.conftest import Gateway, free_port, make_settings, serve_in_thread
from tests.router_gateway.test_observe import _sample

MSGS = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def second_upstream() -> Iterator[str]:
    from tests.router_gateway.scripted_upstream import app

    with serve_in_thread(app) as url:
        yield url + "/v1"


def _dead() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"


def _expert(name: str, served: str, base: str, *replicas: str) -> ExpertSpec:
    return ExpertSpec(name=name, backend="openai", base_url=base, served_model=served, replicas=list(replicas))


def test_replicas_are_checked_and_each_is_the_expert_at_another_url():
    spec = ExpertSpec(name="m", backend="vllm", base_url="http://a:1/v1", served_model="m",
                      replicas=["http://b:1/v1/", "https://c/v1"])
    assert [e.base_url for e in spec.endpoints()] == ["http://a:1/v1", "http://b:1/v1", "https://c/v1"]
    assert all(e.name == "m" and e.served_model == "m" and e.replicas == [] for e in spec.endpoints()[1:])
    assert spec.endpoints()[0] is spec
    single = ExpertSpec(name="m", backend="vllm", base_url="http://a:1/v1", served_model="m")
    assert single.endpoints() == (single,)
    assert ExpertSpec.model_validate_json(spec.model_dump_json()) == spec
    for bad, needle in [({"replicas": ["ftp://b"]}, "http:// or https://"),
                        ({"replicas": ["http://b", "http://b/"]}, "must not repeat a URL"),
                        ({"replicas": ["http://a:1/v1/"]}, "must not repeat base_url"),
                        ({"backend": "litellm", "base_url": None}, "replicas are for backends vllm and openai"),
                        ({"base_url": None, "launch": {"model_path": "/m"}}, "replicas need base_url")]:
        with pytest.raises(ValidationError, match=needle):
            ExpertSpec.model_validate({"name": "m", "backend": "vllm", "base_url": "http://a:1/v1",
                                       "served_model": "m", "replicas": ["http://b:1/v1"]} | bad)


def test_requests_take_turns_and_go_where_fewest_are_in_flight(store: ExpertStore, data_dir: Path,
                                                               scripted_upstream: str, second_upstream: str):
    store.put(_expert("pair", "echo", scripted_upstream, second_upstream))
    store.put(_expert("pair-slow", "slowstream", scripted_upstream, second_upstream))
    store.put(_expert("solo", "echo", scripted_upstream))
    with serve_in_thread(create_app(make_settings(data_dir), store)) as url, \
            Gateway(url, store).client() as c, Gateway(url, store).client() as s:
        answered = [c.post("/v1/chat/completions", json={"model": "pair", "messages": MSGS}) for _ in range(6)]
        assert all(r.status_code == 200 and r.json()["model"] == "pair" for r in answered)
        assert Counter(r.headers["x-switchyard-replica"] for r in answered) == {"0": 3, "1": 3}
        body = {"model": "pair-slow", "messages": MSGS, "stream": True}
        with s.stream("POST", "/v1/chat/completions", json=body) as held:   # one request in flight there
            chunks = held.iter_bytes()
            assert held.status_code == 200 and next(chunks)
            busy = held.headers["x-switchyard-replica"]
            while_held = [c.post("/v1/chat/completions", json={"model": "pair", "messages": MSGS}) for _ in range(4)]
            assert {r.headers["x-switchyard-replica"] for r in while_held} == {"1" if busy == "0" else "0"}
        solo = c.post("/v1/chat/completions", json={"model": "solo", "messages": MSGS})
        assert solo.status_code == 200 and "x-switchyard-replica" not in solo.headers


def test_a_dead_replica_is_stepped_over_and_set_aside_and_the_expert_stays_up(
        store: ExpertStore, data_dir: Path, scripted_upstream: str):
    dead = _dead()
    store.put(_expert("pair", "echo", dead, scripted_upstream))
    settings = make_settings(data_dir, cooldown_failures=1, cooldown_s=30)
    with serve_in_thread(create_app(settings, store)) as url, Gateway(url, store).client() as c:
        for stream in (False, True, False, False, True):
            r = c.post("/v1/chat/completions", json={"model": "pair", "messages": MSGS, "stream": stream})
            assert r.status_code == 200 and r.headers["x-switchyard-replica"] == "1", r.text
            assert "x-switchyard-fallback-from" not in r.headers
        # one failed call set the dead replica aside: the others went straight to the live one
        metrics = c.get("/metrics").text
        assert _sample(metrics, "switchyard_upstream_failures_total", expert="pair", reason="unreachable") == 1
        assert "pair" not in store.health()                        # one failure cools an expert here: not this
    store.put(_expert("pair", "echo", dead, _dead()))              # every replica dead: the expert fails
    with serve_in_thread(create_app(settings, store)) as url, Gateway(url, store).client() as c:
        r = c.post("/v1/chat/completions", json={"model": "pair", "messages": MSGS})
        assert r.status_code == 502 and r.json()["error"]["type"] == "upstream_error"
        assert not store.health()["pair"].healthy                  # now it counts, and cools it down


def test_health_probes_judge_every_replica(store: ExpertStore, data_dir: Path, scripted_upstream: str,
                                           second_upstream: str):
    dead = _dead()
    store.put(_expert("half", "echo", dead, scripted_upstream))
    store.put(_expert("none", "echo", _dead(), _dead()))
    store.put(_expert("both", "echo", scripted_upstream, second_upstream))
    settings = make_settings(data_dir, health_interval_s=0.1, cooldown_failures=1)
    app = create_app(settings, store)
    with serve_in_thread(app) as url, Gateway(url, store).client() as c:
        deadline = time.monotonic() + 10
        while not {"half", "none", "both"} <= set(store.health()):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        health = store.health()
        assert health["half"].healthy and health["both"].healthy
        assert not health["none"].healthy and health["none"].error.startswith("every replica failed")
        assert health["none"].error.count("ConnectFailed") == 2
        assert app.state.view.replicas.probe_down >= {dead}
        # the replica its probe found down is tried last: no call fails on it
        for _ in range(3):
            r = c.post("/v1/chat/completions", json={"model": "half", "messages": MSGS})
            assert r.status_code == 200 and r.headers["x-switchyard-replica"] == "1"
        assert _sample(c.get("/metrics").text, "switchyard_upstream_failures_total",
                       expert="half", reason="unreachable") is None
        r = c.post("/v1/chat/completions", json={"model": "none", "messages": MSGS})
        assert r.status_code == 503 and r.json()["error"]["code"] == "expert_unavailable"


def test_a_recruited_expert_is_asked_at_a_replica_that_is_up(store: ExpertStore, scripted_upstream: str):
    """Aggregation asks each recruit once, at the first replica in order: not at one whose
    health probe failed."""
    dead = _dead()
    store.put(_expert("pair", "echo", dead, scripted_upstream))
    store.put(_expert("aggregator", "echo", scripted_upstream))

    async def go():
        view = RegistryView(store, 0.2)
        await view.refresh()
        view.replicas.probe_down.add(dead)
        client = HTTP1Client(16, 1.0, 5.0)
        try:
            d = Dispatcher(view, HTTPUpstream(client), LiteLLMUpstream(5.0))
            decision = RouteDecision(parse_model("router:test?k=1"), view.experts["aggregator"], "test",
                                     recruited=(view.experts["pair"],))
            body = {"model": "router:test?k=1", "messages": MSGS}
            return await d.handle("chat/completions", body, decision, "rid", time.perf_counter())
        finally:
            await client.aclose()

    resp = asyncio.run(go())
    assert resp.status_code == 200
    assert resp.headers["x-switchyard-recruited"] == "pair" and "x-switchyard-recruited-failed" not in resp.headers
