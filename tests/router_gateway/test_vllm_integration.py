"""The gateway in front of a REAL vLLM CPU worker serving a model the project built,
with the real OpenAI SDK as client and litellm's async completion for the litellm backend."""

from __future__ import annotations

from typing import Iterator

import openai
import pytest

from expert_registry.spec import ExpertSpec
from router_gateway.app import create_app
from tests.router_gateway.conftest import CLIENT_KEY, make_settings, serve_in_thread

pytestmark = pytest.mark.vllm
MSG = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def vllm_gateway(vllm_worker, fleet_specs, tmp_path_factory) -> Iterator[openai.OpenAI]:
    from expert_registry.store import ExpertStore, open_redis

    data_dir = tmp_path_factory.mktemp("gw") / "data"
    store = ExpertStore(open_redis(None, data_dir))
    base = vllm_worker.spec
    store.put(ExpertSpec(name="smol", backend="vllm", base_url=vllm_worker.base_url,
                         served_model=vllm_worker.served_model, input_price_per_mtok=0.1,
                         output_price_per_mtok=0.2, tokenizer=base.tokenizer))
    store.put(ExpertSpec(name="smol-litellm", backend="litellm", base_url=vllm_worker.base_url,
                         served_model=f"hosted_vllm/{vllm_worker.served_model}"))
    store.put(ExpertSpec(name="smol-first", backend="vllm", base_url=vllm_worker.base_url,
                         served_model=vllm_worker.served_model, fallbacks=["smol-litellm"]))
    for adapter in fleet_adapters(fleet_specs, vllm_worker):  # the quick fleet's LoRA experts, same worker
        store.put(adapter)
    with serve_in_thread(create_app(make_settings(data_dir, upstream_timeout_s=120, health_interval_s=1), store)) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=120)
    store.client.shutdown(nosave=True)


def fleet_adapters(fleet_specs, vllm_worker) -> list[ExpertSpec]:
    return [s.model_copy(update={"base_url": vllm_worker.base_url}) for s in fleet_specs if s.launch is None]


def test_chat_through_gateway_matches_vllm_directly(vllm_gateway: openai.OpenAI, vllm_worker):
    direct = openai.OpenAI(base_url=vllm_worker.base_url, api_key="x", max_retries=0, timeout=120)
    kw = dict(messages=MSG, temperature=0, max_tokens=16, seed=1)
    via = vllm_gateway.chat.completions.create(model="smol", **kw)
    ref = direct.chat.completions.create(model=vllm_worker.served_model, **kw)
    assert via.model == "smol"
    assert via.choices[0].message.content == ref.choices[0].message.content
    assert via.choices[0].message.content.strip()
    assert via.usage.prompt_tokens == ref.usage.prompt_tokens > 0


