"""Fallbacks and cooldowns against real upstreams on loopback (the scripted upstream, a
port nobody listens on), with the cooldown state in the embedded real Redis."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import orjson
import pytest
from pydantic import ValidationError

from expert_registry.http1 import HTTP1Client
from expert_registry.spec import ExpertSpec
from expert_registry.store import ExpertStore
from expert_registry.upstream import HTTPUpstream, LiteLLMUpstream
from router_gateway.app import create_app
from router_gateway.dispatch import CooldownPolicy, Dispatcher, RouteDecision
from router_gateway.errors import UpstreamTimeout
from router_gateway.model_string import parse_model
from router_gateway.registry_view import RegistryView, health_loop
from tests.router_gateway.conftest import Gateway, make_settings, scripted_experts, serve_in_thread
from tests.router_gateway.test_slots import _given_back_now

MSGS = [{"role": "user", "content": "hi"}]


def _body(messages: list[dict] | None = None) -> dict:
    return {"model": "router:test", "messages": messages or MSGS}


def _dispatch(store: ExpertStore, first: str, *fallbacks: str, timeout_s: float = 2.0,
              messages: list[dict] | None = None, **policy):
    """One routed request decided by hand (first choice, then fallbacks), through the real
    dispatcher and HTTP client; returns (status, headers, body) or the raised error."""
    async def go():
        view = RegistryView(store, 0.2)
        await view.refresh()
        client = HTTP1Client(16, 1.0, timeout_s)
        try:
            d = Dispatcher(view, HTTPUpstream(client), LiteLLMUpstream(timeout_s), cooldown=CooldownPolicy(**policy))
            decision = RouteDecision(parse_model("router:test"), view.experts[first], "test",
                                     fallbacks=tuple(view.experts[f] for f in fallbacks))
            try:
                resp = await d.handle("chat/completions", _body(messages), decision, "rid", time.perf_counter())
            except Exception as exc:  # noqa: BLE001 - the test looks at it
                return exc
            return resp.status_code, dict(resp.headers), orjson.loads(resp.body)
        finally:
            await client.aclose()

    return asyncio.run(go())


@pytest.fixture
def experts(store: ExpertStore, scripted_upstream: str) -> ExpertStore:
    for spec in scripted_experts(scripted_upstream):
        store.put(spec)
    for served in ("busy", "short", "short-code"):
        store.put(ExpertSpec(name=f"up-{served}", backend="openai", base_url=scripted_upstream, served_model=served))
    return store


LONG = [{"role": "user", "content": "word " * 100}]


def test_a_request_too_long_for_its_expert_goes_to_the_next_that_has_the_room(experts: ExpertStore, data_dir: Path):
    status, headers, body = _dispatch(experts, "up-short", "up-short-code", "up-echo", messages=LONG)
    assert status == 200 and body["choices"][0]["message"]["content"]
    assert (headers["x-switchyard-expert"], headers["x-switchyard-fallback-from"]) == ("up-echo",
                                                                                        "up-short,up-short-code")
    status, headers, _ = _dispatch(experts, "up-short", "up-echo")     # a short one fits
    assert status == 200 and headers["x-switchyard-expert"] == "up-short" and "x-switchyard-fallback-from" not in headers
    # Nobody left with the room: the last expert's own 400, as it came.
    status, headers, body = _dispatch(experts, "up-short-code", "up-short", messages=LONG)
    assert status == 400 and body["error"]["param"] == "input_text" and "maximum context length" in \
        body["error"]["message"]
    assert headers["x-switchyard-expert"] == "up-short"
    # Any other 400 is the client's to fix, as before: no second expert is asked.
    status, headers, body = _dispatch(experts, "up-bad400", "up-echo")
    assert status == 400 and headers["x-switchyard-expert"] == "up-bad400" and "x-switchyard-fallback-from" \
        not in headers
    assert "up-short" not in experts.health() or experts.health()["up-short"].healthy   # no cooldown for it
    # Named with fallbacks, streamed, and at replicas (only one of which is asked: they share the window).
    other = experts.get("up-short").base_url.replace("127.0.0.1", "localhost")   # the same server, another URL
    experts.put(experts.get("up-short").model_copy(update={"replicas": [other], "fallbacks": ["up-echo"]}))
    with serve_in_thread(create_app(make_settings(data_dir, cooldown_failures=1), experts)) as url, \
            Gateway(url, experts).client() as c:
        for stream in (False, True):
            r = c.post("/v1/chat/completions", json={"model": "up-short", "messages": LONG, "stream": stream})
            assert r.status_code == 200, r.text
            assert (r.headers["x-switchyard-expert"], r.headers["x-switchyard-fallback-from"]) == ("up-echo",
                                                                                                    "up-short")
        r = c.post("/v1/chat/completions", json={"model": "up-short", "messages": MSGS})
        assert r.status_code == 200 and r.headers["x-switchyard-expert"] == "up-short"   # never cooled down
        counted = [ln for ln in c.get("/metrics").text.splitlines()
                   if ln.startswith("switchyard_upstream_failures_total{") and 'expert="up-short"' in ln]
        assert len(counted) == 1 and 'reason="context_length"' in counted[0] and counted[0].endswith(" 2.0")


@pytest.mark.parametrize("first", ["down", "up-fail500", "up-garbage", "up-busy"])
def test_a_failing_first_choice_falls_back_to_the_next(experts: ExpertStore, first: str):
    status, headers, body = _dispatch(experts, first, "up-echo")
    assert status == 200 and body["model"] == "router:test" and body["choices"][0]["message"]["content"]
    assert (headers["x-switchyard-expert"], headers["x-switchyard-fallback-from"]) == ("up-echo", first)


def _with_fallbacks(store: ExpertStore, name: str, *fallbacks: str) -> None:
    store.put(store.get(name).model_copy(update={"fallbacks": list(fallbacks)}))


def test_an_expert_named_directly_falls_back_to_its_own_fallbacks(experts: ExpertStore, data_dir: Path):
    """``fallbacks`` in a spec: a request naming that expert goes down the list when it
    fails before answering (streams too), skipping names that are not registered."""
    _with_fallbacks(experts, "up-fail500", "no-such-expert", "down", "up-echo")
    _with_fallbacks(experts, "up-garbage", "down")
    with serve_in_thread(create_app(make_settings(data_dir, cooldown_failures=100), experts)) as url, \
            Gateway(url, experts).client() as c:
        for stream in (False, True):
            r = c.post("/v1/chat/completions", json={"model": "up-fail500", "messages": MSGS, "stream": stream})
            assert r.status_code == 200, r.text
            assert (r.headers["x-switchyard-expert"], r.headers["x-switchyard-fallback-from"]) == \
                ("up-echo", "up-fail500,down")
            assert r.headers["x-switchyard-router"] == "direct"
            assert ('"model":"up-fail500"' in r.text) or ('"model": "up-fail500"' in r.text)   # the name asked for
        r = c.post("/v1/chat/completions", json={"model": "up-garbage", "messages": MSGS})
        assert r.status_code == 502 and "unreachable" in r.json()["error"]["message"]   # the last failure
        assert c.post("/v1/chat/completions", json={"model": "up-echo", "messages": MSGS}).headers.get(
            "x-switchyard-fallback-from") is None


def test_an_unhealthy_expert_named_directly_goes_straight_to_a_healthy_fallback(experts: ExpertStore,
                                                                              data_dir: Path):
    experts.note_failure("up-slow", "test", threshold=1, window_s=60, cooldown_s=30)
    experts.note_failure("up-fail500", "test", threshold=1, window_s=60, cooldown_s=30)
    _with_fallbacks(experts, "up-slow", "up-fail500", "up-echo")
    _with_fallbacks(experts, "up-fail500", "up-slow")
    with serve_in_thread(create_app(make_settings(data_dir), experts)) as url, Gateway(url, experts).client() as c:
        t0 = time.monotonic()
        r = c.post("/v1/chat/completions", json={"model": "up-slow", "messages": MSGS})
        assert r.status_code == 200 and time.monotonic() - t0 < 2        # never waited on the slow one
        assert (r.headers["x-switchyard-expert"], r.headers["x-switchyard-fallback-from"]) == ("up-echo", "up-slow")
        r = c.post("/v1/chat/completions", json={"model": "up-fail500", "messages": MSGS})
        assert r.status_code == 503 and r.json()["error"]["code"] == "expert_unavailable"
        assert "and so are its fallbacks" in r.json()["error"]["message"] and int(r.headers["retry-after"]) > 0


def test_fallbacks_are_checked_at_registration():
    base = {"name": "a", "backend": "openai", "base_url": "http://x:1/v1", "served_model": "m"}
    assert ExpertSpec.model_validate(base | {"fallbacks": ["b", "c/d"]}).fallbacks == ["b", "c/d"]
    for bad, needle in [(["a"], "its own fallback"), (["b", "b"], "must not repeat"), (["auto"], "expert names"),
                        (["router:x"], "expert names"), (["-x"], "expert names")]:
        with pytest.raises(ValidationError, match=needle):
            ExpertSpec.model_validate(base | {"fallbacks": bad})
    with pytest.raises(ValidationError, match="collaboration group"):
        ExpertSpec.model_validate(base | {"backend": "collab", "fallbacks": ["b"]})


def test_a_timeout_falls_back_and_the_last_failure_is_the_answer(experts: ExpertStore):
    status, headers, _ = _dispatch(experts, "up-slow", "down", "up-echo", timeout_s=0.5)
    assert status == 200 and headers["x-switchyard-fallback-from"] == "up-slow,down"
    err = _dispatch(experts, "up-fail500", "up-slow", timeout_s=0.5)
    assert isinstance(err, UpstreamTimeout) and err.status_code == 504     # every one failed: the last error
    # which, like an answer, names the expert it came from and those failed before it
    assert err.headers["x-switchyard-expert"] == "up-slow" and err.headers["x-switchyard-fallback-from"] == "up-fail500"
    alone = _dispatch(experts, "up-fail500")
    assert alone.headers["x-switchyard-expert"] == "up-fail500" and "x-switchyard-fallback-from" not in alone.headers


def test_failures_start_a_cooldown_every_process_sees(experts: ExpertStore, data_dir: Path, scripted_upstream):
    settings = make_settings(data_dir, cooldown_failures=3, cooldown_s=30)
    with serve_in_thread(create_app(settings, experts)) as a, serve_in_thread(create_app(settings, experts)) as b:
        ga, gb = Gateway(a, experts), Gateway(b, experts)
        with ga.client() as ca, gb.client() as cb:
            # Failures counted in Redis across both processes: 2 here, 1 there.
            for c in (ca, ca, cb):
                assert c.post("/v1/chat/completions", json={"model": "up-fail500", "messages": MSGS}).status_code == 502
            rec = experts.health()["up-fail500"]
            assert not rec.healthy and rec.until == pytest.approx(time.time() + 30, abs=5)
            assert "3 failure(s)" in rec.error and "engine crashed" in rec.error
            time.sleep(0.5)                                              # the other gateway refreshes
            for c in (ca, cb):
                r = c.post("/v1/chat/completions", json={"model": "up-fail500", "messages": MSGS})
                assert r.status_code == 503 and "cooldown" in r.json()["error"]["message"]
                assert 25 <= int(r.headers["retry-after"]) <= 30
            # A probe does not end a cooldown early...
            assert experts.set_health("up-fail500", True) is False
            assert experts.health()["up-fail500"].until is not None
            # ...and other experts are untouched.
            assert ca.post("/v1/chat/completions", json={"model": "up-echo", "messages": MSGS}).status_code == 200


def test_a_busy_upstream_is_a_503_to_retry_and_cools_nothing_down(experts: ExpertStore, data_dir: Path,
                                                                   scripted_upstream: str):
    """Every connection the gateway may open to an origin in use past the wait: the expert
    is busy with other requests, not failing. The client gets a 503 with Retry-After, the
    expert no failure on its count (one failure cools it down here), and a health probe,
    which shares the pool, judges nothing; once a connection is free, it answers."""
    experts.put(ExpertSpec(name="up-slowstream", backend="openai", base_url=scripted_upstream,
                           served_model="slowstream"))
    settings = make_settings(data_dir, upstream_max_connections=1, upstream_connect_timeout_s=0.3,
                             cooldown_failures=1, health_interval_s=0.1)
    with serve_in_thread(create_app(settings, experts)) as url, Gateway(url, experts).client() as c, \
            Gateway(url, experts).client() as s:
        body = {"model": "up-slowstream", "messages": MSGS, "stream": True}
        with s.stream("POST", "/v1/chat/completions", json=body) as held:   # holds the one connection
            chunks = held.iter_bytes()        # kept: a dropped iterator closes the stream
            assert held.status_code == 200 and next(chunks)
            r = c.post("/v1/chat/completions", json={"model": "up-echo", "messages": MSGS})
            assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
            err = r.json()["error"]
            assert err["code"] == "gateway_overloaded" and "all 1 connections" in err["message"]
            assert err["message"].startswith("expert 'up-echo'")
            time.sleep(0.8)                   # health probes every 0.1 s wait for the connection too
            assert experts.health()["up-echo"].healthy
        assert experts.health()["up-echo"].healthy
        deadline = time.monotonic() + 5       # the relay ends at its next chunk, 0.5 s apart
        while (r := c.post("/v1/chat/completions", json={"model": "up-echo", "messages": MSGS})).status_code == 503:
            assert time.monotonic() < deadline, r.text
        assert r.status_code == 200


def test_an_upstream_retry_after_is_honoured(experts: ExpertStore, data_dir: Path):
    settings = make_settings(data_dir, cooldown_failures=100)
    with serve_in_thread(create_app(settings, experts)) as url, Gateway(url, experts).client() as c:
        r = c.post("/v1/chat/completions", json={"model": "up-busy", "messages": MSGS})
        assert r.status_code == 429 and r.headers["retry-after"] == "2"     # the upstream's answer, as it came
        assert r.json()["error"]["message"] == "too many requests"
        r = c.post("/v1/chat/completions", json={"model": "up-busy", "messages": MSGS})
        assert r.status_code == 503 and int(r.headers["retry-after"]) <= 2   # paused for what it asked
        time.sleep(2.2)                                # no probing here: the cooldown ends by itself
        assert c.post("/v1/chat/completions", json={"model": "up-busy", "messages": MSGS}).status_code == 429


def test_a_cooled_expert_comes_back_through_a_health_probe(experts: ExpertStore):
    # up-echo is cooled down although it works; "down" too, and it does not work.
    for name in ("up-echo", "down"):
        experts.note_failure(name, "test", threshold=1, window_s=60, cooldown_s=0.6)

    async def go():
        view = RegistryView(experts, 0.1)
        await view.refresh()
        client = HTTP1Client(8, 1.0, 1.0)
        loop = asyncio.create_task(health_loop(view, client, 0.2))
        try:
            await asyncio.sleep(0.3)
            during = {n: view.is_unhealthy(n) is not None for n in ("up-echo", "down")}
            await asyncio.sleep(1.0)                  # the cooldown ended; probes decided
            await view.refresh()
            after = {n: view.is_unhealthy(n) is not None for n in ("up-echo", "down")}
        finally:
            loop.cancel()
            await client.aclose()
        return during, after

    during, after = asyncio.run(go())
    assert during == {"up-echo": True, "down": True}
    assert after == {"up-echo": False, "down": True}
    assert experts.health()["up-echo"].until is None and experts.health()["down"].until is None


def test_an_expert_at_its_max_concurrency_sends_the_next_request_elsewhere(experts: ExpertStore, data_dir: Path,
                                                                          scripted_upstream: str):
    """``max_concurrency``: a request beyond it goes to the expert's fallbacks (or is a 503
    to retry) at once, without waiting and without a cooldown; a request holds its place
    until its answer, streamed or not, is over or its client has left."""
    def limited(name: str, served: str, *fallbacks: str) -> None:
        experts.put(ExpertSpec(name=name, backend="openai", base_url=scripted_upstream, served_model=served,
                               max_concurrency=1, fallbacks=list(fallbacks)))

    limited("held", "slowstream", "up-echo")    # a stream to it never ends: it holds the one place
    limited("solo", "slowstream")
    limited("quick", "echo")
    with serve_in_thread(create_app(make_settings(data_dir, cooldown_failures=1), experts)) as url, \
            Gateway(url, experts).client() as c:
        def ask(model: str, stream: bool = False):
            return c.post("/v1/chat/completions", json={"model": model, "messages": MSGS, "stream": stream})

        for _ in range(3):   # plain answers give their place back
            assert ask("held").headers["x-switchyard-expert"] == "held"
        with c.stream("POST", "/v1/chat/completions", json={"model": "held", "messages": MSGS,
                                                            "stream": True}) as open_stream:
            next(open_stream.iter_bytes())
            for _ in range(2):
                r = ask("held")
                assert r.status_code == 200, r.text
                assert (r.headers["x-switchyard-expert"], r.headers["x-switchyard-fallback-from"]) == \
                    ("up-echo", "held")
            assert ask("held", stream=True).headers["x-switchyard-expert"] == "up-echo"
        # the client left: its place comes back once the gateway has hung up on the expert
        deadline = time.monotonic() + 5
        while ask("held").headers["x-switchyard-expert"] != "held":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert c.get("/health").json()["status"] == "ok"   # no cooldown for being full (threshold is 1)

        with c.stream("POST", "/v1/chat/completions", json={"model": "solo", "messages": MSGS,
                                                            "stream": True}) as open_stream:
            next(open_stream.iter_bytes())
            r = ask("solo")
            assert r.status_code == 503 and r.json()["error"]["code"] == "expert_unavailable", r.text
            assert r.headers["retry-after"] == "1" and r.headers["x-switchyard-expert"] == "solo"
            assert "max_concurrency" in r.json()["error"]["message"]

        for _ in range(3):   # a stream read to its end gives its place back
            # once relayed whole: on the gateway's next turn after the client read [DONE]
            assert _given_back_now(experts, "quick")
            r = ask("quick", stream=True)
            assert r.headers["x-switchyard-expert"] == "quick" and r.text.rstrip().endswith("[DONE]")
        metrics = c.get("/metrics").text
        full = re.search(r'switchyard_upstream_failures_total\{expert="held",reason="at_capacity"\} (\S+)', metrics)
        assert full is not None and float(full.group(1)) >= 3   # and more while the polling above waited
        assert 'switchyard_upstream_failures_total{expert="solo",reason="at_capacity"} 1.0' in metrics
    with pytest.raises(ValidationError):
        ExpertSpec(name="x", backend="openai", base_url="http://a/v1", served_model="x", max_concurrency=0)
