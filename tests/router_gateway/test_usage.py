"""Usage reports from the decision log: ``GET /v1/usage`` and ``switchyard logs usage``,
against a real gateway, a real Redis and the scripted upstream, called with the OpenAI SDK."""

from __future__ import annotations

import json
import os
import queue
import random
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from typer.testing import CliRunner

from expert_registry.spec import ExpertSpec
from expert_registry.store import ExpertStore
from router_gateway.app import create_app
from router_gateway.cli import app as cli_app
from router_gateway.cli_common import console
from router_gateway.decision_log import decisions_key
from router_gateway.keys import KeyPolicy, KeyStore
from router_gateway.usage import (UsageReport, auto_interval, parse_interval, parse_when, plot_usage, quantile,
                                  usage_report)
from tests.router_gateway.conftest import ADMIN_KEY, make_settings, scripted_experts, serve_in_thread

CALL_USD = 7 * 1.0e-6 + 3 * 2.0e-6   # the scripted upstream's usage (7 + 3 tokens) at up-*'s prices


def test_quantiles_interpolate_as_numpy_does():
    rng = random.Random(7)
    for n in (1, 2, 3, 10, 101):
        xs = sorted(rng.random() for _ in range(n))
        for q in (0.0, 0.5, 0.95, 0.99, 1.0):
            assert quantile(xs, q) == pytest.approx(float(np.percentile(xs, q * 100)))
    assert quantile([], 0.5) is None


def _entry(ts: float, expert: str, status: int | str = 200, **kw) -> dict[str, str]:
    base = {"ts": f"{ts:.3f}", "key": "k1", "endpoint": "chat/completions", "model": expert, "router": "",
            "expert": expert, "fallback_from": "", "status": str(status), "latency_s": "0.1",
            "input_tokens": "10", "output_tokens": "5", "cost_usd": "0.001", "cache": ""}
    return {**base, **kw}


def test_a_report_counts_groups_and_keeps_to_its_window():
    report = UsageReport(("expert", "key"), since=100.0, until=200.0)
    for e in [_entry(99.9, "a"), _entry(200.0, "a"),                          # outside the window
              _entry(100.0, "a", latency_s="0.2"), _entry(150, "a", latency_s="0.4"),
              _entry(150, "a", status=502, latency_s="9", input_tokens="", output_tokens="", cost_usd=""),
              _entry(160, "b", status=429, key="k2"), _entry(170, "b", fallback_from="a", cache="hit"),
              _entry(180, "b", status="", input_tokens="x", output_tokens="nan", cost_usd="-1"),   # unreadable
              {"expert": "c"}]:                                                 # no time: not counted
        report.add(e)
    body = report.public({"k1": "team-one"})
    assert (report.first, report.last) == (100.0, 180.0)
    total = body["total"]
    assert (total["requests"], total["answered"], total["refused"], total["failed"]) == (6, 3, 1, 1)
    assert (total["fallbacks"], total["cache_hits"]) == (1, 1)
    assert (total["input_tokens"], total["output_tokens"]) == (40, 20)
    assert total["cost_usd"] == pytest.approx(0.004)
    groups = {(g["expert"], g["key"]): g for g in body["groups"]}
    assert set(groups) == {("a", "k1"), ("b", "k1"), ("b", "k2")}
    a = groups[("a", "k1")]
    assert (a["requests"], a["answered"], a["failed"], a["key_name"]) == (3, 2, 1, "team-one")
    assert a["latency_ms"] == {"p50": 300.0, "p95": pytest.approx(390.0), "p99": pytest.approx(398.0)}
    assert groups[("b", "k2")]["latency_ms"]["p50"] is None and groups[("b", "k2")]["key_name"] == "(unknown key)"
    assert [(g["expert"], g["key"]) for g in body["groups"]][0] == ("a", "k1")   # costliest first


def test_a_series_buckets_the_requests_and_cost_of_each_group():
    report = UsageReport(("expert",), since=None, until=None, timeline=[])
    for ts, expert in ((3600.0, "a"), (3661.0, "a"), (7199.0, "b"), (7200.0, "a"), (10 * 3600.0, "b")):
        report.add(_entry(ts, expert))
    series = report.series(3600)
    assert series["interval_s"] == 3600
    assert [(b["start"], [(g["expert"], g["requests"]) for g in b["groups"]]) for b in series["buckets"]] == [
        (3600.0, [("a", 2), ("b", 1)]), (7200.0, [("a", 1)]), (36000.0, [("b", 1)])]   # empty hours left out
    assert sum(g["cost_usd"] for b in series["buckets"] for g in b["groups"]) == pytest.approx(report.total.cost_usd)
    assert report.series()["interval_s"] == 900      # 9 hours: the first interval giving at most 60 buckets
    assert auto_interval(0, 3600) == 60 and auto_interval(0, 30 * 86400) == 86400 and auto_interval(None, 5) == 60
    with pytest.raises(ValueError, match="timeline"):
        UsageReport(("expert",), None, None).series()


