"""``max_concurrency`` counted across the gateway: places are leases in the embedded real
Redis, shared by every process and gateway on it, renewed while held, lapsing when their
holder is gone; without Redis each process counts its own."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from pathlib import Path

import pytest
import redis

from expert_registry.http1 import HTTP1Client
from expert_registry.spec import ExpertSpec
from expert_registry.store import ExpertStore, open_async_redis
from expert_registry.upstream import HTTPUpstream
from router_gateway.aggregate import Aggregation
from router_gateway.app import create_app
from router_gateway.errors import ExpertUnavailable
from router_gateway import slots as slots_module
from router_gateway.slots import Slots
from tests.router_gateway.conftest import ADMIN_KEY, Gateway, make_settings, serve_in_thread

MSGS = [{"role": "user", "content": "hi"}]


def _in_redis(store: ExpertStore, expert: str) -> int:
    return store.client.zcard(f"{store.prefix}inflight:{expert}")


def _given_back_now(store: ExpertStore, expert: str, within_s: float = 5.0) -> bool:
    """Wait (blocking: the gateways run in other threads) until ``expert`` holds no place
    in Redis."""
    deadline = time.monotonic() + within_s
    while _in_redis(store, expert) and time.monotonic() < deadline:
        time.sleep(0.01)
    return _in_redis(store, expert) == 0


async def _given_back(store: ExpertStore, expert: str, within_s: float = 5.0) -> bool:
    """Wait until ``expert`` holds no place in Redis (give-backs go out on a later turn,
    within a few ms unless the machine is busy)."""
    deadline = time.monotonic() + within_s
    while _in_redis(store, expert) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return _in_redis(store, expert) == 0


def test_two_gateways_on_one_redis_share_an_experts_cap(store: ExpertStore, data_dir: Path, scripted_upstream: str):
    """A stream held open through one gateway takes the expert's only place: the other
    gateway sends its request to the fallback, until the stream is over."""
    store.put(ExpertSpec(name="up-echo", backend="openai", base_url=scripted_upstream, served_model="echo"))
    store.put(ExpertSpec(name="held", backend="openai", base_url=scripted_upstream, served_model="slowstream",
                         max_concurrency=1, fallbacks=["up-echo"]))
    with serve_in_thread(create_app(make_settings(data_dir), store)) as one, \
            serve_in_thread(create_app(make_settings(data_dir), store)) as two, \
            Gateway(one, store).client() as a, Gateway(two, store).client() as b:
        def ask(c, model: str = "held") -> str:
            r = c.post("/v1/chat/completions", json={"model": model, "messages": MSGS})
            assert r.status_code == 200, r.text
            return r.headers["x-switchyard-expert"]

        assert ask(a) == ask(b) == "held"   # plain answers give their place back,
        assert _given_back_now(store, "held")  # on a later turn than the answer went out
        with a.stream("POST", "/v1/chat/completions", json={"model": "held", "messages": MSGS,
                                                            "stream": True}) as open_stream:
            assert open_stream.headers["x-switchyard-expert"] == "held"
            next(open_stream.iter_bytes())
            assert _in_redis(store, "held") == 1
            gauges = b.get("/metrics").text   # the other gateway's scrape sees the place taken
            assert 'switchyard_expert_in_flight{expert="held"} 1.0' in gauges
            assert 'switchyard_expert_max_concurrency{expert="held"} 1.0' in gauges
            assert 'switchyard_expert_in_flight{expert="up-echo"}' not in gauges   # no cap, no gauge
            with Gateway(two, store).client(ADMIN_KEY) as admin:
                assert admin.get("/v1/experts/held").json()["in_flight"] == 1
                listed = {e["name"]: e for e in admin.get("/v1/experts").json()["data"]}
                assert listed["held"]["in_flight"] == 1 and "in_flight" not in listed["up-echo"]
            assert ask(b) == "up-echo"
            assert ask(a) == "up-echo"
        deadline = time.monotonic() + 5   # the client left: the place comes back when the relay ends
        while ask(b) != "held":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert _given_back_now(store, "held")   # given back just after the answer went out
        assert 'switchyard_expert_in_flight{expert="held"} 0.0' in a.get("/metrics").text


def test_a_place_lapses_when_its_holder_stops_renewing_it(store: ExpertStore):
    async def go():
        aredis = open_async_redis(store.client, None)
        gone, alive, other = (Slots(aredis, store.prefix, lease_s=0.6) for _ in range(3))
        renewing = asyncio.create_task(alive.run())
        try:
            assert await gone.take("x", 2) is not None   # a process that dies holding its place
            kept = await alive.take("x", 2)               # one that lives and renews
            assert kept is not None
            assert await other.take("x", 2) is None
            await asyncio.sleep(1.5)                      # 2.5 leases
            assert _in_redis(store, "x") == 2 and await other.counts(["x", "y"]) == {"x": 1, "y": 0}
            place = await other.take("x", 2)              # the dead one's place has lapsed, not the live one's
            assert place is not None
            assert await other.take("x", 2) is None
            kept()
            place()
            assert await _given_back(store, "x")
            assert await other.take("x", 2) is not None
        finally:
            renewing.cancel()
            await aredis.aclose()

    asyncio.run(go())


def test_places_given_back_are_free_for_takes_in_the_same_turn(store: ExpertStore):
    async def go():
        aredis = open_async_redis(store.client, None)
        slots = Slots(aredis, store.prefix)
        try:
            places = await asyncio.gather(*(slots.take("x", 3) for _ in range(5)))
            assert sum(p is not None for p in places) == 3   # one script call: exactly the cap
            held = [p for p in places if p is not None]
            assert [p.crowded for p in held] == [False, True, True]   # over half the cap held with it
            held[0]()
            held[0]()   # a second call gives nothing back twice
            again = await asyncio.gather(*(slots.take("x", 3) for _ in range(2)))
            assert [p is not None for p in again] == [True, False]
            assert slots.local["x"] == 3 and _in_redis(store, "x") == 3
            # a take whose request went away gives back what it got
            waiting = asyncio.ensure_future(slots.take("y", 1))
            await asyncio.sleep(0)
            waiting.cancel()
            await slots.drain()   # the take went out all the same; what it got goes back after
            assert await _given_back(store, "y") and "y" not in slots.local
            for p in [*held[1:], again[0]]:
                p()
            # with room to spare a give-back waits a moment for a take to travel with
            roomy = await slots.take("z", 100)
            roomy()
            assert slots._later is not None and slots._ops[-1][:3] == ("r", slots.key("z"), roomy.member)
            await slots.drain()
            assert _in_redis(store, "x") == _in_redis(store, "z") == 0
            assert slots.local["x"] == slots.local["z"] == 0 and not slots.held
        finally:
            await aredis.aclose()

    asyncio.run(go())


def test_without_redis_each_process_counts_its_own(caplog: pytest.LogCaptureFixture):
    with socket.socket() as s:   # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def go():
        client = open_async_redis(None, f"redis://127.0.0.1:{port}/0")   # as a gateway opens it
        slots = Slots(client)
        try:
            first = await slots.take("x", 1)
            assert first is not None and await slots.take("x", 1) is None
            assert await slots.counts(["x"]) == {"x": 1}   # this process's own count
            first()
            assert await slots.take("x", 1) is not None
        finally:
            await client.aclose()

    with caplog.at_level(logging.WARNING, logger="router_gateway.slots"):
        asyncio.run(go())
    warned = [r for r in caplog.records if "per gateway process" in r.getMessage()]
    assert len(warned) == 1   # once per outage, not per request


def test_a_recruit_at_its_cap_is_left_out_and_all_of_them_full_is_a_503(scripted_upstream: str):
    """Aggregation: a recruited expert takes a place for its call, like a chosen one."""
    async def go():
        client = HTTP1Client(8, 1.0, 5.0)
        slots = Slots(None)
        upstream = HTTPUpstream(client)
        capped = ExpertSpec(name="capped", backend="openai", base_url=scripted_upstream, served_model="echo",
                            max_concurrency=1)
        free = ExpertSpec(name="free", backend="openai", base_url=scripted_upstream, served_model="echo")
        agg = Aggregation(lambda spec: upstream, slots=slots)
        body = {"model": "router:x?k=2", "messages": MSGS}
        try:
            held = await slots.take("capped", 1)
            _, good, bad = await agg.gather("chat/completions", body, (capped, free), "rid")
            assert [a.expert.name for a in good] == ["free"]
            assert [a.expert.name for a in bad] == ["capped"] and bad[0].full and "max_concurrency" in bad[0].error
            with pytest.raises(ExpertUnavailable) as full:
                await agg.gather("chat/completions", body, (capped,), "rid")
            assert full.value.headers == {"retry-after": "1"} and "max_concurrency" in full.value.message
            held()
            _, good, bad = await agg.gather("chat/completions", body, (capped, free), "rid")
            assert len(good) == 2 and not bad
            assert slots.local["capped"] == 0   # its place went back after its answer
        finally:
            await client.aclose()

    asyncio.run(go())


def test_places_taken_while_redis_was_down_count_across_the_gateway_once_it_is_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from tests.router_gateway.test_faults import RedisProcess

    monkeypatch.setattr(slots_module, "RETRY_S", 0.2)
    server = RedisProcess(tmp_path / "redis")
    server.start()
    sync = redis.Redis.from_url(server.url)

    def in_redis() -> int:
        return sync.zcard("switchyard:inflight:x")

    async def go():
        client, other_client = open_async_redis(None, server.url), open_async_redis(None, server.url)
        slots, other = Slots(client), Slots(other_client)   # two gateway processes
        try:
            before = await slots.take("x", 3)
            assert before is not None and in_redis() == 1
            server.kill()
            during = await slots.take("x", 3)              # counted in this process only
            assert during is not None and slots.unseen
            server.start()
            await asyncio.sleep(0.3)
            after = await slots.take("x", 3)               # the store answers again
            assert after is not None
            await slots.drain()
            assert in_redis() == 3 and not slots.unseen    # the place taken while it was down included
            assert await other.take("x", 3) is None        # so the other process sees the cap reached
            during()
            await slots.drain()
            assert in_redis() == 2
            assert await other.take("x", 3) is not None
            before()
            after()
            await slots.drain()
        finally:
            await client.aclose()
            await other_client.aclose()

    try:
        asyncio.run(go())
    finally:
        sync.close()
        server.kill()


def test_a_script_call_is_packed_as_the_generic_packer_would():
    from router_gateway.resp import command

    slots = Slots(None, "sy:", lease_s=2.5)
    ops = [("t", "sy:inflight:x", "host:1:ab:0", 3, None), ("r", "sy:inflight:ü-modèle", "host:1:ab:1", 0, None),
           ("n", "sy:inflight:x", "hôte:1:ab:2", 0, None), ("t", "sy:inflight:x", "host:1:ab:3", 1000, None)]
    args = ["2500"]
    for kind, _, member, limit, _ in ops:
        args += (kind, member, str(limit))
    assert slots._pack(ops) == command("EVALSHA", slots_module._SHA, "4", *(op[1] for op in ops), *args)
    assert slots._pack(ops[:1]) == command("EVALSHA", slots_module._SHA, "1", "sy:inflight:x", "2500", "t",
                                           "host:1:ab:0", "3")


def test_the_script_keeps_count_of_a_set_within_one_call(store: ExpertStore):
    key = f"{store.prefix}inflight:x"
    ops = [("t", "m0", 3), ("t", "m1", 3), ("r", "m1", 0), ("t", "m2", 3), ("t", "m3", 3), ("t", "m4", 3)]
    args = [a for op in ops for a in (op[0], op[1], str(op[2]))]
    replies = store.client.eval(slots_module._SCRIPT, len(ops), *[key] * len(ops), "30000", *args)
    assert replies == [1, 2, 1, 2, 3, 0]   # places held with each take; the last finds the cap reached
    assert sorted(store.client.zrange(key, 0, -1)) == ["m0", "m2", "m3"]
    assert 0 < store.client.pttl(key) <= 60000   # two leases: a set nobody renews goes away
