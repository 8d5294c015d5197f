"""Routing through the gateway: a real TF-IDF router trained here on hand-made logs,
deployed over experts served by the scripted upstream, with real Redis, real HTTP on
loopback and the real OpenAI SDK.

The logs make ``log-math`` right on arithmetic, ``log-poet`` right on poetry,
``log-general`` middling (0.7) on both and ``log-unmapped`` right on everything (it has
no expert, so it must never be chosen). Registry prices: math-expert cheapest,
generalist in between, poet dearest.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import openai
import pytest

from expert_registry.spec import ExpertSpec
from expert_registry.store import ExpertStore, close_redis, open_redis
from router_gateway.app import create_app
from tests.router_gateway.conftest import ADMIN_KEY, CLIENT_KEY, Gateway, make_settings, serve_in_thread

ARITH = ([f"What is {a} plus {b}?" for a in (3, 7, 12, 25, 41, 58) for b in (4, 9, 16, 33)]
         + [f"Compute {a} times {b}." for a in (2, 6, 11, 19) for b in (3, 8, 14)])
POEMS = ([f"Write a short poem about the {w}." for w in ("sea", "moon", "rain", "snow", "wind", "night", "forest",
                                                          "river", "stars", "autumn", "spring", "mountains")]
         + [f"Compose a rhyming verse about {w}." for w in ("love", "loss", "summer", "a cat", "the city", "friends")])
# log model -> (score on arithmetic, score on poems), logged cost per call
SCORES = {"log-math": (1.0, 0.0), "log-general": (0.7, 0.7), "log-poet": (0.0, 1.0), "log-unmapped": (1.0, 1.0)}
COSTS = {"log-math": 0.001, "log-general": 0.004, "log-poet": 0.02, "log-unmapped": 0.05}
EXPERT_MAP = {"log-math": "math-expert", "log-general": "generalist", "log-poet": "poet"}
PRICES = {"math-expert": (0.1, 0.2), "generalist": (1.0, 2.0), "poet": (5.0, 10.0)}

MATH_Q = "What is 5 plus 17?"
POEM_Q = "Write a short poem about the ocean."


def train_router(directory: Path) -> Path:
    """A classifier router on TF-IDF features, trained on the hand-made logs above."""
    from router_models import ROUTERS
    from router_models.logs import load_logs, write_logs

    rows = []
    for task, prompts in (("math", ARITH), ("poem", POEMS)):
        for i, prompt in enumerate(prompts):
            for model, (on_math, on_poem) in SCORES.items():
                rows.append({"prompt_id": f"{task}{i}", "prompt": prompt, "task": task, "model": model,
                             "score": on_math if task == "math" else on_poem, "cost_usd": COSTS[model]})
    logs = load_logs(write_logs(rows, directory / "logs.jsonl"))
    ROUTERS["classifier"](featurizer="tfidf", model="logreg", cv=3).fit(logs).save(directory / "router")
    return directory / "router"


def routed_experts(upstream: str, priced: bool = True, prefix: str = "") -> list[ExpertSpec]:
    """One expert per mapped log model; each its own served_model so the upstream tells them apart."""
    return [ExpertSpec(name=prefix + name, backend="openai", base_url=upstream, served_model=f"served-{prefix}{name}",
                       input_price_per_mtok=inp if priced else 0.0, output_price_per_mtok=out if priced else 0.0)
            for name, (inp, out) in PRICES.items()]


@pytest.fixture(scope="module")
def router_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_router(tmp_path_factory.mktemp("router"))


@pytest.fixture(scope="module")
def routed(tmp_path_factory, router_dir: Path, recorder) -> Iterator[Gateway]:
    """One gateway for the module (an embedded Redis costs seconds to stop), with the
    experts registered and 'classifier' deployed as the default over HTTP."""
    rec, upstream = recorder
    data_dir = tmp_path_factory.mktemp("routing") / "data"
    store = ExpertStore(open_redis(None, data_dir))
    for spec in routed_experts(upstream) + routed_experts(upstream, priced=False, prefix="free-"):
        store.put(spec)
    app = create_app(make_settings(data_dir), store)
    try:
        with serve_in_thread(app) as url:
            gw = Gateway(url, store)
            gw.app = app  # type: ignore[attr-defined]
            gw.data_dir = data_dir  # type: ignore[attr-defined]
            with gw.client(ADMIN_KEY) as c:
                r = c.post("/v1/routers", json={"name": "classifier", "router_dir": str(router_dir),
                                                "expert_map": EXPERT_MAP, "default": True})
                assert r.status_code == 201, r.text
            yield gw
    finally:
        store.client.shutdown(nosave=True)


def sdk(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=30)


def chat(gw: Gateway, model: str, text: str, **kw):
    raw = sdk(gw).chat.completions.with_raw_response.create(model=model, messages=[{"role": "user", "content": text}],
                                                           **kw)
    return raw.headers, raw.parse()


def explain(gw: Gateway, model: str, text: str, **kw) -> dict:
    with gw.client() as c:
        r = c.post("/v1/route", json={"model": model, "messages": [{"role": "user", "content": text}], **kw})
    assert r.status_code == 200, r.text
    return r.json()


def test_router_sends_arithmetic_to_math_and_poems_to_the_poet(routed: Gateway, recorder):
    rec, _ = recorder
    for text, expert in ((MATH_Q, "math-expert"), (POEM_Q, "poet")):
        before = len(rec.calls)
        headers, resp = chat(routed, "router:classifier", text)
        assert headers["x-switchyard-expert"] == expert
        assert headers["x-switchyard-router"] == "classifier"
        assert float(headers["x-switchyard-route-ms"]) >= 0
        assert float(headers["x-switchyard-overhead-ms"]) >= float(headers["x-switchyard-route-ms"])
        assert resp.model == "router:classifier"  # the name the client asked for
        assert rec.calls[before:] == [("/v1/chat/completions", f"served-{expert}")]  # the upstream that got it


def test_knobs_lambda_and_min_quality(routed: Gateway):
    # A huge willingness-to-pay penalty buys the cheapest expert, even for a poem.
    headers, _ = chat(routed, "router:classifier?lambda=1000", POEM_Q)
    assert headers["x-switchyard-expert"] == "math-expert"
    # The cheapest expert whose predicted quality clears 0.5: not the best (poet), not the cheapest (math).
    headers, _ = chat(routed, "router:classifier?min_quality=0.5", POEM_Q)
    assert headers["x-switchyard-expert"] == "generalist"
    headers, _ = chat(routed, "router:classifier?min_quality=0.5", MATH_Q)
    assert headers["x-switchyard-expert"] == "math-expert"
    # A cap below everyone's cost: the cheapest one is used.
    headers, _ = chat(routed, "router:classifier?max_cost=0.0000001", POEM_Q)
    assert headers["x-switchyard-expert"] == "math-expert"


def test_auto_uses_the_default_router_and_completions_route_on_the_prompt(routed: Gateway, recorder):
    rec, _ = recorder
    headers, _ = chat(routed, "auto", POEM_Q)
    assert headers["x-switchyard-expert"] == "poet" and headers["x-switchyard-router"] == "classifier"
    raw = sdk(routed).completions.with_raw_response.create(model="auto", prompt=[MATH_Q, POEM_Q], max_tokens=5)
    assert raw.headers["x-switchyard-expert"] == "math-expert"  # the first prompt of a list
    assert rec.calls[-1] == ("/v1/completions", "served-math-expert")
    # the last user message decides, not the system prompt or earlier turns
    messages = [{"role": "system", "content": POEM_Q}, {"role": "user", "content": POEM_Q},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": [{"type": "text", "text": MATH_Q}]}]
    r = sdk(routed).chat.completions.with_raw_response.create(model="auto", messages=messages)
    assert r.headers["x-switchyard-expert"] == "math-expert"


def test_unhealthy_expert_is_skipped(routed: Gateway, recorder):
    rec, _ = recorder
    routed.store.set_health("poet", False, "connection refused")
    try:
        deadline = time.monotonic() + 10
        while explain(routed, "router:classifier", POEM_Q)["chosen"] == "poet":
            assert time.monotonic() < deadline, "the gateway never saw the poet go unhealthy"
            time.sleep(0.1)
        headers, _ = chat(routed, "router:classifier", POEM_Q)
        assert headers["x-switchyard-expert"] == "generalist"  # the next best for a poem
        assert rec.calls[-1][1] == "served-generalist"
        body = explain(routed, "router:classifier", POEM_Q)
        assert body["excluded"]["poet"] == "unhealthy: connection refused"
        # every candidate down: a 503 naming why, not a 500
        for name in ("math-expert", "generalist"):
            routed.store.set_health(name, False, "down for the test")
        deadline = time.monotonic() + 10
        while True:
            with routed.client() as c:
                r = c.post("/v1/chat/completions",
                           json={"model": "router:classifier", "messages": [{"role": "user", "content": POEM_Q}]})
            if r.status_code == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert r.status_code == 503, r.text
        err = r.json()["error"]
        assert err["code"] == "no_healthy_expert"
        assert "poet: unhealthy: connection refused" in err["message"]
    finally:
        for name in PRICES:
            routed.store.set_health(name, True)
        deadline = time.monotonic() + 10
        while any(routed.app.state.view.is_unhealthy(n) for n in PRICES):  # later tests need them back
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_streaming_through_a_router(routed: Gateway, recorder):
    rec, _ = recorder
    raw = sdk(routed).chat.completions.with_raw_response.create(
        model="router:classifier", messages=[{"role": "user", "content": POEM_Q}], stream=True,
        stream_options={"include_usage": True})
    assert raw.headers["x-switchyard-expert"] == "poet"
    assert raw.headers["content-type"].startswith("text/event-stream")
    chunks = list(raw.parse())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hello there"
    assert all(c.model == "router:classifier" for c in chunks)
    assert chunks[-1].usage is not None
    assert rec.calls[-1] == ("/v1/chat/completions", "served-poet")


def test_route_explains_without_calling_any_expert(routed: Gateway, recorder):
    rec, _ = recorder
    before = len(rec.calls)
    body = explain(routed, "router:classifier?lambda=0.1", POEM_Q, max_tokens=100)
    assert len(rec.calls) == before  # no upstream was called
    assert body["router"] == "classifier" and body["deployment"] == "classifier"
    assert body["query_chars"] == len(POEM_Q)
    assert body["knobs"]["lambda"] == 0.1 and body["knobs"]["request"] == {"lambda": 0.1}
    assert body["chosen"] == "poet" and body["fallbacks"] == ["generalist", "math-expert"]
    assert set(body["candidates"]) == {"poet", "generalist", "math-expert"}
    poet = body["candidates"]["poet"]
    assert poet["log_model"] == "log-poet" and poet["quality"] > 0.6
    # registry prices: (5 $/M * chars/4 + 10 $/M * max_tokens) / 1e6
    assert body["cost_source"] == "registry"
    assert poet["cost_usd"] == pytest.approx((5.0 * len(POEM_Q) / 4 + 10.0 * 100) / 1e6)
    assert poet["utility"] == pytest.approx(poet["quality"] - 0.1)  # the poet is the dearest: cost_scale
    assert body["excluded"] == {"log-unmapped": "no mapping in the deployment"}
    assert set(body["explain"]["experts"]) == set(SCORES)  # the router's own view, in log-model names
    assert body["route_ms"] >= 0
    # completions bodies and auto work too
    with routed.client() as c:
        r = c.post("/v1/route", json={"model": "auto", "prompt": MATH_Q})
    assert r.status_code == 200 and r.json()["chosen"] == "math-expert"
    assert len(rec.calls) == before


def test_router_costs_are_used_when_experts_have_no_prices(routed: Gateway):
    with routed.client(ADMIN_KEY) as c:
        r = c.post("/v1/routers", json={"name": "free", "router_dir": str(routed.app.state.routing.entries[
            "classifier"].deployment.router_dir), "expert_map": {k: "free-" + v for k, v in EXPERT_MAP.items()}})
        assert r.status_code == 201, r.text
    try:
        body = explain(routed, "router:free", POEM_Q)
        assert body["cost_source"] == "router"
        assert body["candidates"]["free-poet"]["cost_usd"] == pytest.approx(COSTS["log-poet"])
        assert body["candidates"]["free-math-expert"]["cost_usd"] == pytest.approx(COSTS["log-math"])
        headers, _ = chat(routed, "router:free?lambda=1000", POEM_Q)
        assert headers["x-switchyard-expert"] == "free-math-expert"
    finally:
        with routed.client(ADMIN_KEY) as c:
            c.delete("/v1/routers/free").raise_for_status()


def test_explain_header_adds_scores(routed: Gateway):
    with routed.client() as c:
        r = c.post("/v1/chat/completions", headers={"x-switchyard-explain": "1"},
                   json={"model": "router:classifier", "messages": [{"role": "user", "content": POEM_Q}]})
        assert r.status_code == 200, r.text
        scores = dict(pair.split("=") for pair in r.headers["x-switchyard-scores"].split(";"))
        assert list(scores) == ["poet", "generalist", "math-expert"]  # ranked order
        assert float(scores["poet"]) > float(scores["math-expert"])
        plain = c.post("/v1/chat/completions",
                       json={"model": "router:classifier", "messages": [{"role": "user", "content": POEM_Q}]})
        assert "x-switchyard-scores" not in plain.headers
        direct = c.post("/v1/chat/completions", json={"model": "poet", "messages": [{"role": "user", "content": "x"}]})
        assert direct.headers["x-switchyard-router"] == "direct" and "x-switchyard-route-ms" not in direct.headers


def test_models_lists_routers_and_auto(routed: Gateway):
    ids = [m.id for m in sdk(routed).models.list().data]
    assert "router:classifier" in ids and "auto" in ids and "poet" in ids
    assert sdk(routed).models.retrieve("router:classifier").id == "router:classifier"


@pytest.mark.parametrize("model, body, status, needle", [
    ("router:nope", None, 404, "router 'nope' is not available. Available experts: "),
    ("router:classifier", {"prompt": [1, 2, 3]}, 400, "token-id prompts cannot be routed"),
    ("router:classifier?k=0", None, 400, "knob 'k'"),
    ("poet", None, 400, "'router:NAME' or 'auto'"),
])
def test_route_errors_are_openai_shaped(routed: Gateway, model, body, status, needle):
    with routed.client() as c:
        r = c.post("/v1/route", json={"model": model, **(body or {"messages": [{"role": "user", "content": "x"}]})})
        assert r.status_code == status, r.text
        assert needle in r.json()["error"]["message"]
        if status == 404:
            assert "router:classifier" in r.json()["error"]["message"]
        assert c.post("/v1/route", json={"model": "auto"}).status_code == 400
        assert c.get("/health").json()["status"] == "ok"


def test_routers_are_kept_across_refreshes_and_reloaded_when_their_files_change(routed: Gateway, router_dir: Path):
    routing = routed.app.state.routing
    first = routing.entries["classifier"].router
    routed.store.put(ExpertSpec(name="bystander", backend="openai", base_url="http://127.0.0.1:9/v1",
                                served_model="x"))  # bumps the registry version
    version = routed.store.version()
    deadline = time.monotonic() + 10
    while routing._version != version:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert routing.entries["classifier"].router is first  # same dir, same files: not reloaded
    routed.store.remove("bystander")
    (router_dir / "router.json").touch()  # a retrained router written in place
    while routing.entries["classifier"].router is first:
        assert time.monotonic() < deadline, "the changed router was never reloaded"
        time.sleep(0.05)
    headers, _ = chat(routed, "router:classifier", MATH_Q)
    assert headers["x-switchyard-expert"] == "math-expert"


def test_a_deployed_router_is_warmed_up_before_its_first_request(routed: Gateway, router_dir: Path):
    # The admin API loads the router, and the table scores one made-up query with it before
    # it is routable, so that the first client does not wait for the encoder to load.
    from router_models.serving import WARM_QUERY

    with routed.client(ADMIN_KEY) as c:
        r = c.post("/v1/routers", json={"name": "warmed", "router_dir": str(router_dir), "expert_map": EXPERT_MAP})
        assert r.status_code == 201, r.text
    try:
        entry = routed.app.state.routing.entries["warmed"]
        (warm,) = entry.router.featurizer_._last[0]   # its one prediction so far
        assert warm.startswith(WARM_QUERY)
        assert entry.scorer.scored == 0 and len(entry.scorer._cache) == 0
    finally:
        with routed.client(ADMIN_KEY) as c:
            assert c.delete("/v1/routers/warmed").status_code in (200, 204)


def test_a_router_that_fails_to_load_answers_503(routed: Gateway, tmp_path: Path, router_dir: Path):
    import shutil

    broken = tmp_path / "router"
    shutil.copytree(router_dir, broken)
    with routed.client(ADMIN_KEY) as c:
        assert c.post("/v1/routers", json={"name": "fragile", "router_dir": str(broken),
                                           "expert_map": EXPERT_MAP}).status_code == 201
    try:
        (broken / "router.json").write_text("{not json")  # broken after it was deployed
        deadline = time.monotonic() + 10
        while routed.app.state.routing.entries["fragile"].router is not None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with routed.client() as c:
            r = c.post("/v1/chat/completions",
                       json={"model": "router:fragile", "messages": [{"role": "user", "content": MATH_Q}]})
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "router_unavailable"
            assert "failed to load" in r.json()["error"]["message"] and "not valid JSON" in r.json()["error"]["message"]
            assert "router:fragile" not in [m["id"] for m in c.get("/v1/models").json()["data"]]
            with routed.client(ADMIN_KEY) as admin:
                assert admin.get("/v1/routers/fragile").json()["loaded"] is False
            assert c.get("/health").json()["status"] == "ok"
    finally:
        with routed.client(ADMIN_KEY) as c:
            c.delete("/v1/routers/fragile")


def test_a_second_gateway_on_the_same_redis_sees_new_routers(routed: Gateway, router_dir: Path):
    client = open_redis(None, routed.data_dir)
    try:
        with serve_in_thread(create_app(make_settings(routed.data_dir), ExpertStore(client))) as url2:
            second = Gateway(url2, routed.store)
            with routed.client(ADMIN_KEY) as c:  # added through the first gateway
                r = c.post("/v1/routers", json={"name": "shared", "router_dir": str(router_dir),
                                                "expert_map": EXPERT_MAP, "lambda": 1000})
                assert r.status_code == 201, r.text
            deadline = time.monotonic() + 10
            while "router:shared" not in [m.id for m in sdk(second).models.list().data]:
                assert time.monotonic() < deadline, "the second gateway never saw the new router"
                time.sleep(0.1)
            headers, _ = chat(second, "router:shared", POEM_Q)
            assert headers["x-switchyard-expert"] == "math-expert"  # the deployment's own lambda
            with routed.client(ADMIN_KEY) as c:
                c.delete("/v1/routers/shared").raise_for_status()
            while "router:shared" in [m.id for m in sdk(second).models.list().data]:
                assert time.monotonic() < deadline, "the second gateway never saw the router go"
                time.sleep(0.1)
    finally:
        close_redis(client)