def test_intervals_are_a_minute_to_a_year():
    assert parse_interval("15m") == 900 and parse_interval("1.5h") == 5400
    for bad in ("30s", "400d", "hourly", "0m"):
        with pytest.raises(ValueError):
            parse_interval(bad)


def test_a_plot_is_drawn_for_each_kind_of_grouping(tmp_path: Path):
    report = UsageReport(("key", "expert"), since=None, until=None, timeline=[])
    for i in range(40):   # 10 groups: the 8 costliest drawn, 2 as "other"
        report.add(_entry(1_796_000_000 + 600 * i, f"e{i % 5}", key=f"k{i % 2}", cost_usd=str(0.001 * (i % 10))))
    out = tmp_path / "usage.png"
    plot_usage(report, out, key_names={"k0": "team-zero"})
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_parse_when_refuses_what_it_cannot_place():
    for bad in ("yesterday", "9" * 400 + "s", "12 parsecs", ""):
        with pytest.raises(ValueError):
            parse_when(bad)
    assert parse_when("1.5h", now=10_000.0) == 10_000.0 - 5400


@pytest.fixture
def used(store: ExpertStore, data_dir: Path, scripted_upstream: str):
    """A gateway with two managed keys, after a known mix of requests."""
    for spec in scripted_experts(scripted_upstream):
        store.put(spec)
    store.put(ExpertSpec(name="flaky", backend="openai", base_url=scripted_upstream, served_model="fail500",
                         fallbacks=["up-echo"], input_price_per_mtok=1.0, output_price_per_mtok=2.0))
    keys = KeyStore(store.client, store.prefix)
    a_secret, a = keys.create("team-a", KeyPolicy())
    b_secret, b = keys.create("team-b", KeyPolicy())
    settings = make_settings(data_dir, decision_log_max_entries=1000)
    with serve_in_thread(create_app(settings, store)) as url:
        team_a = openai.OpenAI(base_url=f"{url}/v1", api_key=a_secret, max_retries=0)
        team_b = openai.OpenAI(base_url=f"{url}/v1", api_key=b_secret, max_retries=0)
        msgs = [{"role": "user", "content": "hi"}]
        for _ in range(3):
            team_a.chat.completions.create(model="up-echo", messages=msgs)
        assert "".join(c.choices[0].delta.content or "" for c in team_a.chat.completions.create(
            model="up-echo", messages=msgs, stream=True) if c.choices) == "hello there"
        with pytest.raises(openai.InternalServerError):
            team_a.chat.completions.create(model="up-fail500", messages=msgs)
        raw = team_b.chat.completions.with_raw_response.create(model="flaky", messages=msgs)
        assert raw.headers["x-switchyard-expert"] == "up-echo"
        team_b.chat.completions.create(model="echo", messages=msgs)
        with pytest.raises(openai.NotFoundError):
            team_b.chat.completions.create(model="nobody", messages=msgs)
        deadline = time.monotonic() + 5
        while store.client.xlen(decisions_key(store.prefix)) < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store.client.xlen(decisions_key(store.prefix)) == 8
        yield url, store, data_dir, {"team-a": a.id, "team-b": b.id}


def _get(url: str, key: str | None = ADMIN_KEY, **params) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.get(f"{url}/v1/usage", params=params, headers=headers, timeout=30)


