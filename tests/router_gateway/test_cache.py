"""The response cache (``SWITCHYARD_CACHE_TTL_S``): a repeated request is answered from
Redis without reaching the expert. Real gateway, real embedded Redis, the real OpenAI SDK,
and the scripted upstream on loopback, whose echo answers carry the request id the
gateway forwarded (so an answer says which request reached the expert). Re-pointing an
expert at a dead port after the first request shows that a hit never tries it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest

from expert_registry.spec import ExpertSpec
from expert_registry.store import ExpertStore, open_async_redis
from router_gateway.app import create_app
from router_gateway.cache import ResponseCache, cache_mode, whole_stream
from router_gateway.decision_log import export_rows, read_decisions
from router_gateway.errors import InvalidRequest
from tests.router_gateway.conftest import (ADMIN_KEY, CLIENT_KEY, Gateway, free_port, make_settings,
                                           scripted_experts, serve_in_thread)
from tests.router_gateway.test_observe import _sample

MSGS = [{"role": "user", "content": "hi"}]


@pytest.fixture
def cached(store: ExpertStore, data_dir: Path, scripted_upstream: str) -> Iterator[tuple[Gateway, object]]:
    for spec in scripted_experts(scripted_upstream):
        store.put(spec)
    app = create_app(make_settings(data_dir, cache_ttl_s=60, cache_max_entry_bytes=4000), store)
    with serve_in_thread(app) as url:
        yield Gateway(url, store), app


def _sdk(gw: Gateway, key: str = CLIENT_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=30)


def _kill(store: ExpertStore, name: str, served: str, upstream: str) -> None:
    """Point ``name`` at a port nobody listens on and wait until the gateway sees it."""
    store.put(ExpertSpec(name=name, backend="openai", base_url=f"http://127.0.0.1:{free_port()}/v1",
                         served_model=served, input_price_per_mtok=1.0, output_price_per_mtok=2.0))
    time.sleep(0.6)   # registry_refresh_s is 0.2


def test_a_repeated_request_is_answered_from_the_cache_and_never_reaches_the_expert(cached, scripted_upstream):
    gw, app = cached
    sdk = _sdk(gw)
    first = sdk.chat.completions.with_raw_response.create(model="up-echo", messages=MSGS, temperature=0)
    assert first.headers["x-switchyard-cache"] == "miss"
    answer = first.parse()
    assert answer.received_request_id == first.headers["x-request-id"]   # it reached the expert
    text = sdk.completions.create(model="up-echo", prompt="once upon").choices[0].text
    vectors = sdk.embeddings.create(model="up-echo", input=["a cat", "a dog"])
    chunks = ["".join(c.choices[0].delta.content or "" for c in sdk.chat.completions.create(
        model="up-echo", messages=MSGS, stream=True) if c.choices)]
    time.sleep(0.3)   # the stores run in the background
    _kill(gw.store, "up-echo", "echo", scripted_upstream)

    again = sdk.chat.completions.with_raw_response.create(model="up-echo", messages=MSGS, temperature=0)
    assert again.headers["x-switchyard-cache"] == "hit"
    assert again.headers["x-switchyard-expert"] == "up-echo" and again.headers["x-switchyard-router"] == "direct"
    assert 0 <= int(again.headers["x-switchyard-cache-age"]) <= 5
    assert again.parse().model_dump() == answer.model_dump()              # the same bytes, id and all
    assert again.headers["x-request-id"] != first.headers["x-request-id"]
    assert sdk.completions.create(model="up-echo", prompt="once upon").choices[0].text == text
    assert sdk.embeddings.create(model="up-echo", input=["a cat", "a dog"]).model_dump() == vectors.model_dump()
    streamed = sdk.chat.completions.create(model="up-echo", messages=MSGS, stream=True)
    assert ["".join(c.choices[0].delta.content or "" for c in streamed if c.choices)] == chunks == ["hello there"]
    # the key order of the body does not matter; any other difference does (and now fails: the expert is down)
    with gw.client() as c:
        raw = c.post("/v1/chat/completions", content=b'{"temperature": 0, "messages": [{"content": "hi", '
                     b'"role": "user"}], "model": "up-echo"}', headers={"content-type": "application/json"})
        assert raw.status_code == 200 and raw.headers["x-switchyard-cache"] == "hit"
        for other in ({"temperature": 0.5}, {"messages": [{"role": "user", "content": "hi!"}]}, {"seed": 1}):
            r = c.post("/v1/chat/completions", json={"model": "up-echo", "messages": MSGS, "temperature": 0} | other)
            assert r.status_code == 502, other
        metrics = c.get("/metrics").text
    assert _sample(metrics, "switchyard_cache_total", result="hit") == 5
    assert _sample(metrics, "switchyard_cache_total", result="stored") == 4


def test_off_refresh_and_cache_control_decide_per_request(cached):
    gw, _ = cached
    body = {"model": "up-echo", "messages": MSGS}
    with gw.client() as c:
        def ask(**headers: str) -> httpx.Response:
            r = c.post("/v1/chat/completions", json=body, headers=headers)
            assert r.status_code == 200, r.text
            time.sleep(0.2)
            return r

        def served(r: httpx.Response) -> str:      # the request whose answer this is
            return r.json()["received_request_id"]

        stored = ask(**{"x-request-id": "first"})
        assert stored.headers["x-switchyard-cache"] == "miss" and served(stored) == "first"
        assert served(ask(**{"x-request-id": "hit"})) == "first"
        fresh = ask(**{"x-switchyard-cache": "refresh", "x-request-id": "refreshed"})
        assert fresh.headers["x-switchyard-cache"] == "refresh" and served(fresh) == "refreshed"
        assert served(ask()) == "refreshed"                                   # refresh stored its answer
        for headers in ({"x-switchyard-cache": "OFF"}, {"cache-control": "max-age=0, no-store"}):
            skipped = ask(**headers, **{"x-request-id": "skipped"})
            assert skipped.headers["x-switchyard-cache"] == "off" and served(skipped) == "skipped"
        assert served(ask()) == "refreshed"                                   # off stored nothing
        assert served(ask(**{"cache-control": "no-cache", "x-request-id": "nc"})) == "nc"
        assert served(ask(**{"cache-control": "max-age=60"})) == "nc"
        bad = c.post("/v1/chat/completions", json=body, headers={"x-switchyard-cache": "sometimes"})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_cache"
        assert c.get("/health").json()["status"] == "ok"


def test_errors_broken_streams_and_long_answers_are_not_cached(cached):
    gw, _ = cached
    with gw.client() as c:
        def twice(body: dict) -> list[httpx.Response]:
            out = []
            for _ in range(2):
                out.append(c.post("/v1/chat/completions", json=body))
                time.sleep(0.2)
            return out

        bad = twice({"model": "up-bad400", "messages": MSGS})
        assert [r.status_code for r in bad] == [400, 400]                     # the upstream's 400, passed through
        assert [r.headers["x-switchyard-cache"] for r in bad] == ["miss", "miss"]
        failed = twice({"model": "up-fail500", "messages": MSGS})
        assert [r.status_code for r in failed] == [502, 502]
        broken = twice({"model": "up-breakstream", "messages": MSGS, "stream": True})
        assert all(b'"error"' in r.content for r in broken)                   # broke midway, both times
        assert [r.headers["x-switchyard-cache"] for r in broken] == ["miss", "miss"]
        long = twice({"model": "up-echo", "messages": [{"role": "user", "content": "x" * 5000}]})
        assert [r.headers["x-switchyard-cache"] for r in long] == ["miss", "miss"]   # over 4,000 bytes
        metrics = c.get("/metrics").text
    assert _sample(metrics, "switchyard_cache_total", result="too_large") == 2
    assert _sample(metrics, "switchyard_cache_total", result="hit") is None


def test_identical_requests_in_flight_together_ask_the_expert_once(store: ExpertStore, data_dir: Path,
                                                                    scripted_upstream: str):
    from concurrent.futures import ThreadPoolExecutor

    for spec in scripted_experts(scripted_upstream):
        store.put(spec)
    for name in ("slowanswer", "slowstart"):
        store.put(ExpertSpec(name=f"up-{name}", backend="openai", base_url=scripted_upstream, served_model=name))
    settings = make_settings(data_dir, cache_ttl_s=60, cooldown_failures=100)
    with serve_in_thread(create_app(settings, store)) as url, Gateway(url, store).client() as c:
        def ask(rid: str, body: dict) -> httpx.Response:
            return c.post("/v1/chat/completions", json=body, headers={"x-request-id": rid})

        def together(body: dict, n: int = 5) -> list[httpx.Response]:
            with ThreadPoolExecutor(n) as pool:   # the upstream takes 0.5 s: they overlap
                return list(pool.map(lambda i: ask(f"r{i}", body), range(n)))

        answers = together({"model": "up-slowanswer", "messages": MSGS})
        assert all(r.status_code == 200 for r in answers)
        asked = {r.json()["received_request_id"] for r in answers}
        assert len(asked) == 1                                               # one request reached the expert
        leader = next(r for r in answers if r.headers["x-request-id"] in asked)
        assert leader.headers["x-switchyard-cache"] == "miss"
        assert sorted(r.headers["x-switchyard-cache"] for r in answers) == ["hit"] * 4 + ["miss"]
        assert len({r.content for r in answers}) == 1
        failed = together({"model": "up-fail500", "messages": MSGS}, 3)      # no answer to share: each asks
        assert [r.status_code for r in failed] == [502] * 3
        streams = together({"model": "up-slowstart", "messages": MSGS, "stream": True}, 3)
        assert [r.headers["x-switchyard-cache"] for r in streams] == ["miss"] * 3   # streams are not coalesced
        assert all(r.text.rstrip().endswith("data: [DONE]") for r in streams)
        metrics = c.get("/metrics").text
    assert _sample(metrics, "switchyard_cache_total", result="coalesced") == 4
    assert _sample(metrics, "switchyard_upstream_failures_total", expert="up-fail500", reason="5xx") == 3


def test_entries_expire_after_the_ttl(store: ExpertStore, data_dir: Path, scripted_upstream: str):
    for spec in scripted_experts(scripted_upstream):
        store.put(spec)
    with serve_in_thread(create_app(make_settings(data_dir, cache_ttl_s=0.5), store)) as url, \
            Gateway(url, store).client() as c:
        body = {"model": "up-echo", "messages": MSGS}
        assert c.post("/v1/chat/completions", json=body).headers["x-switchyard-cache"] == "miss"
        time.sleep(0.2)
        assert c.post("/v1/chat/completions", json=body).headers["x-switchyard-cache"] == "hit"
        time.sleep(0.6)
        assert c.post("/v1/chat/completions", json=body).headers["x-switchyard-cache"] == "miss"
    with serve_in_thread(create_app(make_settings(data_dir), store)) as url, Gateway(url, store).client() as c:
        r = c.post("/v1/chat/completions", json=body, headers={"x-switchyard-cache": "sometimes"})
        assert r.status_code == 200 and "x-switchyard-cache" not in r.headers   # off by default


def _key(url: str, **fields) -> dict:
    with httpx.Client(base_url=url, headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=30) as admin:
        return admin.post("/v1/keys", json=fields).json()


def _usage(url: str, key_id: str) -> dict:
    with httpx.Client(base_url=url, headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=30) as admin:
        return admin.get(f"/v1/keys/{key_id}").json()["usage"]


@pytest.mark.parametrize("per_key", [False, True])
def test_a_hit_costs_nothing_is_logged_as_a_hit_and_respects_the_keys_models(store: ExpertStore, data_dir: Path,
                                                                          scripted_upstream: str, per_key: bool):
    for spec in scripted_experts(scripted_upstream):
        store.put(spec)
    app = create_app(make_settings(data_dir, api_keys=[], cache_ttl_s=60, cache_per_key=per_key), store)
    with serve_in_thread(app) as url:
        a, b = _key(url, name="a", budget_usd=1.0), _key(url, name="b", budget_usd=1.0)
        narrow = _key(url, name="narrow", models=["echo"])
        gw = Gateway(url, store)
        first = _sdk(gw, a["key"]).chat.completions.with_raw_response.create(model="up-echo", messages=MSGS)
        time.sleep(0.3)
        raws = [_sdk(gw, k["key"]).chat.completions.with_raw_response.create(model="up-echo", messages=MSGS)
                for k in (a, b)]
        assert [r.headers["x-switchyard-cache"] for r in raws] == ["hit", "miss" if per_key else "hit"]
        with pytest.raises(openai.PermissionDeniedError):     # a cached answer is no way around the key's models
            _sdk(gw, narrow["key"]).chat.completions.create(model="up-echo", messages=MSGS)
        time.sleep(0.5)   # bookings and the decision log are written in the background
        spent_a, spent_b = _usage(url, a["id"]), _usage(url, b["id"])
        assert (spent_a["requests"], spent_a["input_tokens"], spent_a["output_tokens"]) == (2, 7, 3)  # one paid
        assert spent_a["spend_usd"] == pytest.approx((7 * 1.0 + 3 * 2.0) / 1e6)
        assert (spent_b["requests"], spent_b["input_tokens"]) == (1, 7 if per_key else 0)
        entries = [d for d in read_decisions(store.client, store.prefix) if d.get("model") == "up-echo"
                   and d["status"] == "200"]
        assert [(d["rid"], d["cache"]) for d in entries[:2]] == [(first.headers["x-request-id"], "miss"),
                                                                  (raws[0].headers["x-request-id"], "hit")]
        assert entries[1]["expert"] == "up-echo" and entries[1]["cost_usd"] == ""
        rows, report = export_rows(store.client, store.prefix, unscored=True)
        assert len(rows) == 1 + per_key
        assert report.skipped["answered from the response cache (the expert's answer is exported once)"] == \
            2 - per_key


def test_cache_mode_reads_the_two_headers():
    assert cache_mode({}) == "on"
    assert cache_mode({"x-switchyard-cache": " Refresh "}) == "refresh"
    assert cache_mode({"x-switchyard-cache": "on", "cache-control": "no-store"}) == "on"   # ours decides
    assert cache_mode({"cache-control": "private, no-cache"}) == "refresh"
    assert cache_mode({"cache-control": "no-cache, no-store"}) == "off"
    assert cache_mode({"cache-control": "max-age=5"}) == "on"
    with pytest.raises(InvalidRequest, match="one of on, off, refresh"):
        cache_mode({"x-switchyard-cache": "yes"})
    assert whole_stream(b'data: {"x": 1}\n\ndata: [DONE]\n\n')
    assert not whole_stream(b'data: {"x": 1}\n\n')                                      # cut off
    assert not whole_stream(b'data: {"x": 1}\n\ndata: {"error": {"message": "m"}}\n\ndata: [DONE]\n\n')


def test_a_redis_that_does_not_answer_makes_lookups_miss_and_stores_no_ops(store: ExpertStore):
    """A real client to a port nobody listens on: nothing raises, every outcome is counted."""
    import redis as redis_lib

    results: list[str] = []

    async def go() -> None:
        dead = redis_lib.Redis(host="127.0.0.1", port=free_port())
        aredis = open_async_redis(dead, f"redis://127.0.0.1:{free_port()}/0", wait_s=0.5)
        cache = ResponseCache(aredis, "t:", 60, 1000, count=lambda r, n=1: results.extend([r] * n))
        key = cache.key("chat/completions", {"model": "m", "messages": MSGS}, "")
        assert await cache.get(key) is None
        cache.put(key, b"{}", stream=False, expert="m", router="direct")
        await cache.drain()
        live = ResponseCache(open_async_redis(store.client, None), "t:", 60, 1000,
                             count=lambda r, n=1: results.extend([r] * n))
        live.put(key, b'{"a": 1}', stream=False, expert="m", router="direct")
        await live.drain()
        hit = await live.get(key)
        assert results == ["error", "error", "stored", "hit"]
        assert hit is not None and hit.content == b'{"a": 1}' and not hit.stream and hit.expert == "m"
        keys = [live.key("completions", {"model": "m", "prompt": str(i)}, "") for i in range(20)]
        for i in range(0, 20, 3):
            live.put(keys[i], str(i).encode(), stream=True, expert=f"e{i}", router="r")
        await live.drain()
        results.clear()
        found = await asyncio.gather(*(live.get(k) for k in keys))   # one MGET: each answer to its own request
        assert [(h.content, h.expert) if h else None for h in found] == [
            (str(i).encode(), f"e{i}") if i % 3 == 0 else None for i in range(20)]
        assert results.count("hit") == 7 and results.count("miss") == 13
        results.clear()
        await live.r.set(key, b"not an entry")
        assert await live.get(key) is None   # something else under the key is a miss
        await aredis.aclose()
        await live.r.aclose()

    asyncio.run(go())
    assert results == ["miss"]


def test_the_cli_counts_and_clears_the_cache(store: ExpertStore, data_dir: Path, scripted_upstream: str):
    from tests.router_gateway.test_cli import sy

    for spec in scripted_experts(scripted_upstream):
        store.put(spec)
    store.client.set(store.prefix + "cache-like-but-not", "kept")
    with serve_in_thread(create_app(make_settings(data_dir, cache_ttl_s=60), store)) as url, \
            Gateway(url, store).client() as c:
        for prompt in ("a", "b", "a"):
            c.post("/v1/completions", json={"model": "up-echo", "prompt": prompt})
            time.sleep(0.2)
        assert "2 cached answers" in sy(data_dir, "cache", "stats").stdout
        assert "removed 2 cached answers" in sy(data_dir, "cache", "clear").stdout
        assert c.post("/v1/completions", json={"model": "up-echo", "prompt": "a"}).headers["x-switchyard-cache"] \
            == "miss"
        tail = sy(data_dir, "logs", "tail", "-n", "4").stdout
        verdicts = [line.strip(" │|").split()[-1] for line in tail.splitlines() if "up-echo" in line]
        assert verdicts == ["miss", "miss", "hit", "miss"], tail
    assert "1 cached answers" in sy(data_dir, "cache", "stats").stdout   # the miss after clearing, stored
    assert "removed 1 cached answers" in sy(data_dir, "cache", "clear").stdout
    assert "0 cached answers" in sy(data_dir, "cache", "stats").stdout
    assert store.client.get(store.prefix + "cache-like-but-not") == "kept"
