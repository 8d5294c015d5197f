"""The symbolic router in the gateway, with skills from an expert LLM (Symbolic-MoE's
way): real Redis (the skills cache), real HTTP, the real OpenAI SDK. The skill-listing
experts are the scripted upstream's ``skills-*`` models, which stand in for an LLM whose
answers are not under test (the asking, parsing, caching and fallback are); the same path
against a real vLLM worker is in test_vllm_integration.py.

The router is a symbolic router trained on test_routing's hand-made logs: math-expert is
logged right on arithmetic, poet on poems, generalist 0.7 on both.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import pytest

from expert_registry.spec import ExpertSpec
from expert_registry.store import ExpertStore, open_redis
from router_gateway.app import create_app
from tests.router_gateway.conftest import ADMIN_KEY, Gateway, make_settings, serve_in_thread
from tests.router_gateway.test_routing import (
    ARITH,
    COSTS,
    EXPERT_MAP,
    MATH_Q,
    POEMS,
    SCORES,
    routed_experts,
)

TAGGERS = {"tagger-math": "skills-math", "tagger-poetry": "skills-poetry", "tagger-garbage": "skills-garbage",
           "tagger-slow": "slow", "tagger-broken": "fail500"}


def train_symbolic(directory: Path) -> Path:
    from router_models import ROUTERS
    from router_models.logs import BenchmarkLogs

    import numpy as np

    prompts = ARITH + POEMS
    is_math = np.array([True] * len(ARITH) + [False] * len(POEMS))
    experts = sorted(SCORES)
    scores = np.array([[SCORES[e][0] if m else SCORES[e][1] for e in experts] for m in is_math])
    costs = np.tile([COSTS[e] for e in experts], (len(prompts), 1))
    logs = BenchmarkLogs(prompt_ids=[f"p{i}" for i in range(len(prompts))], prompts=prompts,
                         tasks=["math" if m else "poem" for m in is_math], experts=experts,
                         scores=scores, costs=costs)
    ROUTERS["symbolic"](n_skills=8, skills_per_query=2, cv=0).fit(logs).save(directory / "symbolic")
    return directory / "symbolic"


@pytest.fixture(scope="module")
def sym(tmp_path_factory, recorder) -> Iterator[Gateway]:
    _, upstream = recorder
    router_dir = train_symbolic(tmp_path_factory.mktemp("router"))
    data_dir = tmp_path_factory.mktemp("sym") / "data"
    store = ExpertStore(open_redis(None, data_dir))
    for spec in routed_experts(upstream):
        store.put(spec)
    for name, served in TAGGERS.items():
        store.put(ExpertSpec(name=name, backend="openai", base_url=upstream, served_model=served))
    try:
        with serve_in_thread(create_app(make_settings(data_dir), store)) as url:
            gw = Gateway(url, store)
            gw.router_dir = router_dir  # type: ignore[attr-defined]
            with gw.client(ADMIN_KEY) as c:
                r = c.post("/v1/routers", json={"name": "sym", "router_dir": str(router_dir),
                                                "expert_map": EXPERT_MAP})
                assert r.status_code == 201, r.text
                for tagger in TAGGERS:
                    r = c.post("/v1/routers", json={"name": tagger, "router_dir": str(router_dir),
                                                    "expert_map": EXPERT_MAP, "skills_expert": tagger,
                                                    "skills_timeout_s": 1.0})
                    assert r.status_code == 201, r.text
            yield gw
    finally:
        store.client.shutdown(nosave=True)


def route(gw: Gateway, model: str, text: str = MATH_Q) -> dict:
    with gw.client() as c:
        r = c.post("/v1/route", json={"model": model, "messages": [{"role": "user", "content": text}]})
    assert r.status_code == 200, r.text
    return r.json()


def test_zero_shot_symbolic_routing_explains_its_skills(sym: Gateway):
    body = route(sym, "router:sym")
    assert body["router"] == "symbolic" and body["chosen"] == "math-expert"
    assert body["skills_source"] is None  # no skills expert configured
    skills = body["explain"]["skills"]
    assert skills and all(s["source"] == "zero-shot" for s in skills)
    assert route(sym, "router:sym", POEMS[0])["chosen"] == "poet"


def test_skills_from_the_llm_are_used_and_cached(sym: Gateway, recorder):
    rec, _ = recorder
    text = "What is 801 plus 99?"
    before = len(rec.calls)
    first = route(sym, "router:tagger-math", text)
    assert first["skills_source"] == "llm"
    assert [s["source"] for s in first["explain"]["skills"]] and \
        {s["source"] for s in first["explain"]["skills"]} == {"llm"}
    second = route(sym, "router:tagger-math", text)
    assert second["skills_source"] == "llm-cache"
    assert rec.calls[before:] == [("/v1/chat/completions", "skills-math")]  # asked once
    keys = sym.store.client.keys("switchyard:skills:tagger-math:*")
    assert len(keys) == 1 and sym.store.client.ttl(keys[0]) > 0
    assert first["chosen"] == "math-expert"


def test_the_llm_skills_change_the_choice(sym: Gateway):
    # The tagger says "poetry, rhyming verse" even for arithmetic: the router believes it.
    body = route(sym, "router:tagger-poetry", "What is 1234 plus 4321?")
    assert body["skills_source"] == "llm" and body["chosen"] == "poet"
    zero = route(sym, "router:sym", "What is 1234 plus 4321?")
    assert zero["chosen"] == "math-expert"


@pytest.mark.parametrize("tagger, why", [
    ("tagger-slow", "took over 1 s"),
    ("tagger-broken", "answered HTTP 500"),
    ("tagger-garbage", "listed no skills"),
])
def test_a_failing_skills_expert_falls_back_to_zero_shot(sym: Gateway, tagger: str, why: str):
    t0 = time.monotonic()
    body = route(sym, f"router:{tagger}", "What is 77 plus 23?")
    assert body["skills_source"].startswith("zero-shot") and why in body["skills_source"], body["skills_source"]
    assert body["chosen"] == "math-expert"
    assert time.monotonic() - t0 < 4  # the timeout held (the slow upstream takes 5 s)
    assert not sym.store.client.keys(f"switchyard:skills:{tagger}:*")  # failures are not cached


def test_a_skills_expert_with_a_dead_url_is_asked_at_its_live_replica(sym: Gateway, recorder):
    from tests.router_gateway.conftest import free_port

    _, upstream = recorder
    sym.store.put(ExpertSpec(name="tagger-replicated", backend="openai", base_url=f"http://127.0.0.1:{free_port()}/v1",
                             replicas=[upstream], served_model="skills-math"))
    with sym.client(ADMIN_KEY) as c:
        r = c.post("/v1/routers", json={"name": "tagger-replicated", "router_dir": str(sym.router_dir),
                                        "expert_map": EXPERT_MAP, "skills_expert": "tagger-replicated"})
        assert r.status_code == 201, r.text
    for text in ("What is 5 plus 6?", "What is 7 plus 8?"):   # whichever URL comes first in turn
        body = route(sym, "router:tagger-replicated", text)
        assert body["skills_source"] == "llm", body["skills_source"]


def test_a_skills_expert_at_its_max_concurrency_is_not_asked(sym: Gateway):
    sym.store.put(ExpertSpec(name="tagger-capped", backend="openai", base_url=sym.store.get("tagger-math").base_url,
                             served_model="skills-math", max_concurrency=1))
    with sym.client(ADMIN_KEY) as c:
        r = c.post("/v1/routers", json={"name": "tagger-capped", "router_dir": str(sym.router_dir),
                                        "expert_map": EXPERT_MAP, "skills_expert": "tagger-capped"})
        assert r.status_code == 201, r.text
    places = "switchyard:inflight:tagger-capped"
    seconds, _ = sym.store.client.time()
    sym.store.client.zadd(places, {"another-gateway:1": (seconds + 60) * 1000})   # its one place is taken
    body = route(sym, "router:tagger-capped", "What is 9 plus 10?")
    assert body["skills_source"] == "zero-shot (skills expert 'tagger-capped' is at its max_concurrency)"
    assert body["chosen"] == "math-expert"
    sym.store.client.zrem(places, "another-gateway:1")
    body = route(sym, "router:tagger-capped", "What is 9 plus 10?")
    assert body["skills_source"] == "llm", body["skills_source"]
    deadline = time.monotonic() + 5   # and the question gives its place back (just after)
    while sym.store.client.zcard(places):
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_chat_through_the_symbolic_router(sym: Gateway):
    with sym.client() as c:
        r = c.post("/v1/chat/completions", json={"model": "router:tagger-math?k=2",
                                                  "messages": [{"role": "user", "content": MATH_Q}]})
    assert r.status_code == 200, r.text
    assert r.headers["x-switchyard-recruited"].split(",")[0] == "math-expert"
    assert r.headers["x-switchyard-router"] == "tagger-math"


def test_skills_expert_needs_a_router_that_reads_skill_words(sym: Gateway, tmp_path: Path):
    from router_models import ROUTERS
    from tests.router_gateway.test_routing import train_router

    clf = train_router(tmp_path)
    with sym.client(ADMIN_KEY) as c:
        r = c.post("/v1/routers", json={"name": "clf", "router_dir": str(clf), "expert_map": EXPERT_MAP,
                                        "skills_expert": "tagger-math"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "skills_expert"
        r = c.post("/v1/routers", json={"name": "x", "router_dir": str(sym.router_dir), "expert_map": EXPERT_MAP,
                                        "skills_expert": "nobody"})
        assert r.status_code == 400 and "not a registered expert" in r.json()["error"]["message"]
    assert ROUTERS["symbolic"].accepts_skill_words and not getattr(ROUTERS["classifier"], "accepts_skill_words",
                                                                   False)


def test_editing_the_profile_file_reroutes_the_live_gateway(sym: Gateway, tmp_path: Path):
    import json
    import shutil

    own = tmp_path / "edited"
    shutil.copytree(sym.router_dir, own)
    with sym.client(ADMIN_KEY) as c:
        r = c.post("/v1/routers", json={"name": "editable", "router_dir": str(own), "expert_map": EXPERT_MAP})
        assert r.status_code == 201, r.text
    assert route(sym, "router:editable")["chosen"] == "math-expert"
    doc = json.loads((own / "profiles.json").read_text())
    for skill in doc["skills"]:  # the poet becomes the best at everything
        skill["scores"]["log-poet"] = 1.0
        skill["scores"]["log-math"] = 0.0
    (own / "profiles.json").write_text(json.dumps(doc))
    deadline = time.monotonic() + 10
    while route(sym, "router:editable")["chosen"] != "poet":
        assert time.monotonic() < deadline, "the gateway never reloaded the edited profiles"
        time.sleep(0.1)