def test_usage_by_expert_and_by_key_over_http(used):
    url, _, _, key_ids = used
    r = _get(url)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "usage" and body["by"] == ["expert"] and body["truncated"] is False
    by_expert = {g["expert"]: g for g in body["groups"]}
    assert set(by_expert) == {"up-echo", "up-fail500", "echo", ""}   # "": the unknown model, no expert
    echo = by_expert["up-echo"]
    assert (echo["requests"], echo["answered"], echo["fallbacks"]) == (5, 5, 1)   # 4 asked, 1 fallen over to
    assert (echo["input_tokens"], echo["output_tokens"]) == (35, 15)
    assert echo["cost_usd"] == pytest.approx(5 * CALL_USD)
    assert 0 < echo["latency_ms"]["p50"] <= echo["latency_ms"]["p99"] < 10_000
    assert (by_expert["up-fail500"]["failed"], by_expert["up-fail500"]["cost_usd"]) == (1, 0)
    assert by_expert["echo"]["cost_usd"] == 0 and by_expert["echo"]["input_tokens"] == 7   # no prices set
    assert by_expert[""]["refused"] == 1
    assert body["groups"][0]["expert"] == "up-echo"   # costliest first
    total = body["total"]
    assert (total["requests"], total["answered"], total["refused"], total["failed"]) == (8, 6, 1, 1)
    assert total["cost_usd"] == pytest.approx(5 * CALL_USD)

    by_key = {g["key_name"]: g for g in _get(url, by="key").json()["groups"]}
    assert {name: (g["key"], g["requests"]) for name, g in by_key.items()} == {
        "team-a": (key_ids["team-a"], 5), "team-b": (key_ids["team-b"], 3)}
    assert by_key["team-a"]["cost_usd"] == pytest.approx(4 * CALL_USD)

    both = _get(url, by=["key", "expert"]).json()
    assert {(g["key_name"], g["expert"]): g["requests"] for g in both["groups"]} == {
        ("team-a", "up-echo"): 4, ("team-a", "up-fail500"): 1, ("team-b", "up-echo"): 1,
        ("team-b", "echo"): 1, ("team-b", ""): 1}

    by_status = {g["status"]: g["requests"] for g in _get(url, by="status").json()["groups"]}
    assert by_status == {"200": 6, "502": 1, "404": 1}

    charted = _get(url, interval="1m").json()
    series = charted["series"]
    assert series["interval_s"] == 60 and 1 <= len(series["buckets"]) <= 2   # the requests took seconds
    summed: dict[str, int] = {}
    for bucket in series["buckets"]:
        assert bucket["start"] % 60 == 0
        for g in bucket["groups"]:
            summed[g["expert"]] = summed.get(g["expert"], 0) + g["requests"]
    assert summed == {g["expert"]: g["requests"] for g in charted["groups"]}
    assert _get(url, interval="auto").json()["series"]["interval_s"] == 60
    assert "series" not in body


def test_the_window_selects_requests_by_when_they_came(used):
    url, _, _, _ = used
    assert _get(url, since="1h").json()["total"]["requests"] == 8
    future = datetime.fromtimestamp(time.time() + 3600, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    later = _get(url, since=future).json()
    assert later["total"]["requests"] == 0 and later["groups"] == []
    assert _get(url, until="1h").json()["total"]["requests"] == 0
    assert _get(url, since="2000-01-01", until=future).json()["total"]["requests"] == 8


def test_usage_refuses_bad_queries_and_non_admin_callers(used):
    url, _, _, _ = used
    for params, param in (({"since": "yesterday"}, "since"), ({"until": "soon"}, "until"),
                          ({"since": "9" * 400 + "s"}, "since"), ({"by": "colour"}, "by"),
                          ({"by": ["key", "key"]}, "by"), ({"since": "1h", "until": "2h"}, "since"),
                          ({"interval": "5s"}, "interval"), ({"interval": "often"}, "interval")):
        r = _get(url, **params)
        assert r.status_code == 400, (params, r.text)
        assert r.json()["error"]["param"] == param and r.json()["error"]["type"] == "invalid_request_error"
    assert _get(url, key=None).status_code == 401
    assert _get(url, key="sy-wrong").status_code == 401
    assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok"


def test_a_client_key_may_not_read_usage(store: ExpertStore, data_dir: Path):
    secret, _ = KeyStore(store.client, store.prefix).create("team-a", KeyPolicy())
    with serve_in_thread(create_app(make_settings(data_dir), store)) as url:
        r = _get(url, key=secret)
        assert r.status_code == 403 and "admin key" in r.json()["error"]["message"]
    with serve_in_thread(create_app(make_settings(data_dir, decision_log_max_entries=0), store)) as url:
        r = _get(url)
        assert r.status_code == 400 and r.json()["error"]["code"] == "decision_log_off"


def test_a_full_log_says_the_window_may_be_cut(used):
    _, store, _, _ = used
    whole = usage_report(store.client, store.prefix, max_entries=8)
    assert whole.truncated() and whole.public()["truncated"] is True
    assert not usage_report(store.client, store.prefix, max_entries=1000).truncated()
    recent = usage_report(store.client, store.prefix, since=whole.log_starts + 0.001, max_entries=8)
    assert not recent.truncated()   # starts after the oldest entry: nothing of it was dropped


def test_the_cli_prints_the_same_report(used, monkeypatch):
    url, _, data_dir, key_ids = used
    monkeypatch.setenv("SWITCHYARD_DATA_DIR", str(data_dir))
    monkeypatch.delenv("SWITCHYARD_REDIS_URL", raising=False)
    monkeypatch.setattr(console, "width", 250)
    table = CliRunner().invoke(cli_app, ["logs", "usage", "--by", "key", "--since", "1h"])
    assert table.exit_code == 0, table.output
    rows = {cells[0]: cells for line in table.output.splitlines()
            if len(cells := [c.strip() for c in line.split("│")[1:-1]]) == 13}
    # key, requests, answered, 4xx, 5xx, fallbacks, cached, tokens in, tokens out, cost, share, p50, p99
    assert rows[f"team-a ({key_ids['team-a']})"][:11] == ["team-a (" + key_ids["team-a"] + ")", "5", "4", "0", "1",
                                                          "0", "0", "28", "12", f"{4 * CALL_USD:.6f}", "80%"]
    assert rows["total"][1:11] == ["8", "6", "1", "1", "1", "0", "42", "18", f"{5 * CALL_USD:.6f}", "100%"]
    as_json = CliRunner().invoke(cli_app, ["logs", "usage", "--by", "expert", "--json"])
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.output)["total"] == _get(url).json()["total"]
    bad = CliRunner().invoke(cli_app, ["logs", "usage", "--by", "colour"])
    assert bad.exit_code == 2 and "colour" in bad.output
    chart = data_dir / "usage.png"
    drawn = CliRunner().invoke(cli_app, ["logs", "usage", "--by", "key", "--plot", str(chart), "--interval", "1m"])
    assert drawn.exit_code == 0, drawn.output
    assert chart.read_bytes()[:4] == b"\x89PNG" and "team-a" in drawn.output   # the table still follows
    assert CliRunner().invoke(cli_app, ["logs", "usage", "--plot", str(data_dir / "usage.gif")]).exit_code == 2


