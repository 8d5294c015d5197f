"""The collaboration worker as a real process started by the launcher, spoken to over real
HTTP with the real OpenAI SDK, serving a group built from the quick fleet's real models.

The one-expert group is the worker's correctness anchor: its greedy answer must be the
expert's own greedy answer (``transformers`` ``generate`` on the same folder) token for token.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from expert_registry.collab_worker import GroupFile, GroupFileError
from expert_registry.launcher import WorkerLauncher
from expert_registry.spec import ExpertSpec, LaunchSpec
from expert_registry.store import ExpertStore, open_redis

EXPERT = "smollm2-math"
PROMPTS = ["What is 17 + 25?", "Name a colour of the sky.", "Write the word 'hello' in capitals."]


@pytest.fixture(scope="module")
def solo(fleet_model_dirs, tmp_path_factory) -> Iterator[tuple[ExpertSpec, ExpertStore, WorkerLauncher]]:
    data_dir = tmp_path_factory.mktemp("collab-worker")
    group = GroupFile(name="math-solo", mode="single", experts={EXPERT: str(fleet_model_dirs[EXPERT])})
    path = group.write(data_dir / "math-solo.json")
    store = ExpertStore(open_redis(None, data_dir / "redis"))
    store.put(ExpertSpec(name="math-solo", backend="collab", served_model="math-solo", tokenizer="smollm2",
                         launch=LaunchSpec(engine="collab", model_path=str(path), args=["--max-model-len", "2048"])))
    launcher = WorkerLauncher(store, data_dir)
    try:
        launcher.up(["math-solo"], timeout_s=300, progress=False)
        yield store.get("math-solo"), store, launcher
    finally:
        launcher.down()
        store.client.shutdown(nosave=True)


@pytest.fixture(scope="module")
def client(solo) -> openai.OpenAI:
    spec, _, _ = solo
    return openai.OpenAI(base_url=spec.base_url, api_key="unused", max_retries=0, timeout=120)


def _hf_greedy(folder: Path, prompts: list[str], max_new: int) -> list[tuple[str, int, bool]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    out = []
    for p in prompts:
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        new = model.generate(ids, max_new_tokens=max_new, do_sample=False)[0, ids.shape[1]:].tolist()
        out.append((tok.decode(new, skip_special_tokens=True), len(new), new[-1] == model.generation_config.eos_token_id))
    return out


def test_one_expert_group_greedy_equals_the_experts_own_greedy(client, fleet_model_dirs):
    expected = _hf_greedy(fleet_model_dirs[EXPERT], PROMPTS, 48)
    for prompt, (text, n_tokens, ended) in zip(PROMPTS, expected):
        r = client.chat.completions.create(model="math-solo", messages=[{"role": "user", "content": prompt}],
                                           temperature=0, max_tokens=48)
        assert r.choices[0].message.content == text
        assert r.usage.completion_tokens == n_tokens
        assert r.choices[0].finish_reason == ("stop" if ended else "length")
        assert r.model_extra["switchyard"] == {"mode": "single", "experts": {EXPERT: n_tokens}}


def test_stream_carries_the_same_answer_and_usage(client):
    kw = dict(model="math-solo", messages=[{"role": "user", "content": PROMPTS[0]}], temperature=0, max_tokens=24)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_seeded_sampling_repeats_and_stop_strings_cut(client):
    kw = dict(model="math-solo", messages=[{"role": "user", "content": PROMPTS[1]}], temperature=1.0,
              top_p=0.9, max_tokens=20, seed=7)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b
    greedy = client.chat.completions.create(model="math-solo", temperature=0, max_tokens=30,
                                            messages=[{"role": "user", "content": PROMPTS[0]}])
    full = greedy.choices[0].message.content
    stop = full.strip()[:2][-1]  # a character the answer contains near its start
    cut = client.chat.completions.create(model="math-solo", temperature=0, max_tokens=30, stop=[stop],
                                         messages=[{"role": "user", "content": PROMPTS[0]}])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == full[:full.index(stop)]
    # A top_k past any vocabulary cuts nothing (2**63 overflowed torch's int64: a 500).
    for top_k in (10**9, 2**63, 2**80):
        wide = client.chat.completions.create(model="math-solo", temperature=0, max_tokens=30, extra_body={
            "top_k": top_k}, messages=[{"role": "user", "content": PROMPTS[0]}])
        assert wide.choices[0].message.content == full, top_k


def test_responses_api_answers_as_chat_does_and_continues_a_conversation(client):
    def chat(messages: list[dict]) -> tuple[str, object]:
        r = client.chat.completions.create(model="math-solo", messages=messages, temperature=0, max_tokens=24)
        return r.choices[0].message.content, r

    kw = dict(model="math-solo", temperature=0, max_output_tokens=24)
    first = client.responses.create(input=PROMPTS[0], **kw)
    text, ref = chat([{"role": "user", "content": PROMPTS[0]}])
    assert first.output_text == text and first.model == "math-solo" and first.id.startswith("resp_")
    assert (first.usage.input_tokens, first.usage.output_tokens) == (ref.usage.prompt_tokens,
                                                                     ref.usage.completion_tokens)
    assert first.status == ("incomplete" if ref.choices[0].finish_reason == "length" else "completed")
    events = list(client.responses.create(input=PROMPTS[0], stream=True, **kw))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == text
    assert events[-1].response.output_text == text
    # instructions are a system message; a continuation carries the conversation before it
    told = client.responses.create(input=PROMPTS[1], instructions="Answer in one word.", **kw)
    assert told.output_text == chat([{"role": "system", "content": "Answer in one word."},
                                     {"role": "user", "content": PROMPTS[1]}])[0]
    second = client.responses.create(input=[{"role": "user", "content": [{"type": "input_text", "text":
                                     "Now add 8."}]}], previous_response_id=first.id, **kw)
    assert second.output_text == chat([{"role": "user", "content": PROMPTS[0]},
                                       {"role": "assistant", "content": text},
                                       {"role": "user", "content": "Now add 8."}])[0]
    assert second.previous_response_id == first.id and second.usage.input_tokens > first.usage.input_tokens
    assert client.responses.retrieve(first.id).output_text == text
    items = client.responses.input_items.list(second.id)
    assert [i.content[0].text for i in items.data] == ["Now add 8."]
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError) as info:
        client.responses.create(input="more", previous_response_id=first.id, **kw)
    assert info.value.body["code"] == "previous_response_not_found"
    unstored = client.responses.create(input=PROMPTS[0], store=False, **{**kw, "max_output_tokens": 2})
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


@pytest.mark.parametrize("body, param", [
    ({"model": "math-solo"}, "input"),
    ({"model": "math-solo", "input": []}, "input"),
    ({"model": "math-solo", "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input"),
    ({"model": "math-solo", "input": [{"type": "function_call_output", "call_id": "c", "output": "1"}]}, "input"),
    ({"model": "math-solo", "input": "hi", "max_output_tokens": 100000}, "input"),
    ({"model": "math-solo", "input": "hi", "temperature": 9}, "temperature"),
])
def test_bad_responses_requests_get_openai_errors(solo, body, param):
    spec, _, _ = solo
    with httpx.Client(base_url=spec.base_url, timeout=60) as http:
        r = http.post("/responses", json=body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param
        assert http.post("/responses", json={"model": "math-solo", "input": "hi", "max_output_tokens": 2}
                         ).status_code == 200


@pytest.mark.parametrize("body, status, param", [
    ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ({"model": "math-solo", "messages": []}, 400, "messages"),
    ({"model": "math-solo", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    ({"model": "math-solo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, 400, "messages"),
    ({"model": "math-solo", "messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
    ({"model": "math-solo", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "messages"),
    ({"model": "math-solo", "messages": [{"role": "user", "content": "hi"}], "stop": ["a"] * 5}, 400, "stop"),
])
def test_bad_requests_get_openai_errors_and_the_worker_stays_up(solo, body, status, param):
    spec, _, _ = solo
    with httpx.Client(base_url=spec.base_url, timeout=60) as http:
        r = http.post("/chat/completions", json=body)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["param"] == param and err["message"]
        assert http.post("/chat/completions", content=b"{not json").status_code == 400
        ok = http.post("/chat/completions", json={"model": "math-solo", "max_tokens": 2,
                                                  "messages": [{"role": "user", "content": "hi"}]})
        assert ok.status_code == 200


def test_gateway_dispatches_collab_models_to_the_worker(solo, client, tmp_path):
    from router_gateway.app import create_app
    from tests.router_gateway.conftest import CLIENT_KEY, make_settings, serve_in_thread

    spec, _, _ = solo
    store = ExpertStore(open_redis(None, tmp_path / "gw"))
    store.put(spec)
    try:
        kw = dict(messages=[{"role": "user", "content": PROMPTS[0]}], temperature=0, max_tokens=16)
        direct = client.chat.completions.create(model="math-solo", **kw)
        with serve_in_thread(create_app(make_settings(tmp_path / "gw", upstream_timeout_s=120), store)) as url:
            gw = openai.OpenAI(base_url=url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=120)
            raw = gw.chat.completions.with_raw_response.create(model="collab:math-solo", **kw)
            assert raw.headers["x-switchyard-expert"] == "math-solo"
            assert raw.parse().choices[0].message.content == direct.choices[0].message.content
            listed = {m.id for m in gw.models.list().data}
            assert "collab:math-solo" in listed
            # The Responses API too: answered by the group, continued and fetched where it is stored.
            raw = gw.responses.with_raw_response.create(model="collab:math-solo", input=PROMPTS[0], temperature=0,
                                                        max_output_tokens=16)
            first = raw.parse()
            assert raw.headers["x-switchyard-expert"] == "math-solo" and first.model == "collab:math-solo"
            assert first.output_text == direct.choices[0].message.content
            raw = gw.responses.with_raw_response.create(model="collab:math-solo", input="Now add 8.", temperature=0,
                                                        max_output_tokens=4, previous_response_id=first.id)
            assert raw.headers["x-switchyard-router"] == "pinned" and raw.parse().previous_response_id == first.id
            assert gw.responses.retrieve(first.id).model == "collab:math-solo"
            with pytest.raises(openai.NotFoundError):
                gw.chat.completions.create(model="collab:no-such-group", **kw)
    finally:
        store.client.shutdown(nosave=True)


def test_launcher_reports_and_stops_the_collab_worker(solo):
    spec, store, launcher = solo
    (info,) = [w for w in launcher.status() if w.name == "math-solo"]
    assert info.alive and info.healthy and info.base_url == spec.base_url
    cmd = json.loads(launcher._pidfile("math-solo").read_text())["cmd"]
    assert "expert_registry.collab_worker" in cmd and "--group" in cmd


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("{", "not readable JSON"),
    ('{"name": "g", "mode": "swap", "experts": {"a": "/x"}}', "mode must be one of"),
    ('{"name": "g", "mode": "logit", "experts": {"a": "/x"}}', "needs 'head'"),
    ('{"name": "g", "experts": {}}', "'experts' must map"),
    ('{"name": "g", "experts": {"a": "/x"}, "colour": 1}', "unknown keys"),
])
def test_group_file_errors_are_clear(tmp_path, content, message):
    path = tmp_path / "g.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(GroupFileError, match=message):
        GroupFile.read(path)


def test_group_file_round_trip(tmp_path):
    g = GroupFile(name="g", mode="logit", experts={"a": "/m/a", "b": "/m/b"}, head="/h", contrastive_beta=0.5)
    assert GroupFile.read(g.write(tmp_path / "sub" / "g.json")) == g