def test_streaming_with_usage(vllm_gateway: openai.OpenAI):
    chunks = list(vllm_gateway.chat.completions.create(model="smol", messages=MSG, max_tokens=12, temperature=0,
                                                       stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert {c.model for c in chunks} == {"smol"}
    assert chunks[-1].usage is not None and 0 < chunks[-1].usage.completion_tokens <= 12


def test_unknown_fields_reach_vllm(vllm_gateway: openai.OpenAI):
    resp = vllm_gateway.chat.completions.create(model="smol", messages=MSG, max_tokens=4, logprobs=True,
                                                top_logprobs=2)
    content = resp.choices[0].logprobs.content
    assert content and len(content[0].top_logprobs) == 2


def test_completions_endpoint(vllm_gateway: openai.OpenAI):
    resp = vllm_gateway.completions.create(model="smol", prompt="The capital of France is", max_tokens=5,
                                           temperature=0)
    assert resp.model == "smol" and resp.choices[0].text.strip()


def test_responses_api_plain_streamed_and_continued(vllm_gateway: openai.OpenAI):
    question = "What is the capital of France? Answer in one word."
    first = vllm_gateway.responses.create(model="smol", input=question, max_output_tokens=12, temperature=0)
    assert first.model == "smol" and first.output_text.strip()
    assert first.usage.input_tokens > 0 and 0 < first.usage.output_tokens <= 12
    events = list(vllm_gateway.responses.create(model="smol", input=question, max_output_tokens=8, temperature=0,
                                                stream=True))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert {e.response.model for e in events if hasattr(e, "response")} == {"smol"}
    streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert streamed.strip() and streamed == events[-1].response.output_text
    # vLLM keeps the first answer (the demo fleet's workers run with VLLM_ENABLE_RESPONSES_API_STORE=1):
    # the gateway sends the continuation and the GET to it, under the name the client used.
    second = vllm_gateway.responses.create(model="smol", input="And of Italy?", previous_response_id=first.id,
                                           max_output_tokens=12, temperature=0)
    assert second.output_text.strip() and second.usage.input_tokens > first.usage.input_tokens
    got = vllm_gateway.responses.retrieve(first.id)
    assert got.id == first.id and got.model == "smol" and got.output_text == first.output_text
    lite = vllm_gateway.responses.create(model="smol-litellm", input=question, max_output_tokens=12, temperature=0)
    assert lite.model == "smol-litellm" and lite.output_text.strip()


def test_a_background_stream_is_picked_up_again_where_it_was_left(vllm_gateway: openai.OpenAI):
    """A client leaves a background stream after its first event and resumes it with a
    streamed GET through the gateway; vLLM finished it meanwhile."""
    with vllm_gateway.responses.create(model="smol", input="Count from one to five.", max_output_tokens=16,
                                       temperature=0, background=True, stream=True) as stream:
        first = next(iter(stream))
    assert first.type == "response.created" and first.response.model == "smol"
    rid, seen = first.response.id, first.sequence_number
    rest = list(vllm_gateway.responses.retrieve(rid, stream=True, starting_after=seen))
    assert rest and rest[0].sequence_number == seen + 1 and rest[-1].type == "response.completed"
    assert [e.sequence_number for e in rest] == list(range(seen + 1, seen + 1 + len(rest)))
    done = rest[-1].response
    assert done.model == "smol" and done.output_text.strip()
    assert done.output_text == "".join(e.delta for e in rest if e.type == "response.output_text.delta")
    got = vllm_gateway.responses.retrieve(rid)    # "incomplete" when it stopped at max_output_tokens
    assert got.status == done.status and got.status in ("completed", "incomplete")
    assert got.output_text == done.output_text


def test_vllm_errors_pass_through_as_openai_errors(vllm_gateway: openai.OpenAI):
    with pytest.raises(openai.BadRequestError) as info:
        vllm_gateway.chat.completions.create(model="smol", messages=MSG, max_tokens=10_000_000)
    assert info.value.status_code == 400


def test_a_request_too_long_for_vllm_goes_on_to_the_fallback(vllm_gateway: openai.OpenAI):
    """vLLM's and litellm's own words for a request that does not fit the context window
    are read as such: the request goes on to the fallback (which, the same model, refuses
    it too, and its 400 is the answer)."""
    with pytest.raises(openai.BadRequestError) as info:
        vllm_gateway.chat.completions.create(model="smol-first", messages=MSG, max_tokens=10_000_000)
    headers = info.value.response.headers
    assert (headers["x-switchyard-fallback-from"], headers["x-switchyard-expert"]) == ("smol-first", "smol-litellm")
    ok = vllm_gateway.chat.completions.with_raw_response.create(model="smol-first", messages=MSG, max_tokens=4)
    assert ok.headers["x-switchyard-expert"] == "smol-first" and "x-switchyard-fallback-from" not in ok.headers


def test_registration_reads_what_the_vllm_worker_serves(vllm_worker, fleet_specs):
    """``experts add``'s check against a real worker: its model and LoRA adapters are
    listed, and the model's max_model_len becomes the expert's context window."""
    from expert_registry.discover import NotServed, checked_spec, served_models

    models = served_models(vllm_worker.base_url)
    ids = {m["id"] for m in models}
    adapters = {s.served_model for s in fleet_adapters(fleet_specs, vllm_worker)}
    assert vllm_worker.served_model in ids and adapters and adapters <= ids
    bare = ExpertSpec(name=vllm_worker.served_model, backend="vllm", base_url=vllm_worker.base_url,
                      served_model=vllm_worker.served_model)
    got, _ = checked_spec(bare, models, served_given=False, window_given=False)
    assert (got.served_model, got.context_window) == (vllm_worker.served_model, vllm_worker.spec.context_window)
    with pytest.raises(NotServed, match="say which with --served-model"):   # several served, none of that name
        checked_spec(bare.model_copy(update={"name": "mine"}), models, served_given=False, window_given=False)


def test_litellm_backend_against_the_same_worker(vllm_gateway: openai.OpenAI):
    resp = vllm_gateway.chat.completions.create(model="smol-litellm", messages=MSG, max_tokens=8, temperature=0)
    assert resp.model == "smol-litellm" and resp.choices[0].message.content.strip()
    chunks = list(vllm_gateway.chat.completions.create(model="smol-litellm", messages=MSG, max_tokens=8,
                                                       temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()


def test_models_lists_the_vllm_expert_as_healthy(vllm_gateway: openai.OpenAI):
    import time

    time.sleep(1.5)  # one health round
    data = {m.id: m for m in vllm_gateway.models.list().data}
    assert data["smol"].model_extra["healthy"] is True


@pytest.fixture(scope="module")
def vllm_symbolic(vllm_worker, tmp_path_factory) -> Iterator[tuple[str, object]]:
    """Three experts served by the real worker, a symbolic router over them, and the same
    worker asked for skills (``skills_expert``)."""
    import httpx

    from expert_registry.store import ExpertStore, open_redis
    from tests.router_gateway.conftest import ADMIN_KEY
    from tests.router_gateway.test_skills_llm import train_symbolic

    router_dir = train_symbolic(tmp_path_factory.mktemp("sym"))
    data_dir = tmp_path_factory.mktemp("gw-sym") / "data"
    store = ExpertStore(open_redis(None, data_dir))
    names = {"log-math": "smol-math", "log-general": "smol-general", "log-poet": "smol-poet"}
    for name in names.values():
        store.put(ExpertSpec(name=name, backend="vllm", base_url=vllm_worker.base_url,
                             served_model=vllm_worker.served_model))
    app = create_app(make_settings(data_dir, upstream_timeout_s=120, health_interval_s=0), store)
    with serve_in_thread(app) as url:
        r = httpx.post(url + "/v1/routers", headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=60,
                       json={"name": "sym", "router_dir": str(router_dir), "expert_map": names,
                             "skills_expert": "smol-general", "skills_timeout_s": 30})
        assert r.status_code == 201, r.text
        yield url, store
    store.client.shutdown(nosave=True)


def test_aggregation_and_llm_skills_against_real_workers(vllm_symbolic):
    import httpx

    url, store = vllm_symbolic
    client = openai.OpenAI(base_url=url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=120)
    question = [{"role": "user", "content": "What is 12 plus 30? Answer with the number."}]
    raw = client.chat.completions.with_raw_response.create(model="router:sym?k=2", messages=question,
                                                           max_tokens=24, temperature=0)
    resp = raw.parse()
    recruited = raw.headers["x-switchyard-recruited"].split(",")
    assert len(recruited) == 2 and recruited[0] == "smol-math"  # the router's top two, best first
    assert raw.headers["x-switchyard-expert"] == "smol-general"  # best logged mean score: the aggregator
    assert int(raw.headers["x-switchyard-recruited-tokens"]) > 0
    assert resp.choices[0].message.content.strip() and resp.usage.completion_tokens > 0
    chunks = list(client.chat.completions.create(model="router:sym?k=2", messages=question, max_tokens=16,
                                                 temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
    # the same worker was asked for the question's skills; its answer (or the reason it was
    # not usable) is reported, and a usable answer is cached in Redis
    body = httpx.post(url + "/v1/route", headers={"authorization": f"Bearer {CLIENT_KEY}"}, timeout=120,
                      json={"model": "router:sym", "messages": question}).json()
    source = body["skills_source"]
    assert source in ("llm", "llm-cache") or source.startswith("zero-shot (skills expert 'smol-general' listed"), source
    if source.startswith("llm"):
        assert store.client.keys("switchyard:skills:smol-general:*")
        assert {s["source"] for s in body["explain"]["skills"]} == {"llm"}


def test_fleet_eval_against_the_real_worker(vllm_gateway: openai.OpenAI, vllm_worker, fleet_specs, tmp_path):
    """`fleet eval`'s run: 2 held-out prompts per domain, real answers, real usage, real checkers."""
    import asyncio

    from expert_registry.fleet.domains import DOMAINS
    from router_gateway import fleet_eval, fleet_report
    from router_models.logs import load_logs

    smol = ExpertSpec(name="smol", backend="vllm", base_url=vllm_worker.base_url,
                      served_model=vllm_worker.served_model, input_price_per_mtok=0.1, output_price_per_mtok=0.2)
    experts = [smol, *fleet_adapters(fleet_specs, vllm_worker)]
    items = fleet_eval.build_items(DOMAINS, 2, seed=0)
    out = tmp_path / "heldout.jsonl"
    outcome = asyncio.run(fleet_eval.run_eval(str(vllm_gateway.base_url).rstrip("/"), CLIENT_KEY, experts, items,
                                              out, concurrency=4, timeout_s=120, progress=False))
    assert (outcome.written, sum(outcome.failed.values()), outcome.score_errors) == (4 * len(items), 0, 0), outcome
    logs = load_logs(out, format="rows-jsonl")
    assert logs.report.dropped_rows == 0 and logs.n_prompts == len(items)
    assert sorted(logs.experts) == sorted(s.name for s in experts)
    assert (logs.input_tokens > 0).all() and (logs.output_tokens > 0).all()
    assert (logs.costs > 0).all() and (logs.latency_s > 0).all()
    assert ((logs.scores >= 0) & (logs.scores <= 1)).all()
    report = fleet_report.build_report(out)
    assert report.domains == list(DOMAINS) and report.best_single in {s.name for s in experts}


def test_one_worker_serves_every_fleet_adapter(vllm_gateway: openai.OpenAI, vllm_worker, fleet_specs):
    """Each LoRA expert is its own model id on the base's worker, and its weights are applied:
    on prompts of its domain it answers differently from the generalist."""
    from expert_registry.fleet.domains import tasks

    adapters = fleet_adapters(fleet_specs, vllm_worker)
    assert len(adapters) >= 3
    served = {m.id for m in openai.OpenAI(base_url=vllm_worker.base_url, api_key="x").models.list().data}
    assert {a.served_model for a in adapters} | {vllm_worker.served_model} <= served
    listed = {m.id for m in vllm_gateway.models.list().data}
    assert {a.name for a in adapters} <= listed

    def answer(model: str, prompt: str) -> str:
        r = vllm_gateway.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                 temperature=0, max_tokens=24)
        return r.choices[0].message.content

    for adapter in adapters:
        domain = adapter.tags[-1]
        prompts = [t.prompt for t in tasks(domain, "heldout", 3)]
        assert any(answer(adapter.name, p) != answer("smol", p) for p in prompts), adapter.name
