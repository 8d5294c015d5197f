"""OpenAI's Responses API through the gateway, with the real OpenAI SDK: routing on the
input, typed streams, usage booked against keys, and stored responses reached where
they live. Two scripted upstreams on loopback stand in for two servers: each stores
the responses it made and answers 404 for any other id, as vLLM and OpenAI do, so a
continuation sent to the wrong server fails."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest

from expert_registry.spec import ExpertSpec
from expert_registry.store import ExpertStore, open_redis
from router_gateway.app import create_app
from tests.router_gateway.conftest import ADMIN_KEY, CLIENT_KEY, Gateway, make_settings, serve_in_thread
from tests.router_gateway.test_routing import EXPERT_MAP, MATH_Q, POEM_Q, PRICES, train_router


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[str, str]]:
    from tests.router_gateway.scripted_upstream import app

    with serve_in_thread(app) as a, serve_in_thread(app) as b:
        yield a + "/v1", b + "/v1"


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


@pytest.fixture(scope="module")
def gw(tmp_path_factory, servers) -> Iterator[Gateway]:
    """math-expert and generalist on server A, the poet on server B, 'rep' on both (A
    first), 'lite' on A through litellm, 'breaker' on A (its streams break after two
    events); the TF-IDF classifier as the default router."""
    a, b = servers
    router_dir = train_router(tmp_path_factory.mktemp("router"))
    data_dir = tmp_path_factory.mktemp("responses") / "data"
    store = ExpertStore(open_redis(None, data_dir))
    for name, (inp, out) in PRICES.items():
        store.put(ExpertSpec(name=name, backend="openai", base_url=b if name == "poet" else a,
                             served_model=f"served-{name}", input_price_per_mtok=inp, output_price_per_mtok=out))
    store.put(ExpertSpec(name="rep", backend="openai", base_url=a, replicas=[b], served_model="served-rep"))
    store.put(ExpertSpec(name="lite", backend="litellm", base_url=a, served_model="openai/served-lite"))
    store.put(ExpertSpec(name="breaker", backend="openai", base_url=a, served_model="breakstream"))
    app = create_app(make_settings(data_dir, upstream_timeout_s=20), store)
    try:
        with serve_in_thread(app) as url:
            g = Gateway(url, store)
            with g.client(ADMIN_KEY) as c:
                r = c.post("/v1/routers", json={"name": "classifier", "router_dir": str(router_dir),
                                                "expert_map": EXPERT_MAP, "default": True})
                assert r.status_code == 201, r.text
            yield g
    finally:
        store.client.shutdown(nosave=True)


def sdk(gw: Gateway, key: str = CLIENT_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=30)


def create(gw: Gateway, key: str = CLIENT_KEY, **kw):
    raw = sdk(gw, key).responses.with_raw_response.create(**kw)
    return raw.headers, raw.parse()


def _key(gw: Gateway, **fields) -> dict:
    with gw.client(ADMIN_KEY) as admin:
        r = admin.post("/v1/keys", json=fields)
        assert r.status_code == 201, r.text
        return r.json()


def test_a_response_plain_and_streamed_comes_back_under_the_name_asked_for(gw: Gateway, servers):
    a, _ = servers
    headers, resp = create(gw, model="math-expert", input="hi", max_output_tokens=20)
    assert headers["x-switchyard-expert"] == "math-expert" and headers["x-switchyard-router"] == "direct"
    assert resp.model == "math-expert" and resp.output_text == f"server {_port(a)} answers"
    received = resp.to_dict()["received"]
    assert received["model"] == "served-math-expert" and received["max_output_tokens"] == 20
    assert "stream_options" not in received      # the Responses API reports usage in every stream

    events = list(sdk(gw).responses.create(model="math-expert", input="hi", stream=True))
    assert [e.type for e in events] == ["response.created", "response.in_progress", "response.output_text.delta",
                                        "response.output_text.delta", "response.completed"]
    assert events[0].response.model == events[-1].response.model == "math-expert"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == f"server {_port(a)} answers"
    with gw.client() as c:    # the events keep their names (event: lines) for clients that read them
        r = c.post("/v1/responses", json={"model": "math-expert", "input": "hi", "stream": True})
    assert r.status_code == 200 and r.text.startswith("event: response.created\ndata: {")
    assert r.text.count("event: ") == 5 and "[DONE]" not in r.text


def test_usage_is_booked_from_input_and_output_tokens(gw: Gateway):
    k = _key(gw, name="resp-usage", budget_usd=1.0)
    create(gw, k["key"], model="generalist", input="hi")
    list(sdk(gw, k["key"]).responses.create(model="generalist", input="hi", stream=True))
    time.sleep(0.5)   # bookings are written in the background
    with gw.client(ADMIN_KEY) as admin:
        usage = admin.get(f"/v1/keys/{k['id']}").json()["usage"]
    assert (usage["requests"], usage["input_tokens"], usage["output_tokens"]) == (2, 22, 10)
    assert usage["spend_usd"] == pytest.approx(2 * (11 * 1.0 + 5 * 2.0) / 1e6)


def test_a_routed_conversation_continues_on_the_server_that_stored_it(gw: Gateway, servers):
    a, b = servers
    headers, first = create(gw, model="router:classifier", input=[{"role": "user", "content": MATH_Q}])
    assert headers["x-switchyard-expert"] == "math-expert" and headers["x-switchyard-router"] == "classifier"
    # A poem goes to the poet on server B when asked afresh...
    headers, fresh = create(gw, model="auto", input=POEM_Q)
    assert headers["x-switchyard-expert"] == "poet" and fresh.output_text == f"server {_port(b)} answers"
    # ...but continuing the arithmetic conversation goes where it is stored, under either name.
    headers, second = create(gw, model="auto", input=[{"role": "user", "content": [
        {"type": "input_text", "text": POEM_Q}]}], previous_response_id=first.id)
    assert headers["x-switchyard-expert"] == "math-expert" and headers["x-switchyard-router"] == "pinned"
    assert second.output_text == f"server {_port(a)} answers after {first.id}" and second.model == "auto"
    events = list(sdk(gw).responses.create(model="router:classifier", input=POEM_Q, stream=True,
                                           previous_response_id=second.id))
    third = events[-1].response
    assert third.output_text == f"server {_port(a)} answers after {second.id}"
    # The streamed answer's id was remembered before its first event was sent on.
    headers, fourth = create(gw, model="auto", input=POEM_Q, previous_response_id=third.id)
    assert fourth.output_text.endswith(f"after {third.id}")
    # Naming another expert asks that one, which does not have it: its 404 comes through.
    with pytest.raises(openai.NotFoundError, match="not found"):
        create(gw, model="poet", input=POEM_Q, previous_response_id=first.id)


def test_route_explains_a_responses_body(gw: Gateway):
    with gw.client() as c:
        for inp, chosen in ((POEM_Q, "poet"), ([{"type": "message", "role": "user", "content": MATH_Q}], "math-expert")):
            r = c.post("/v1/route", json={"model": "auto", "input": inp, "max_output_tokens": 50})
            assert r.status_code == 200, r.text
            assert r.json()["chosen"] == chosen and r.json()["query_chars"] == len(POEM_Q if chosen == "poet" else MATH_Q)
        r = c.post("/v1/route", json={"model": "auto"})
        assert r.status_code == 400 and "'input'" in r.json()["error"]["message"]


def test_a_continuation_stays_on_the_replica_that_stored_it(gw: Gateway, servers):
    """Replicas take requests in turn; a continuation must not."""
    ports = []
    headers, resp = create(gw, model="rep", input="hi")
    ports.append(resp.output_text.split()[1])
    replica = headers["x-switchyard-replica"]
    for _ in range(4):
        headers, resp = create(gw, model="rep", input="more", previous_response_id=resp.id)
        assert resp.output_text.endswith(f"after {resp.previous_response_id}")
        assert headers["x-switchyard-router"] == "pinned" and headers["x-switchyard-replica"] == replica
        ports.append(resp.output_text.split()[1])
    assert len(set(ports)) == 1
    got = sdk(gw).responses.with_raw_response.retrieve(resp.id)
    assert got.headers["x-switchyard-replica"] == replica and got.parse().output_text.split()[1] == ports[0]
    fresh = {create(gw, model="rep", input="hi")[1].output_text.split()[1] for _ in range(4)}
    assert fresh == {str(_port(u)) for u in servers}      # fresh requests do spread


def test_stored_responses_are_retrieved_cancelled_listed_and_deleted_where_they_live(gw: Gateway, servers):
    _, b = servers
    _, made = create(gw, model="auto", input=POEM_Q)
    client = sdk(gw)
    got = client.responses.retrieve(made.id)
    assert got.id == made.id and got.model == "auto" and got.output_text == f"server {_port(b)} answers"
    items = client.responses.input_items.list(made.id, limit=5)
    assert items.data[0].role == "user" and items.to_dict()["query"] == "limit=5"
    assert client.responses.cancel(made.id).status == "cancelled"
    client.responses.delete(made.id)
    with pytest.raises(openai.NotFoundError) as info:
        client.responses.retrieve(made.id)
    assert info.value.body["code"] == "response_not_found"
    with gw.client() as c:   # one metrics label for all of them, not one per id
        lines = [ln for ln in c.get("/metrics").text.splitlines() if ln.startswith("switchyard_requests_total{")]
    assert any('route="/v1/responses"' in ln and 'code="404"' in ln for ln in lines)
    assert not any(made.id in ln for ln in lines)


def test_a_streamed_retrieve_is_relayed_as_it_comes_and_resumes(gw: Gateway, servers):
    """A background response's events, read again (``stream=true``) from where a client
    left off; the upstream holds back all but the first two until the client has them."""
    from tests.router_gateway.scripted_upstream import hold_stream

    _, b = servers
    _, made = create(gw, model="auto", input=POEM_Q)
    release = hold_stream(made.id)
    with sdk(gw).responses.retrieve(made.id, stream=True) as stream:
        events = iter(stream)
        first = next(events)
        assert first.type == "response.created" and first.response.model == "auto"
        release.set()
        rest = list(events)
    assert [e.type for e in rest] == ["response.in_progress", "response.output_text.delta",
                                      "response.output_text.delta", "response.completed"]
    assert rest[-1].response.model == "auto" and rest[-1].response.output_text == f"server {_port(b)} answers"
    resumed = list(sdk(gw).responses.retrieve(made.id, stream=True, starting_after=2))
    assert [(e.type, e.sequence_number) for e in resumed] == [("response.output_text.delta", 3),
                                                             ("response.completed", 4)]


def test_a_stream_that_breaks_ends_with_the_responses_error_event(gw: Gateway):
    events = list(sdk(gw).responses.create(model="breaker", input="hi", stream=True))
    assert [e.type for e in events] == ["response.created", "response.in_progress", "error"]
    error = events[-1]
    assert error.sequence_number == 2 and error.code == "upstream_error" and "'breaker'" in error.message
    with gw.client() as c:   # typed, and no chat-style [DONE] after it
        r = c.post("/v1/responses", json={"model": "breaker", "input": "hi", "stream": True})
        assert r.text.endswith('"sequence_number":2}\n\n') and "\nevent: error\ndata: {" in r.text
        assert "[DONE]" not in r.text
        assert c.post("/v1/responses", json={"model": "math-expert", "input": "hi"}).status_code == 200


def test_ids_belong_to_the_key_that_made_them(gw: Gateway):
    mine, theirs = _key(gw, name="resp-mine"), _key(gw, name="resp-theirs")
    _, made = create(gw, mine["key"], model="auto", input=MATH_Q)
    for key in (theirs["key"], CLIENT_KEY):
        for model in ("auto", "math-expert"):   # naming the expert that holds it is no way around
            with pytest.raises(openai.NotFoundError) as info:
                create(gw, key, model=model, input="go on", previous_response_id=made.id)
            assert info.value.body["code"] == "previous_response_not_found"
            assert info.value.body["param"] == "previous_response_id"
        with pytest.raises(openai.NotFoundError):
            sdk(gw, key).responses.retrieve(made.id)
    assert sdk(gw, mine["key"]).responses.retrieve(made.id).id == made.id


def test_unknown_and_unstored_ids(gw: Gateway):
    _, unstored = create(gw, model="auto", input=MATH_Q, store=False)
    for rid in ("resp_never_made", unstored.id):
        with pytest.raises(openai.NotFoundError) as info:
            create(gw, model="auto", input="go on", previous_response_id=rid)
        assert info.value.body["code"] == "previous_response_not_found"
        with pytest.raises(openai.NotFoundError):
            sdk(gw).responses.retrieve(rid)


def test_litellm_backend_answers_plain_and_streamed(gw: Gateway, servers):
    a, _ = servers
    headers, resp = create(gw, model="lite", input="hi")
    assert headers["x-switchyard-expert"] == "lite" and resp.model == "lite"
    assert resp.output_text == f"server {_port(a)} answers"
    events = list(sdk(gw).responses.create(model="lite", input="hi", stream=True))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == f"server {_port(a)} answers"
    with pytest.raises(openai.BadRequestError) as info:   # litellm keeps nothing the gateway can fetch
        sdk(gw).responses.retrieve(resp.id)
    assert info.value.body["code"] == "unsupported_backend"


@pytest.mark.parametrize("body, param", [
    ({"model": "math-expert"}, "input"),
    ({"model": "math-expert", "input": 5}, "input"),
    ({"model": "math-expert", "input": "hi", "previous_response_id": ""}, "previous_response_id"),
    ({"model": "math-expert", "input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"model": "math-expert", "input": "hi", "store": "yes"}, "store"),
    ({"model": "collab:pair", "input": "hi"}, "model"),
    ({"model": "no-such-expert", "input": "hi"}, "model"),
])
def test_bad_requests_are_openai_shaped_4xx(gw: Gateway, body: dict, param: str):
    with gw.client() as c:
        r = c.post("/v1/responses", json=body)
        assert 400 <= r.status_code < 500, r.text
        assert r.json()["error"]["param"].split(".")[0] == param   # "input.str": the first of a union's tries
        assert c.post("/v1/responses", json={"model": "math-expert", "input": "hi"}).status_code == 200


def test_a_gateway_without_memory_for_ids_still_answers(store: ExpertStore, data_dir: Path, scripted_upstream: str):
    """responses_ttl_s = 0: nothing remembered; a named expert still continues its own."""
    store.put(ExpertSpec(name="echo", backend="openai", base_url=scripted_upstream, served_model="echo"))
    with serve_in_thread(create_app(make_settings(data_dir, responses_ttl_s=0), store)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=30)
        first = client.responses.create(model="echo", input="hi")
        assert client.responses.create(model="echo", input="more", previous_response_id=first.id).output_text \
            .endswith(f"after {first.id}")
        assert not store.client.keys(f"{store.prefix}resp:*")
        r = httpx.get(f"{url}/v1/responses/{first.id}", headers={"authorization": f"Bearer {CLIENT_KEY}"})
        assert r.status_code == 404


def test_pins_round_trip_expire_and_fail_soft(store: ExpertStore):
    """A real Redis, and a real client to a port nobody listens on."""
    import asyncio

    import redis as redis_lib

    from expert_registry.store import open_async_redis
    from router_gateway.responses import Pin, PinStoreError, ResponsePins
    from tests.router_gateway.conftest import free_port

    async def go() -> None:
        live = ResponsePins(open_async_redis(store.client, None), "t:", 60)
        pin = Pin("math-expert", "http://a/v1", "key-1", "auto")
        await live.keep("resp_1", pin)
        assert await live.find("resp_1") == pin and await live.find("resp_2") is None
        assert 0 < store.client.pttl("t:resp:resp_1") <= 60_000
        await live.forget("resp_1")
        assert await live.find("resp_1") is None
        many = [Pin(f"e{i}", f"http://r{i}/v1", "key-1", "auto") for i in range(10)]
        await asyncio.gather(*(live.keep(f"r{i}", p) for i, p in enumerate(many)))   # one batch
        found = await asyncio.gather(*(live.find(f"r{i}") for i in range(12)))   # one MGET
        assert found == [*many, None, None]
        store.client.set("t:resp:resp_3", "not a pin")
        assert await live.find("resp_3") is None
        dead_client = redis_lib.Redis(host="127.0.0.1", port=free_port())
        dead = ResponsePins(open_async_redis(dead_client, f"redis://127.0.0.1:{free_port()}/0", wait_s=0.5),
                            "t:", 60)
        await dead.keep("resp_1", pin)      # logged, not raised: the answer itself is fine
        await dead.forget("resp_1")
        with pytest.raises(PinStoreError):
            await dead.find("resp_1")
        await live.aredis.aclose()
        await dead.aredis.aclose()

    asyncio.run(go())


def test_without_redis_answers_still_come_and_lookups_say_why(store: ExpertStore, data_dir: Path,
                                                              scripted_upstream: str):
    store.put(ExpertSpec(name="echo", backend="openai", base_url=scripted_upstream, served_model="echo"))
    with serve_in_thread(create_app(make_settings(data_dir), store)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=30)
        first = client.responses.create(model="echo", input="hi")
        store.client.shutdown(nosave=True)
        second = client.responses.create(model="echo", input="more", previous_response_id=first.id)
        assert second.output_text.endswith(f"after {first.id}")     # the named expert is asked anyway
        with pytest.raises(openai.InternalServerError) as info:
            client.responses.retrieve(first.id)
        assert info.value.status_code == 503 and info.value.body["code"] == "store_unavailable"
