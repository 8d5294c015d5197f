"""Observability end to end: request ids, Prometheus metrics, the decision log with its
retention cap, feedback, and `switchyard logs export` into a file the router trainer
reads. Real gateway on loopback, real Redis (embedded), the scripted real-HTTP upstream,
the real OpenAI SDK."""

from __future__ import annotations

import logging
import os
import re
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from expert_registry.spec import ExpertSpec
from expert_registry.store import ExpertStore
from router_gateway.cli import app as cli_app
from router_gateway.cli_common import console
from router_gateway.cli_logs import parse_when
from router_gateway.decision_log import decisions_key, export_rows, feedback_key, read_decisions
from router_gateway.keys import KeyPolicy, KeyStore, cost_nano
from router_gateway.observe import Trace
from router_gateway.app import create_app
from router_models.logs import load_logs
from tests.router_gateway.conftest import ADMIN_KEY, CLIENT_KEY, make_settings, scripted_experts, serve_in_thread


def _sample(text: str, name: str, **labels: str) -> float | None:
    """One sample's value from Prometheus text, matching the given labels exactly."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        m = re.match(r"([^{ ]+)(?:\{(.*)\})? (\S+)$", line)
        assert m is not None, line
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if got == labels:
            return float(m.group(3))
    return None


def _wait(cond, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


@pytest.fixture
def observed(store: ExpertStore, data_dir: Path, scripted_upstream: str):
    for spec in scripted_experts(scripted_upstream):
        store.put(spec)
    keys = KeyStore(store.client, store.prefix)
    secret, rec = keys.create("team-a", KeyPolicy(rpm=10_000))
    other, other_rec = keys.create("team-b", KeyPolicy())
    settings = make_settings(data_dir, decision_log_max_entries=1000)
    with serve_in_thread(create_app(settings, store)) as url:
        yield url, store, (secret, rec.id), (other, other_rec.id), data_dir


def test_every_response_carries_a_request_id_that_reaches_the_upstream_and_the_logs(observed, caplog):
    url, _, (secret, _), _, _ = observed
    with httpx.Client(base_url=url, timeout=30) as c:
        ok = c.post("/v1/chat/completions", headers={"authorization": f"Bearer {secret}", "x-request-id": "trace-42"},
                    json={"model": "up-echo", "messages": [{"role": "user", "content": "hi"}]})
        assert ok.status_code == 200 and ok.headers["x-request-id"] == "trace-42"
        assert ok.json()["received_request_id"] == "trace-42"        # forwarded to the expert
        # A header that is not a sane token is replaced, not echoed (no header injection).
        odd = c.post("/v1/chat/completions", headers={"authorization": f"Bearer {secret}",
                                                      "x-request-id": "a b\tc" + "x" * 200},
                     json={"model": "up-echo", "messages": [{"role": "user", "content": "hi"}]})
        assert re.fullmatch(r"[0-9a-f]{32}", odd.headers["x-request-id"])
        # Errors, other routes and unknown paths carry one too, each its own.
        ids = {c.post("/v1/chat/completions", content=b"{nope").headers["x-request-id"],
               c.get("/health").headers["x-request-id"], c.get("/nowhere").headers["x-request-id"],
               c.get("/v1/models", headers={"authorization": f"Bearer {secret}"}).headers["x-request-id"]}
        assert len(ids) == 4
        with caplog.at_level(logging.WARNING, logger="router_gateway.dispatch"):
            broke = c.post("/v1/chat/completions", headers={"authorization": f"Bearer {secret}",
                                                            "x-request-id": "trace-broken"},
                           json={"model": "up-breakstream", "stream": True,
                                 "messages": [{"role": "user", "content": "hi"}]})
            assert broke.status_code == 200 and broke.headers["x-request-id"] == "trace-broken"
    line = next(r for r in caplog.records if "broke" in r.getMessage())
    assert line.request_id == "trace-broken"


def test_metrics_count_requests_tokens_spend_errors_and_failures(observed, scripted_upstream: str):
    url, _, (secret, key_id), _, _ = observed
    sdk = openai.OpenAI(base_url=f"{url}/v1", api_key=secret, max_retries=0)
    for _ in range(3):
        sdk.chat.completions.create(model="up-echo", messages=[{"role": "user", "content": "hi"}])
    chunks = list(sdk.chat.completions.create(model="up-echo", stream=True,
                                              messages=[{"role": "user", "content": "hi"}]))
    assert chunks and all(ch.usage is None for ch in chunks)   # the usage chunk we asked for stays hidden
    with pytest.raises(openai.BadRequestError):
        sdk.chat.completions.create(model="up-echo", messages="not a list")  # type: ignore[arg-type]
    with pytest.raises(openai.InternalServerError):
        sdk.chat.completions.create(model="up-fail500", messages=[{"role": "user", "content": "hi"}])
    text = _wait(lambda: (t := httpx.get(f"{url}/metrics").text) and "up-fail500" in t and t)
    route = "/v1/chat/completions"
    assert _sample(text, "switchyard_requests_total", route=route, code="200", expert="up-echo", key=key_id) == 4
    assert _sample(text, "switchyard_requests_total", route=route, code="400", expert="", key=key_id) == 1
    assert _sample(text, "switchyard_requests_total", route=route, code="502", expert="up-fail500", key=key_id) == 1
    # 4 answers x (7 prompt + 3 completion) tokens at $1 / $2 per 1M tokens.
    assert _sample(text, "switchyard_tokens_total", expert="up-echo", key=key_id, kind="prompt") == 28
    assert _sample(text, "switchyard_tokens_total", expert="up-echo", key=key_id, kind="completion") == 12
    assert _sample(text, "switchyard_spend_usd_total", expert="up-echo", key=key_id) == pytest.approx(52e-6)
    assert _sample(text, "switchyard_request_duration_seconds_count", route=route, expert="up-echo") == 4
    assert _sample(text, "switchyard_upstream_failures_total", expert="up-fail500", reason="5xx") == 1
    assert _sample(text, "switchyard_expert_up", expert="up-echo") == 1
    assert _sample(text, "switchyard_expert_up", expert="down") == 1     # no probe has failed it (yet)
    assert _sample(text, "switchyard_store_up") == 1
    assert "switchyard_gateway_overhead_seconds_bucket" in text
    # Every upstream connection of these answers is back in the pool (the 5xx one included).
    origin = "http://" + scripted_upstream.split("://", 1)[1].split("/", 1)[0]
    assert _sample(text, "switchyard_upstream_connections", origin=origin, state="in_use") == 0
    assert _sample(text, "switchyard_upstream_connections", origin=origin, state="idle") >= 1
    assert _sample(text, "switchyard_upstream_connections", origin=origin, state="limit") == 512


def test_the_decision_log_records_each_request_and_keeps_its_cap(store: ExpertStore, data_dir: Path,
                                                                  scripted_upstream: str):
    for spec in scripted_experts(scripted_upstream):
        store.put(spec)
    settings = make_settings(data_dir, api_keys=[], decision_log_max_entries=100)
    with serve_in_thread(create_app(settings, store)) as url, httpx.Client(base_url=url, timeout=30) as c:
        first = c.post("/v1/chat/completions", json={"model": "up-echo", "messages": [
            {"role": "user", "content": "first question"}]})
        key = decisions_key(store.prefix)
        entries = _wait(lambda: store.client.xrange(key))
        assert len(entries) == 1
        d = entries[0][1]
        assert d["rid"] == first.headers["x-request-id"] and d["expert"] == "up-echo" and d["status"] == "200"
        assert d["prompt"] == "first question" and d["input_tokens"] == "7" and d["output_tokens"] == "3"
        assert float(d["cost_usd"]) == pytest.approx(13e-6) and float(d["latency_s"]) > 0
        for i in range(400):
            c.post("/v1/chat/completions", json={"model": "up-echo", "messages": [{"role": "user", "content": str(i)}]})
        assert _wait(lambda: store.client.xrevrange(key, count=1)[0][1]["prompt"] == "399")
        # MAXLEN ~ trims whole nodes: about the cap, never the whole history.
        assert 100 <= store.client.xlen(key) < 300


def test_embeddings_are_logged_but_never_exported_as_training_rows(observed):
    url, store, (secret, _), _, _ = observed
    sdk = openai.OpenAI(base_url=f"{url}/v1", api_key=secret, max_retries=0)
    raw = sdk.embeddings.with_raw_response.create(model="up-echo", input="a colour")
    rid = raw.headers["x-request-id"]
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.post("/v1/feedback", headers={"authorization": f"Bearer {secret}"},
                      json={"request_id": rid, "score": 1.0}).status_code == 201
    assert _wait(lambda: any(d.get("rid") == rid for d in read_decisions(store.client, store.prefix)))
    entry = next(d for d in read_decisions(store.client, store.prefix) if d.get("rid") == rid)
    assert (entry["endpoint"], entry["expert"], entry["prompt"], entry["input_tokens"]) == \
        ("embeddings", "up-echo", "a colour", "4")
    rows, rep = export_rows(store.client, store.prefix, unscored=True)
    assert rows == [] and rep.skipped == {"an embeddings request (routers learn from completions)": 1}


def test_feedback_and_export_make_a_training_file(observed, tmp_path: Path, monkeypatch):
    url, store, (secret, key_id), (other, _), data_dir = observed
    sdk = openai.OpenAI(base_url=f"{url}/v1", api_key=secret, max_retries=0)
    ids = {}
    for expert in ("up-echo", "echo"):
        for q in ("what is 2+2?", "name a colour"):
            raw = sdk.chat.completions.with_raw_response.create(model=expert, messages=[{"role": "user", "content": q}])
            ids[(expert, q)] = raw.headers["x-request-id"]
    with httpx.Client(base_url=url, timeout=30) as c:
        def give(rid: str, score, who: str = secret, **extra):
            return c.post("/v1/feedback", headers={"authorization": f"Bearer {who}"},
                          json={"request_id": rid, "score": score, **extra})

        for (expert, q), rid in ids.items():
            assert give(rid, 1.0 if expert == "echo" else 0.25).status_code == 201
        # Another key's opinion of team-a's answers is kept but never exported.
        assert give(ids[("echo", "name a colour")], 0.0, who=other).status_code == 201
        for bad in (give("x", 1.5), give("x", "high"), give("x", "0.5"), give("x", False), give("", 0.5),
                    give("x", 0.5, extra_field=1),
                    c.post("/v1/feedback", json={"request_id": "x", "score": 1})):
            assert bad.status_code in (400, 401) and "error" in bad.json(), bad.text
    assert _wait(lambda: len(store.client.xrange(decisions_key(store.prefix))) == 4)
    assert store.client.xlen(feedback_key(store.prefix)) == 5

    rows, rep = export_rows(store.client, store.prefix)
    assert rep.exported == 4 and {(r["model"], r["score"]) for r in rows} == {("echo", 1.0), ("up-echo", 0.25)}

    monkeypatch.setenv("SWITCHYARD_DATA_DIR", str(data_dir))
    monkeypatch.delenv("SWITCHYARD_REDIS_URL", raising=False)
    out = tmp_path / "traffic.jsonl"
    done = CliRunner().invoke(cli_app, ["logs", "export", "--out", str(out), "--task", "support"])
    assert done.exit_code == 0, done.output
    assert "wrote 4 rows" in done.output
    logs = load_logs(out)
    assert sorted(logs.experts) == ["echo", "up-echo"] and len(logs.prompt_ids) == 2
    assert set(logs.tasks) == {"support"}
    assert sorted(logs.scores.mean(axis=0).tolist()) == [0.25, 1.0]
    monkeypatch.setattr(console, "width", 250)
    tail = CliRunner().invoke(cli_app, ["logs", "tail", "-n", "2"])
    assert tail.exit_code == 0 and key_id in tail.output and ids[("echo", "name a colour")] in tail.output


def test_answers_without_usage_are_booked_at_an_estimate(observed, scripted_upstream: str):
    url, store, (secret, key_id), _, _ = observed
    store.put(ExpertSpec(name="quiet", backend="openai", base_url=scripted_upstream, served_model="nousage",
                         input_price_per_mtok=1.0, output_price_per_mtok=2.0))
    sdk = openai.OpenAI(base_url=f"{url}/v1", api_key=secret, max_retries=0)
    msgs = [{"role": "user", "content": "x" * 40}]                  # 40 characters: 10 tokens
    _wait(lambda: "quiet" in {m.id for m in sdk.models.list().data})
    plain = sdk.chat.completions.create(model="quiet", messages=msgs)
    assert plain.usage is None and plain.choices[0].message.content == "hello there"   # 11 characters: 3 tokens
    assert "".join(ch.choices[0].delta.content or "" for ch in
                   sdk.chat.completions.create(model="quiet", messages=msgs, stream=True)) == "hello there"
    keys = KeyStore(store.client, store.prefix)
    rec = keys.get(key_id)
    usage = _wait(lambda: (u := keys.usage(rec))["requests"] == 2 and u)
    assert (usage["input_tokens"], usage["output_tokens"]) == (20, 6)
    assert round(usage["spend_usd"] * 1e9) == 2 * cost_nano(10, 3, 1.0, 2.0)
    text = httpx.get(f"{url}/metrics").text
    assert _sample(text, "switchyard_tokens_total", expert="quiet", key=key_id, kind="completion") == 6


def test_parse_when():
    now = 1_000_000.0
    assert parse_when("90m", now) == now - 5400 and parse_when("2d", now) == now - 172800
    assert parse_when("2026-12-01T08:00", now) == datetime(2026, 12, 1, 8, tzinfo=timezone.utc).timestamp()
    assert parse_when("2026-12-01T08:00+01:00", now) == datetime(2026, 12, 1, 7, tzinfo=timezone.utc).timestamp()
    assert parse_when(None) is None


def test_a_request_timeout_header_bounds_the_wait(observed):
    url, _, (secret, _), _, _ = observed
    auth = {"authorization": f"Bearer {secret}"}
    body = {"model": "up-slow", "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=url, timeout=30, headers=auth) as c:
        t0 = time.monotonic()
        r = c.post("/v1/chat/completions", json=body, headers={"x-switchyard-timeout": "0.3"})
        assert r.status_code == 504 and time.monotonic() - t0 < 1.5      # the default would wait 2 s
        for bad in ("0", "-1", "soon", "nan", "100000"):
            r = c.post("/v1/chat/completions", json=body, headers={"x-switchyard-timeout": bad})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_timeout"
        assert c.get("/health").json()["status"] == "ok"


def test_metrics_need_no_key_and_show_no_secrets(observed):
    url, _, (secret, _), _, _ = observed
    r = httpx.get(f"{url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert secret not in r.text and ADMIN_KEY not in r.text and CLIENT_KEY not in r.text


def test_decision_batches_are_written_as_plain_xadds(store: ExpertStore):
    """The hand-packed XADDs store exactly the fields given (unicode, empty values, a long
    prompt, a lone surrogate made '?'), keep the stream's cap, and an error reply fails the
    batch without leaving a half-read connection in the pool."""
    import asyncio

    from expert_registry.store import open_async_redis
    from router_gateway.decision_log import DecisionLog, pack_xadds

    assert pack_xadds("k", 5, [{"a": "é", "b": ""}]) == (
        b"*10\r\n$4\r\nXADD\r\n$1\r\nk\r\n$6\r\nMAXLEN\r\n$1\r\n~\r\n$1\r\n5\r\n$1\r\n*\r\n"
        b"$1\r\na\r\n$2\r\n\xc3\xa9\r\n$1\r\nb\r\n$0\r\n\r\n")
    entries = [{"rid": f"r{i}", "prompt": "Zürich? " * 2000 if i == 0 else f"q{i}\r\n", "router": ""}
               for i in range(250)] + [{"rid": "bad", "prompt": "x\ud800y"}]

    def packed(key: str, batch: list[dict]) -> list[bytes]:
        return [pack_xadds(key, 100, [e]) for e in batch]

    async def scenario():
        r = open_async_redis(store.client, None)
        dl = DecisionLog(r, store.prefix, max_entries=100)
        await dl._write(packed(dl.key, entries))
        store.client.set(dl.key + "-not-a-stream", "x")
        with pytest.raises(Exception, match="WRONGTYPE"):
            await dl._write(packed(dl.key + "-not-a-stream", entries[:3]))
        await dl._write(packed(dl.key, [{"rid": "after"}]))   # the pool still works after the error
        await r.aclose()

    asyncio.run(scenario())
    got = store.client.xrange(decisions_key(store.prefix))
    assert 100 <= len(got) < 250                      # MAXLEN ~ applied, on whole nodes
    last = [fields for _, fields in got[-3:]]
    assert last[0] == {"rid": "r249", "prompt": "q249\r\n", "router": ""}
    assert last[1] == {"rid": "bad", "prompt": "x?y"} and last[2] == {"rid": "after"}
    assert store.client.get(decisions_key(store.prefix) + "-not-a-stream") == "x"   # untouched


_text = st.text(max_size=30)


@settings(max_examples=300, deadline=None)
@given(st.builds(
    Trace, rid=_text, t0=st.floats(0, 1e6), wall=st.floats(0, 2e9), route=_text,
    status=st.integers(0, 599), key=_text, endpoint=_text, model=_text, router=_text, expert=_text,
    fallback_from=_text, route_s=st.none() | st.floats(0, 10), scores=st.none() | _text,
    prompt=st.none() | st.text(max_size=300),
    calls=st.none() | st.lists(st.tuples(_text, st.integers(0, 10**6), st.integers(0, 10**6),
                                         st.floats(-1, 1)), max_size=3),
    ended=st.floats(0, 1e6)),
    st.sampled_from(["sy:", "", "zürich:", "100%:"]), st.booleans())
def test_a_decision_entry_is_packed_as_pack_xadds_packs_its_fields(trace, prefix, with_prompts):
    """The decision log's one-string packing of an entry (ASCII values) gives the bytes of
    ``pack_xadds`` over ``entry_of``'s fields, the reference; anything else takes that path."""
    from router_gateway.decision_log import DecisionLog, entry_of, pack_xadds

    dl = DecisionLog(None, prefix, max_entries=1000, with_prompts=with_prompts)
    assert dl.packed(trace) == pack_xadds(dl.key, 1000, [entry_of(trace, with_prompts)])