def test_tail_filters_by_expert_key_model_and_status(used, monkeypatch):
    url, _, data_dir, key_ids = used
    monkeypatch.setenv("SWITCHYARD_DATA_DIR", str(data_dir))
    monkeypatch.delenv("SWITCHYARD_REDIS_URL", raising=False)
    monkeypatch.setattr(console, "width", 250)

    def rows(*args: str) -> list[list[str]]:
        done = CliRunner().invoke(cli_app, ["logs", "tail", *args])
        assert done.exit_code == 0, done.output
        return [cells for line in done.output.splitlines()
                if len(cells := [c.strip() for c in line.split("│")[1:-1]]) == 11 and cells[0] != "time (UTC)"]

    everything = rows("-n", "100")
    assert len(everything) == 8 and len(rows()) == 8 and len(rows("-n", "3")) == 3
    assert [(r[5], r[6]) for r in rows("--status", "5xx")] == [("up-fail500", "502")]
    assert [r[3] for r in rows("--status", "404")] == ["nobody"]
    assert len(rows("--status", "2xx")) == 6 and len(rows("--expert", "up-*")) == 6
    assert {r[2] for r in rows("--key", key_ids["team-b"])} == {key_ids["team-b"]} and len(rows("--key", key_ids["team-b"])) == 3
    assert [r[5] for r in rows("--model", "flaky")] == ["up-echo"]
    newest_two = rows("--expert", "up-echo", "-n", "2")
    assert [r[1] for r in newest_two] == [r[1] for r in everything if r[5] == "up-echo"][-2:]
    assert CliRunner().invoke(cli_app, ["logs", "tail", "--status", "teapot"]).exit_code == 2


def test_tail_follows_new_decisions_as_they_come(used):
    url, _, data_dir, key_ids = used
    env = {**os.environ, "SWITCHYARD_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1", "COLUMNS": "250"}
    env.pop("SWITCHYARD_REDIS_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "router_gateway.cli", "logs", "tail", "-f", "-n", "1",
                             "--status", "2xx"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()

    def read_until(pred, timeout: float = 30.0) -> list[str]:
        seen, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                seen.append(lines.get(timeout=0.2))
            except queue.Empty:
                continue
            if pred(seen):
                return seen
        raise AssertionError("".join(seen))

    try:
        read_until(lambda seen: any("following new decisions" in s for s in seen))
        sdk = openai.OpenAI(base_url=f"{url}/v1", api_key=ADMIN_KEY, max_retries=0)
        msgs = [{"role": "user", "content": "hi"}]
        rids = [sdk.chat.completions.with_raw_response.create(model="up-echo", messages=msgs)
                .headers["x-request-id"] for _ in range(2)]
        with pytest.raises(openai.InternalServerError):   # a 502: filtered out
            sdk.chat.completions.create(model="up-fail500", messages=msgs)
        failed = sdk.chat.completions.with_raw_response.create(model="echo", messages=msgs).headers["x-request-id"]
        seen = read_until(lambda seen: sum(failed in s for s in seen) == 1)
        followed = [s for s in seen if "up-echo" in s or " echo " in s]
        assert [next(r for r in rids + [failed] if r in s) for s in followed] == [*rids, failed]
        assert not any(" 502 " in s for s in seen)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
