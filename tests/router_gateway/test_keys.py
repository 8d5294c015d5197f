"""API keys and their limits, on the embedded real Redis: the store, the limiter's
windows and budgets under concurrency, and the gateway's behaviour with managed keys
(real HTTP on loopback, the OpenAI SDK as the client, the scripted upstream)."""

from __future__ import annotations

import asyncio
import json
import random
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import openai
import pytest

from expert_registry.store import ExpertStore, open_async_redis
from router_gateway.app import create_app
from router_gateway.errors import BudgetExceeded, PermissionDenied, RateLimited
from router_gateway.keys import (
    KeyPolicy,
    KeyRecord,
    KeyStore,
    Limiter,
    cost_nano,
    hash_secret,
    period_end,
    period_key,
    usage_from,
)
from tests.router_gateway.conftest import ADMIN_KEY, make_settings, scripted_experts, serve_in_thread

# up-* experts cost $1 / $2 per 1M tokens and the scripted upstream reports 7 + 3 tokens.
ECHO_COST_NANO = cost_nano(7, 3, 1.0, 2.0)


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _run(coro):
    return asyncio.run(coro)


# -- store -------------------------------------------------------------------------------------
def test_store_keeps_only_a_hash_and_round_trips_policy(store: ExpertStore):
    keys = KeyStore(store.client)
    secret, rec = keys.create("team-a", KeyPolicy(models=["smollm2-*", "router:fleet"], budget_usd=5, rpm=10))
    assert secret.startswith("sy-") and len(secret) > 40 and rec.hint.endswith(secret[-4:])
    assert keys.get(rec.id) == rec and keys.by_hash(hash_secret(secret)) == rec
    assert keys.by_hash(hash_secret(secret + "x")) is None
    # The secret itself is nowhere in Redis.
    for k in store.client.scan_iter("*"):
        kind = store.client.type(k)
        values = (store.client.hgetall(k).values() if kind == "hash" else [store.client.get(k)]
                  if kind == "string" else [])
        assert all(secret not in str(v) for v in values), k
    changed = keys.update(rec.id, {"rpm": 20, "models": None})
    assert (changed.rpm, changed.models, changed.budget_usd) == (20, None, 5)
    with pytest.raises(ValueError, match="read-only"):
        keys.update(rec.id, {"hash": "0" * 64})
    with pytest.raises(ValueError):
        keys.update(rec.id, {"rpm": 0})
    revoked = keys.revoke(rec.id)
    assert revoked.revoked_at is not None and keys.get(rec.id).revoked_at == revoked.revoked_at
    assert keys.version() == 3   # create, update, revoke (the refused updates wrote nothing)


def test_model_patterns():
    rec = KeyRecord(id="k", name="n", hash="h", hint="sy-…", created_at=0, models=["smollm2-*", "router:fleet"])
    assert rec.allows("smollm2-math") and rec.allows("router:fleet?lambda=0.3")
    assert not rec.allows("router:gnn") and not rec.allows("auto") and not rec.allows("other")
    with pytest.raises(PermissionDenied, match="may not use model 'auto'"):
        rec.check_model("auto")


def test_periods_and_costs():
    t = datetime(2026, 11, 24, 15, 30, tzinfo=timezone.utc).timestamp()
    assert [period_key(p, t) for p in ("day", "week", "month", "total")] == ["2026-11-24", "2026-W48", "2026-11",
                                                                             "all"]
    assert period_end("day", t) == datetime(2026, 11, 25, tzinfo=timezone.utc).timestamp()
    assert period_end("week", t) == datetime(2026, 11, 30, tzinfo=timezone.utc).timestamp()   # next Monday
    assert period_end("month", t) == datetime(2026, 12, 1, tzinfo=timezone.utc).timestamp()
    assert period_end("total", t) is None
    assert cost_nano(1_000_000, 0, 0.15, 0.6) == 150_000_000   # $0.15
    assert cost_nano(7, 3, 1.0, 2.0) == 13_000