def test_a_decision_batch_gives_up_on_a_redis_that_stops_answering(store: ExpertStore):
    """The replies of a batch are awaited within one ``socket_timeout`` in all: a server
    that stops answering mid-way fails the batch in time (dropped, counted, logged by
    ``flush``) instead of hanging the writer; the log writes again once it answers."""
    import asyncio

    import redis.asyncio as aredis

    from router_gateway.decision_log import DecisionLog, pack_xadds

    async def scenario():
        r = aredis.Redis(unix_socket_path=store.client.socket_file, socket_timeout=0.5)
        dl = DecisionLog(r, store.prefix, max_entries=100)

        def packed(*rids: str) -> list[bytes]:
            return [pack_xadds(dl.key, 100, [{"rid": rid}]) for rid in rids]

        await dl._write(packed("before"))
        store.client.execute_command("CLIENT", "PAUSE", "2000", "WRITE")   # XADDs wait
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            await dl._write(packed("paused0", "paused1", "paused2"))
        waited = time.monotonic() - t0
        store.client.execute_command("CLIENT", "UNPAUSE")
        await dl._write(packed("after"))
        await r.aclose()
        return waited

    waited = asyncio.run(scenario())
    assert 0.4 < waited < 1.5
    rids = [f["rid"] for _, f in store.client.xrange(decisions_key(store.prefix))]
    assert rids[0] == "before" and rids[-1] == "after"