@pytest.mark.parametrize("usage, expected", [
    ({"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}, (7, 3)),
    ({"prompt_tokens": 5, "total_tokens": 5}, (5, 0)),                   # an embeddings answer
    ({"prompt_tokens": 5, "total_tokens": 9}, None),                     # completion tokens unknown
    ({"prompt_tokens": True, "completion_tokens": 3}, None),             # a bool is not a count
    ({"prompt_tokens": 7, "completion_tokens": -3}, None),               # would credit a budget
    ({"prompt_tokens": 7.0, "completion_tokens": 3}, None),
    ("7 tokens", None),
])
def test_usage_is_read_only_from_non_negative_integer_counts(usage, expected):
    assert usage_from({"usage": usage}) == expected


# -- limiter -----------------------------------------------------------------------------------
def test_requests_per_minute_slide_over_two_windows(store: ExpertStore):
    keys = KeyStore(store.client)
    _, rec = keys.create("rpm", KeyPolicy(rpm=4))
    clock = Clock(60 * 1000 + 30.0)   # half-way through a minute

    async def go():
        limiter = Limiter(keys, open_async_redis(store.client, None), clock)
        for _ in range(4):
            await limiter.admit(rec)
        with pytest.raises(RateLimited) as exc:
            await limiter.admit(rec)
        assert exc.value.status_code == 429 and int(exc.value.headers["retry-after"]) >= 1
        # 45 s into the next minute the previous minute's 4 weigh 4 * 0.25 = 1: three more fit.
        clock.t = 60 * 1001 + 45.0
        for _ in range(3):
            await limiter.admit(rec)
        with pytest.raises(RateLimited) as exc:
            await limiter.admit(rec)
        # 3 + 4 * (1 - x/60) + 1 <= 4 needs x = 60: the next window; retry-after says ~15 s.
        assert 14 <= int(exc.value.headers["retry-after"]) <= 16
        clock.t = 60 * 1003.0   # two quiet minutes later: the full allowance again
        for _ in range(4):
            await limiter.admit(rec)
        await limiter.r.aclose()

    _run(go())


def test_tokens_per_minute_and_budget(store: ExpertStore):
    keys = KeyStore(store.client)
    _, rec = keys.create("tpm", KeyPolicy(tpm=100, budget_usd=0.00005, budget_period="day"))
    # Tomorrow noon: a clock in the past would let Redis expire the spend counter at once
    # (it lives until a week after its period).
    day = datetime.now(timezone.utc).replace(hour=12, minute=0, second=10, microsecond=0) + timedelta(days=1)
    clock = Clock(day.timestamp())
    resets = (day + timedelta(days=1)).strftime("%Y-%m-%d 00:00 UTC")

    async def go():
        limiter = Limiter(keys, open_async_redis(store.client, None), clock)
        await limiter.admit(rec)
        await limiter.record(rec, 60, 40, 10_000)        # 100 tokens: the minute is full
        with pytest.raises(RateLimited, match="100 tokens per minute"):
            await limiter.admit(rec)
        clock.t += 120
        await limiter.admit(rec)
        await limiter.record(rec, 1, 1, 40_000)          # $0.00005 spent: the budget is gone
        with pytest.raises(BudgetExceeded, match=f"resets at {resets}") as exc:
            await limiter.admit(rec)
        assert exc.value.status_code == 402 and exc.value.error_type == "insufficient_quota"
        clock.t += 86400                                 # the next day has a fresh budget
        await limiter.admit(rec)
        await limiter.r.aclose()

    _run(go())
    usage = keys.usage(rec, clock.t - 86400)
    assert usage == {"requests": 2, "input_tokens": 61, "output_tokens": 41, "spend_usd": 5e-05,
                     "period": day.strftime("%Y-%m-%d"), "period_spend_usd": 5e-05}


def test_admits_asked_together_are_checked_in_one_script_call_in_order(store: ExpertStore):
    keys = KeyStore(store.client)
    _, two = keys.create("two-a-minute", KeyPolicy(rpm=2))
    _, broke = keys.create("broke", KeyPolicy(budget_usd=0.001, budget_period="total"))
    _, roomy = keys.create("roomy", KeyPolicy(rpm=100, tpm=10_000))
    _, free = keys.create("free")
    clock = Clock(60 * 1000 + 30.0)

    def evalsha_calls() -> int:
        return store.client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)

    async def go():
        limiter = Limiter(keys, open_async_redis(store.client, None), clock)
        await limiter.record(broke, 0, 0, 1_000_000)     # $0.001: spent
        await limiter.admit(roomy)                       # the script is loaded now
        before = evalsha_calls()
        asked = [two, two, broke, roomy, two, free, roomy]
        results = await asyncio.gather(*(limiter.admit(rec) for rec in asked), return_exceptions=True)
        calls = evalsha_calls() - before
        await limiter.r.aclose()
        return results, calls

    results, calls = _run(go())
    assert calls == 1
    assert [type(r).__name__ for r in results] == ["NoneType", "NoneType", "BudgetExceeded", "NoneType",
                                                   "RateLimited", "NoneType", "NoneType"]
    assert "2 requests per minute" in str(results[4])
    minute = int(clock.t // 60)
    assert store.client.get(keys.window_key(two.id, "r", minute)) == "2"
    assert store.client.get(keys.window_key(roomy.id, "r", minute)) == "3"


def test_a_request_that_stops_waiting_leaves_the_others_of_its_batch_answered(store: ExpertStore):
    keys = KeyStore(store.client)
    _, rec = keys.create("ten", KeyPolicy(rpm=10))

    async def go():
        limiter = Limiter(keys, open_async_redis(store.client, None))
        tasks = [asyncio.ensure_future(limiter.admit(rec)) for _ in range(3)]
        await asyncio.sleep(0)        # all three wait on the same check now
        tasks[1].cancel()
        done = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
        await limiter.r.aclose()
        return done

    first, second, third = _run(go())
    assert first is None and third is None and isinstance(second, asyncio.CancelledError)


def test_concurrent_admits_and_bookings_from_two_limiters_lose_nothing(store: ExpertStore):
    # Two limiters with their own connections stand for two gateway processes.
    keys = KeyStore(store.client)
    _, rec = keys.create("shared", KeyPolicy(rpm=50, budget_usd=1000))

    async def go():
        a, b = (Limiter(keys, open_async_redis(store.client, None)) for _ in range(2))

        async def one(limiter: Limiter) -> bool:
            try:
                await limiter.admit(rec)
            except RateLimited:
                return False
            if random.random() < 0.5:
                await limiter.record(rec, 3, 2, 777)
            else:                                    # batched, as the gateway books
                limiter.book(rec, (3, 2), 0.259, 0.0)     # 3 x 0.259 $/Mtok = 777 nano-USD
            await asyncio.sleep(random.random() / 100)
            return True

        results = await asyncio.gather(*(one(a if i % 2 else b) for i in range(200)))
        for lim in (a, b):
            await lim.drain()
            await lim.r.aclose()
        return results

    admitted = sum(_run(go()))
    # The whole run fits in one or two clock minutes; the sliding estimate never admits
    # more than the limit, and never fewer unless a minute boundary fell inside the run.
    assert 45 <= admitted <= 50
    usage = keys.usage(rec)
    assert usage["requests"] == admitted and usage["spend_usd"] == pytest.approx(admitted * 777e-9)
    assert (usage["input_tokens"], usage["output_tokens"]) == (3 * admitted, 2 * admitted)


# -- the gateway with managed keys ---------------------------------------------------------------
@pytest.fixture
def keyed_gateway(store: ExpertStore, data_dir: Path, scripted_upstream: str):
    for spec in scripted_experts(scripted_upstream):
        store.put(spec)
    app = create_app(make_settings(data_dir, api_keys=[]), store)
    with serve_in_thread(app) as url:
        yield url, app


def _admin(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)


def _sdk(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def _drain(app) -> None:
    """Wait for the gateway's background bookings (they run on its server thread's loop)."""
    import time

    limiter = app.state.limiter
    deadline = time.monotonic() + 10
    while limiter.busy and time.monotonic() < deadline:
        time.sleep(0.02)


def test_gateway_is_open_until_the_first_key_then_enforces_it(keyed_gateway, store: ExpertStore):
    url, app = keyed_gateway
    msgs = [{"role": "user", "content": "hi"}]
    with httpx.Client(base_url=url, timeout=30) as anon:
        assert anon.post("/v1/chat/completions", json={"model": "up-echo", "messages": msgs}).status_code == 200
        with _admin(url) as admin:
            made = admin.post("/v1/keys", json={"name": "team-a", "models": ["up-*"], "rpm": 100})
            assert made.status_code == 201, made.text
            secret, key_id = made.json()["key"], made.json()["id"]
            assert "hash" not in made.json() and made.json()["usage"]["requests"] == 0
            # No key now means 401; an unknown key too; the admin key still works.
            r = anon.post("/v1/chat/completions", json={"model": "up-echo", "messages": msgs})
            assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
            sdk = _sdk(url, secret)
            answer = sdk.chat.completions.create(model="up-echo", messages=msgs)
            assert answer.choices[0].message.content == "hello there"
            with pytest.raises(openai.PermissionDeniedError, match="may not use model 'echo'"):
                sdk.chat.completions.create(model="echo", messages=msgs)
            assert {m.id for m in sdk.models.list()} == {"up-echo", "up-fail500", "up-bad400", "up-slow",
                                                         "up-breakstream", "up-garbage"}
            assert sdk.models.retrieve("up-echo").id == "up-echo"
            with pytest.raises(openai.NotFoundError):   # it exists, but not for this key
                sdk.models.retrieve("echo")
            with pytest.raises(openai.AuthenticationError):
                _sdk(url, secret[:-1] + "x").chat.completions.create(model="up-echo", messages=msgs)
            # A client key cannot manage keys.
            r = anon.get("/v1/keys", headers={"authorization": f"Bearer {secret}"})
            assert r.status_code == 403
            _drain(app)
            listed = admin.get("/v1/keys").json()["data"]
            assert [k["id"] for k in listed] == [key_id]
            assert listed[0]["usage"]["requests"] == 1
            assert listed[0]["usage"]["spend_usd"] == pytest.approx(ECHO_COST_NANO / 1e9)
            # Revoked: refused at once in this process; the record stays.
            assert admin.delete(f"/v1/keys/{key_id}").json()["revoked"] is True
            with pytest.raises(openai.AuthenticationError, match="revoked"):
                sdk.chat.completions.create(model="up-echo", messages=msgs)
            assert admin.get(f"/v1/keys/{key_id}").json()["revoked_at"] is not None
            # Revoking every key does not reopen the gateway.
            assert anon.post("/v1/chat/completions", json={"model": "up-echo", "messages": msgs}).status_code == 401


def test_rate_limit_and_budget_over_http(keyed_gateway):
    url, app = keyed_gateway
    msgs = [{"role": "user", "content": "hi"}]
    with _admin(url) as admin:
        rpm_key = admin.post("/v1/keys", json={"name": "rpm", "rpm": 2}).json()["key"]
        budget = admin.post("/v1/keys", json={"name": "budget", "budget_usd": 2.5 * ECHO_COST_NANO / 1e9,
                                              "budget_period": "total"}).json()
    sdk = _sdk(url, rpm_key)
    with pytest.raises(openai.BadRequestError):   # refused before it counts: the two below still pass
        sdk.embeddings.create(model="auto", input="a cat")
    for _ in range(2):
        sdk.chat.completions.create(model="up-echo", messages=msgs)
    with pytest.raises(openai.RateLimitError) as exc:
        sdk.chat.completions.create(model="up-echo", messages=msgs)
    assert int(exc.value.response.headers["retry-after"]) >= 1
    assert exc.value.body["code"] == "rate_limit_exceeded"

    spender = _sdk(url, budget["key"])
    for _ in range(3):   # the third starts under budget (2 x cost spent) and overshoots it
        spender.chat.completions.create(model="up-echo", messages=msgs)
        _drain(app)
    with pytest.raises(openai.APIStatusError) as exc:
        spender.chat.completions.create(model="up-echo", messages=msgs)
    assert exc.value.status_code == 402 and exc.value.body["type"] == "insufficient_quota"
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/health").status_code == 200


def test_a_key_reads_its_own_limits_and_spend(keyed_gateway):
    url, app = keyed_gateway
    msgs = [{"role": "user", "content": "hi"}]

    def own(key: str | None) -> httpx.Response:
        return httpx.get(f"{url}/v1/key", headers={"authorization": f"Bearer {key}"} if key else {}, timeout=30)

    opened = own(None).json()   # before any key: open, unlimited
    assert (opened["kind"], opened["unlimited"], opened["id"]) == ("open", True, None)
    with _admin(url) as admin:
        made = admin.post("/v1/keys", json={"name": "team-a", "models": ["up-*"], "budget_usd": 1.0,
                                            "budget_period": "day", "rpm": 60}).json()
        other = admin.post("/v1/keys", json={"name": "team-b"}).json()
    for _ in range(2):
        _sdk(url, made["key"]).chat.completions.create(model="up-echo", messages=msgs)
    _drain(app)
    mine = own(made["key"]).json()
    assert (mine["id"], mine["name"], mine["kind"], mine["unlimited"]) == (made["id"], "team-a", "managed", False)
    assert (mine["models"], mine["rpm"], mine["budget_usd"], mine["budget_period"]) == (["up-*"], 60, 1.0, "day")
    assert "hash" not in mine and made["key"] not in json.dumps(mine)       # never the secret
    assert mine["usage"]["requests"] == 2
    assert mine["budget_left_usd"] == pytest.approx(1.0 - 2 * ECHO_COST_NANO / 1e9)
    day = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)
    assert mine["period_resets_at"] == day.timestamp()
    theirs = own(other["key"]).json()   # another key sees only itself
    assert (theirs["id"], theirs["usage"]["requests"], theirs["unlimited"], theirs["budget_left_usd"]) == \
        (other["id"], 0, True, None)
    assert own(ADMIN_KEY).json()["kind"] == "admin"
    assert own(None).status_code == 401 and own("sy-nope").status_code == 401
    with _admin(url) as admin:
        admin.delete(f"/v1/keys/{made['id']}")
    assert own(made["key"]).json()["error"]["code"] == "revoked_api_key"


def test_embeddings_are_metered_by_their_prompt_tokens(keyed_gateway):
    url, app = keyed_gateway
    with _admin(url) as admin:
        made = admin.post("/v1/keys", json={"name": "embedder", "budget_usd": 1.0}).json()
    answer = _sdk(url, made["key"]).embeddings.create(model="up-echo", input=["a cat", "a dog on a mat"])
    assert answer.usage.prompt_tokens == answer.usage.total_tokens == 14   # 7 words, 2 tokens each
    _drain(app)
    with _admin(url) as admin:
        usage = admin.get(f"/v1/keys/{made['id']}").json()["usage"]
    assert (usage["requests"], usage["input_tokens"], usage["output_tokens"]) == (1, 14, 0)
    assert usage["spend_usd"] == pytest.approx(14 * 1.0 / 1e6)   # up-echo: $1 per 1M input tokens


def test_streams_are_metered_without_changing_what_the_client_sees(keyed_gateway):
    url, app = keyed_gateway
    msgs = [{"role": "user", "content": "hi"}]
    with _admin(url) as admin:
        made = admin.post("/v1/keys", json={"name": "streams"}).json()
    sdk = _sdk(url, made["key"])
    plain = list(sdk.chat.completions.create(model="up-echo", messages=msgs, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in plain if c.choices) == "hello there"
    assert all(c.usage is None for c in plain)        # not asked for: the usage chunk is dropped
    asked = list(sdk.chat.completions.create(model="up-echo", messages=msgs, stream=True,
                                             stream_options={"include_usage": True}))
    assert asked[-1].usage is not None and asked[-1].usage.prompt_tokens == 7
    _drain(app)
    with _admin(url) as admin:
        usage = admin.get(f"/v1/keys/{made['id']}").json()["usage"]
    assert usage["requests"] == 2 and usage["output_tokens"] == 6
    assert usage["spend_usd"] == pytest.approx(2 * ECHO_COST_NANO / 1e9)


@pytest.mark.parametrize("body,status,needle", [
    ({"rpm": 5}, 400, "'name' is required"),
    ({"name": "x", "rpm": 0}, 400, "rpm"),
    ({"name": "x", "budget_usd": -1}, 400, "budget_usd"),
    ({"name": "x", "budget_usd": 1e308}, 400, "budget_usd"),    # found by fuzzing: a 500 on the key's next call
    ({"name": "x", "rpm": 10**30}, 400, "rpm"),
    ({"name": "x", "budget_period": "year"}, 400, "budget_period"),
    ({"name": "x", "models": "up-echo"}, 400, "models"),
    ({"name": "x", "hash": "abc"}, 400, "hash"),
    ([1, 2], 400, "JSON object"),
])
def test_bad_key_requests_are_clear_400s(keyed_gateway, body, status, needle):
    url, _ = keyed_gateway
    with _admin(url) as admin:
        r = admin.post("/v1/keys", json=body)
        assert r.status_code == status and needle in r.json()["error"]["message"], r.text
        assert admin.patch("/v1/keys/key-nope", json={"rpm": 3}).status_code == 404
        assert admin.delete("/v1/keys/key-nope").status_code == 404
        made = admin.post("/v1/keys", json={"name": "ok"}).json()
        r = admin.patch(f"/v1/keys/{made['id']}", json={"id": "other"})
        assert r.status_code == 400 and "read-only" in r.json()["error"]["message"]
        r = admin.patch(f"/v1/keys/{made['id']}", json={"tpm": 1000})
        assert r.status_code == 200 and r.json()["tpm"] == 1000
        assert admin.get("/health").json()["status"] == "ok"


def test_cli_manages_keys_across_processes(tmp_path: Path):
    from tests.router_gateway.test_cli import sy

    d = tmp_path / "data"
    made = json.loads(sy(d, "keys", "create", "ci", "--models", "up-*,router:fleet", "--budget", "2",
                         "--period", "day", "--rpm", "30", "--json").stdout)
    assert made["key"].startswith("sy-") and made["models"] == ["up-*", "router:fleet"]
    assert (made["budget_usd"], made["budget_period"], made["rpm"]) == (2.0, "day", 30)
    sy(d, "keys", "update", made["id"], "--tpm", "500", "--clear", "rpm")
    shown = json.loads(sy(d, "keys", "show", made["id"]).stdout)
    assert (shown["tpm"], shown["rpm"]) == (500, None) and "hash" not in shown
    bad = sy(d, "keys", "create", "x", "--period", "year", check=False)
    assert bad.returncode == 1 and "budget_period" in bad.stderr and "Traceback" not in bad.stderr
    assert sy(d, "keys", "revoke", "key-nope", check=False).returncode == 1
    sy(d, "keys", "revoke", made["id"])
    assert json.loads(sy(d, "keys", "list", "--json").stdout) == []
    listed = json.loads(sy(d, "keys", "list", "--json", "--all").stdout)
    assert [k["id"] for k in listed] == [made["id"]] and listed[0]["revoked_at"] is not None


def test_without_redis_limits_are_skipped_and_unknown_keys_are_a_503(store: ExpertStore, tmp_path: Path):
    # Degraded mode, as documented: a Redis that cannot be reached (a socket nobody serves).
    import redis
    import redis.asyncio as aredis

    from router_gateway.auth import KeyCache
    from router_gateway.errors import StoreUnavailable

    keys = KeyStore(store.client)
    _, rec = keys.create("limited", KeyPolicy(rpm=1))
    gone = str(tmp_path / "nobody.sock")

    async def go():
        limiter = Limiter(keys, aredis.Redis(unix_socket_path=gone))
        for _ in range(3):             # rpm=1 is not enforced without the store, and nothing raises
            await limiter.admit(rec)
        cache = KeyCache(KeyStore(redis.Redis(unix_socket_path=gone)))
        cache.by_hash[hash_secret("sy-seen-before")] = rec   # cached before the store went away
        assert await cache.lookup("sy-seen-before") == rec
        with pytest.raises(StoreUnavailable) as exc:
            await cache.lookup("sy-a-key-never-seen")
        assert exc.value.status_code == 503

    _run(go())


def test_a_wrong_key_reaches_the_store_once_per_key_version(store: ExpertStore, monkeypatch):
    from router_gateway import auth

    keys = KeyStore(store.client)
    keys.create("first")
    calls = []
    real = keys.by_hash
    monkeypatch.setattr(keys, "by_hash", lambda digest: calls.append(digest) or real(digest))  # counts, then asks Redis

    async def go():
        cache = auth.KeyCache(keys)
        await cache.refresh()
        assert [await cache.lookup("sy-wrong") for _ in range(3)] == [None] * 3
        assert len(calls) == 1
        secret, rec = keys.create("made-elsewhere")   # as by another process: this cache has not refreshed
        assert (await cache.lookup(secret)).id == rec.id and len(calls) == 2
        assert await cache.lookup("sy-wrong") is None and len(calls) == 2
        await cache.refresh()                          # the key version moved: misses are asked again
        assert await cache.lookup("sy-wrong") is None and len(calls) == 3
        monkeypatch.setattr(auth, "MISSES_MAX", 3)
        for i in range(5):
            assert await cache.lookup(f"sy-random-{i}") is None
        assert len(cache.misses) <= 3

    _run(go())