def test_gc_tuning_freezes_the_startup_heap(store: ExpertStore, data_dir: Path):
    """With ``gc_tuning`` (the default outside the test suite) a started gateway has frozen
    its start-up heap and raised the young-generation threshold; without it, neither."""
    import gc

    from router_gateway.app import GC_THRESHOLD

    before = gc.get_threshold()
    gc.unfreeze()
    try:
        with serve_in_thread(create_app(make_settings(data_dir, gc_tuning=False), store)) as url:
            assert httpx.get(f"{url}/health").status_code == 200
            assert gc.get_freeze_count() == 0 and gc.get_threshold() == before
        with serve_in_thread(create_app(make_settings(data_dir, gc_tuning=True), store)) as url:
            assert httpx.get(f"{url}/health").status_code == 200
            assert gc.get_freeze_count() > 10_000 and gc.get_threshold() == GC_THRESHOLD
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_new_request_ids_are_random_unique_and_not_shared_with_a_forked_child():
    """Ids come 128 at a time from one os.urandom read: 32 hex digits, none repeated across
    refills, and a child forked with ids left in the pool draws its own, not the parent's."""
    from router_gateway.observe import new_request_id, request_id_from

    ids = [new_request_id() for _ in range(1000)]
    assert len(set(ids)) == 1000 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert re.fullmatch(r"[0-9a-f]{32}", request_id_from(b"bad id!")) and request_id_from(b"trace-1") == "trace-1"
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child: send its next ids to the parent
        os.write(write, " ".join(new_request_id() for _ in range(3)).encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 4096).decode().split()
    os.close(read)
    os.waitpid(pid, 0)
    parent = [new_request_id() for _ in range(3)]
    assert len(child) == 3 and not set(child) & set(parent)


def test_metrics_counted_in_batches_scrape_as_plain_observes_would():
    """Metrics.finish counts in dicts and folds them in at the scrape; the histogram
    buckets, sums and counters come out as one observe / inc per request gives."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from router_gateway.observe import _LATENCY_BUCKETS, _OVERHEAD_BUCKETS, Metrics

    metrics = Metrics()
    ref = CollectorRegistry()
    duration = Histogram("switchyard_request_duration_seconds", "", ["route", "expert"], buckets=_LATENCY_BUCKETS,
                         registry=ref)
    overhead = Histogram("switchyard_gateway_overhead_seconds", "", ["route"], buckets=_OVERHEAD_BUCKETS,
                         registry=ref)
    requests = Counter("switchyard_requests", "", ["route", "code", "expert", "key"], registry=ref)
    tokens = Counter("switchyard_tokens", "", ["expert", "key", "kind"], registry=ref)
    # On a bucket's bound, between bounds, above them all, zero; two routes and experts.
    cases = [(0.005, "a", 200), (0.0049, "a", 200), (400.0, "b", 502), (0.0, "a", 200), (1.0, "b", 200),
             (0.005, "a", 200), (0.0001, "b", 200)]
    for i, (seconds, expert, status) in enumerate(cases):
        route = "/v1/chat/completions" if i % 3 else "/v1/completions"
        t = Trace(f"r{i}", 100.0, 0.0, route, status=status, expert=expert, key="k", ended=100.0 + seconds,
                  overhead_s=seconds / 10, calls=[(expert, i, 2 * i, 0.0)])
        metrics.finish(t)
        if i == 3:   # a scrape between requests: what it folded is not folded again
            metrics.render()
        duration.labels(route, expert).observe((100.0 + seconds) - 100.0)
        overhead.labels(route).observe(seconds / 10)
        requests.labels(route, str(status), expert, "k").inc()
        tokens.labels(expert, "k", "prompt").inc(i)
        tokens.labels(expert, "k", "completion").inc(2 * i)

    def samples(text: bytes, names: tuple[str, ...]) -> dict[str, float]:
        lines = (ln.rsplit(" ", 1) for ln in text.decode().splitlines() if ln.startswith(names))
        return {name: float(value) for name, value in lines if "_created" not in name}

    names = ("switchyard_request_duration_seconds", "switchyard_gateway_overhead_seconds", "switchyard_requests_total",
             "switchyard_tokens_total")
    got, want = samples(metrics.render(), names), samples(generate_latest(ref), names)
    assert len(want) > 100   # 6 histogram children of 14-20 samples each, 10 counters
    assert got == pytest.approx(want, rel=1e-12)   # sums added up in another order
