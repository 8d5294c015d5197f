"""The Switchyard-vs-LiteLLM benchmark's own arithmetic, on hand-made cells.

No servers and no LiteLLM here: the run itself needs wrk and the proxy's venv
(``python benchmarks/vs_litellm.py``). These tests pin what the script derives from
wrk's numbers (added latency, the two ratios, peak memory, the goal at c=64), the
markdown it writes, the wrk script and LiteLLM config it generates, and the /proc
readings it takes memory and CPU from.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "benchmarks") not in sys.path:  # where the script finds gateway_overhead and _common, as when run
    sys.path.insert(0, str(ROOT / "benchmarks"))

import vs_litellm as vs  # noqa: E402

LINUX = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")


def _row(target: str, stream: bool, c: int, rps: float, p50: float, p99: float, rss: float = 50.0,
         errors: int = 0) -> dict:
    return {"target": target, "stream": stream, "concurrency": c, "requests": int(rps * 8), "errors": errors,
            "rps": rps, "p50_ms": p50, "p99_ms": p99, "max_ms": p99 * 2, "server_cpu_us_per_req": 1e6 / rps,
            "rss_mib": rss, "settle_s": 0.3}


def _rows(ll_rps: float = 50.0, ll_p99: float = 502.0, sy_p99: float = 12.0, sy_errors: int = 0) -> list[dict]:
    """c=16 and c=64, both modes. At c=64 non-streaming: direct p50/p99 1/2 ms, Switchyard
    2,000 req/s at 3/``sy_p99`` ms, LiteLLM ``ll_rps`` at 201/``ll_p99`` ms. Memory peaks
    there too (not in the last row)."""
    rows = []
    for stream in (False, True):
        for c in (16, 64):
            rows += [_row("direct", stream, c, 30_000.0, 1.0, 2.0, rss=20.0),
                     _row("switchyard", stream, c, 2_000.0, 3.0, sy_p99, rss=90.0 + c - 10 * stream, errors=sy_errors),
                     _row("litellm", stream, c, ll_rps, 201.0, ll_p99, rss=380.0 + c / 8 - stream)]
    return rows


def test_summarize_added_latency_ratios_and_peak_memory() -> None:
    s = vs.summarize(_rows())
    assert sorted(s["cells"]) == ["plain/c16", "plain/c64", "stream/c16", "stream/c64"]
    e = s["cells"]["plain/c64"]
    assert e["switchyard"]["added_p50_ms"] == pytest.approx(2.0)
    assert e["switchyard"]["added_p99_ms"] == pytest.approx(10.0)
    assert e["litellm"]["added_p50_ms"] == pytest.approx(200.0)
    assert e["litellm"]["added_p99_ms"] == pytest.approx(500.0)
    assert e["rps_ratio"] == pytest.approx(40.0)          # 2,000 / 50
    assert e["added_p99_ratio"] == pytest.approx(50.0)    # 500 / 10
    assert s["peak_rss_mib"] == {"direct": 20.0, "switchyard": 154.0, "litellm": 388.0}


def test_ratio_is_none_when_switchyard_adds_nothing() -> None:
    assert vs.ratio(5.0, 0.0) is None and vs.ratio(5.0, -0.2) is None
    e = vs.summarize(_rows(sy_p99=1.5))["cells"]["plain/c64"]  # faster than direct at p99: noise
    assert e["switchyard"]["added_p99_ms"] == pytest.approx(-0.5)
    assert e["added_p99_ratio"] is None
    assert vs.fmt_ratio(None) == "-" and vs.fmt_ratio(12.345) == "12.3x"


def test_goal_pass_and_each_way_to_miss() -> None:
    assert vs.goal(vs.summarize(_rows()), 2) == {
        "modes": {m: {"throughput": True, "added_p99": True, "no_errors": True, "met": True}
                  for m in ("plain", "stream")}, "met": True, "cores": 2, "verdict": "PASS"}
    # throughput: 2,000 / 250 = 8x < 10x
    g = vs.goal(vs.summarize(_rows(ll_rps=250.0)), 2)
    assert g["verdict"] == "MISS" and not g["modes"]["plain"]["throughput"] and g["modes"]["plain"]["added_p99"]
    # exactly 10x the throughput is enough ("at least 10x")
    assert vs.goal(vs.summarize(_rows(ll_rps=200.0)), 2)["modes"]["plain"]["throughput"]
    # added p99: LiteLLM 92 - 2 = 90 ms against Switchyard's 10: 9x, not under a tenth
    g = vs.goal(vs.summarize(_rows(ll_p99=92.0)), 2)
    assert g["verdict"] == "MISS" and g["modes"]["stream"]["throughput"] and not g["modes"]["stream"]["added_p99"]
    # exactly a tenth is not "under a tenth"
    assert not vs.goal(vs.summarize(_rows(ll_p99=102.0)), 2)["modes"]["plain"]["added_p99"]
    # errors in a gateway's cell (a 429 from the limiter counts) void the cell
    g = vs.goal(vs.summarize(_rows(sy_errors=3)), 2)
    assert g["verdict"] == "MISS" and g["modes"]["plain"] == {"throughput": True, "added_p99": True,
                                                              "no_errors": False, "met": False}
    # no cell at c=64: nothing met
    only16 = [r for r in _rows() if r["concurrency"] == 16]
    assert vs.goal(vs.summarize(only16), 2) == {"modes": {}, "met": False, "cores": 2, "verdict": "MISS"}


def test_a_gateway_that_completed_nothing_has_no_added_latency() -> None:
    rows = _rows()
    for r in rows:
        if r["target"] == "litellm" and r["concurrency"] == 64:
            r.update(requests=0, rps=0.0, p50_ms=0.0, p99_ms=0.0, server_cpu_us_per_req=None)
    e = vs.summarize(rows)["cells"]["stream/c64"]
    assert e["litellm"]["added_p50_ms"] is None and e["litellm"]["added_p99_ms"] is None
    assert e["rps_ratio"] is None and e["added_p99_ratio"] is None
    g = vs.goal(vs.summarize(rows), 2)
    assert g["verdict"] == "MISS" and not g["modes"]["stream"]["added_p99"]
    md = vs.render(_report(rows))
    assert "| streaming | 64 | 30,000 | 2,000 | 0 | - | 1.000 / 2.000 | 2.000 / 10.0 | - / -* | - | 500 / - |" in md
    assert "lower bounds" in md


def _report(rows: list[dict], cores: int = 2) -> dict:
    summary = vs.summarize(rows)
    checks = {"no_key": 401, "second_expert": 200, "probe": [200, 200, 429]}
    return {"date": "2026-12-02 16:30 UTC", "command": "python benchmarks/vs_litellm.py", "commit": "abc1234",
            "json": "results/vs_litellm-x.json", "litellm_version": "1.108.7",
            "machine": {"cpu": "Test CPU", "cores": cores, "os": "Linux", "python": "3.11", "wrk": "wrk 4.1.0",
                        "loadavg_at_start": (0.5, 0.4, 0.3)},
            "settings": {"duration_s": 8, "warmup_s": 1}, "rows": rows, "summary": summary,
            "goal": vs.goal(summary, cores),
            "limit_checks": {"switchyard": checks, "litellm": checks | {"no_key": 500}}}


def test_render_tables_goal_line_and_memory() -> None:
    md = vs.render(_report(_rows()))
    assert "**Goal at c=64, keys and limits on in both: PASS**\n" in md
    assert "| non-streaming | 40.0x | 50.0x | 0 / 0 | yes |" in md
    assert ("| non-streaming | 64 | 30,000 | 2,000 | 50 | 40.0x | 1.000 / 2.000 | 2.000 / 10.0 | 200.0 / 500.0 | "
            "50.0x | 500 / 20,000 |") in md
    assert "switchyard 154 MiB (gateway and its embedded Redis), litellm 388 MiB, ratio 2.5x" in md
    assert "refused (401 / 500, switchyard / litellm)" in md
    assert "    python benchmarks/vs_litellm.py\n" in md
    assert "*" not in md.replace("**", "") and "lower bounds" not in md  # >= 4 requests per connection everywhere
    assert vs.BEGIN not in md and vs.END not in md  # rewrite_section adds the markers
    # every table row has as many cells as its header
    for table in md.split("\n\n"):
        lines = [ln for ln in table.splitlines() if ln.startswith("|")]
        assert len({ln.count(" | ") for ln in lines}) <= 1, table
    missed = vs.render(_report(_rows(ll_rps=250.0), cores=4))
    assert "**Goal at c=64, keys and limits on in both: MISS** (4 cores here, goal stated for 2)" in missed
    assert "| 8.0x | 50.0x | 0 / 0 | **no** |" in missed
    # LiteLLM at 20 req/s: 160 requests over 64 connections in the cell, 2.5 each: flagged
    slow = vs.render(_report(_rows(ll_rps=20.0)))
    assert "| 200.0 / 500.0* |" in slow and "\\* fewer than 4 completed requests per connection" in slow
    assert "| 2.000 / 10.0 |" in slow  # Switchyard's cells are not flagged


def test_lua_alternates_both_experts_with_the_key() -> None:
    lua = vs.lua_script(True, {"Authorization": "Bearer sy-secret"})
    body, *bodies = (json.loads(part.split("]==]")[0]) for part in lua.split("[==[")[1:])
    assert body["model"] == vs.MODELS[0]  # wrk.body, before the request() override
    assert [b["model"] for b in bodies] == list(vs.MODELS)
    assert all(b["stream"] and b["stream_options"] == {"include_usage": True} for b in bodies)
    assert 'wrk.headers["Authorization"] = "Bearer sy-secret"' in lua
    assert "bodies[n % 2 + 1]" in lua and "%%" not in lua
    assert "WRKJSON" in lua and '"requests":%d' in lua  # gateway_overhead's summary hook, intact
    assert '"stream"' not in vs.lua_script(False, {})


def test_litellm_config_limits_every_deployment() -> None:
    cfg = vs.litellm_config(["http://a/v1", "http://b/v1"])
    deps = {d["model_name"]: d["litellm_params"] for d in cfg["model_list"]}
    assert list(deps) == [*vs.MODELS, vs.PROBE_MODEL]
    assert [deps[m]["api_base"] for m in deps] == ["http://a/v1", "http://b/v1", "http://a/v1"]
    assert [deps[m]["rpm"] for m in deps] == [vs.BIG_RPM, vs.BIG_RPM, vs.PROBE_RPM]
    assert all(p["tpm"] == vs.BIG_TPM and p["model"] == f"openai/{m}" for m, p in deps.items())
    assert cfg["router_settings"] == {"enable_pre_call_checks": True}


@LINUX
def test_process_tree_memory_and_cpu(tmp_path: Path) -> None:
    me = vs.rss_mib([os.getpid()])
    assert 5 < me < 64 * 1024
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], cwd=tmp_path)
    try:
        deadline = time.monotonic() + 10
        while vs.rss_mib([child.pid]) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        tree, others = vs.proc_tree(os.getpid())
        assert child.pid in tree and others == []
        assert vs.rss_mib(tree) > me
        # found by its working directory although no descendant of the root (pid 0: none)
        assert vs.proc_tree(0, tmp_path) == ([], [child.pid])
        assert vs.proc_tree(0, tmp_path / "elsewhere") == ([], [])
        t = vs.Target("http://unused/v1", child.pid, {})
        assert vs.server_rss(t) == pytest.approx(vs.rss_mib([child.pid]), rel=0.5)
        assert vs.settle(t, limit_s=5) < 2  # a sleeping process is idle at once
    finally:
        child.kill()
        child.wait()
    assert vs.rss_mib([child.pid]) == 0  # gone: counts nothing


@LINUX
def test_stop_strays_ends_what_works_under_the_run_folder(tmp_path: Path) -> None:
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    run.mkdir()
    elsewhere.mkdir()
    argv = [sys.executable, "-c", "import time; time.sleep(30)"]
    stray, other = (subprocess.Popen(argv, cwd=d) for d in (run, elsewhere))
    try:
        deadline = time.monotonic() + 10
        while vs.proc_tree(0, run)[1] != [stray.pid] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert vs.stop_strays(run, grace_s=1) == [stray.pid]
        assert stray.wait(timeout=5) == -15  # SIGTERM first
        assert other.poll() is None  # another folder's process is left alone
        assert vs.stop_strays(run, grace_s=1) == []
    finally:
        for p in (stray, other):
            p.kill()
            p.wait()


def test_cli_defaults_and_checks() -> None:
    args = vs.parse_args(["--wrk", "/bin/true"])
    assert (args.concurrency, args.duration, args.warmup, args.no_readme) == ([16, 64, 256], 8, 1, False)
    assert args.results == vs.RESULTS
    args = vs.parse_args(["--wrk", "/bin/true", "-c", "64", "16", "64", "--json-out", "/tmp/x", "--no-readme"])
    assert (args.concurrency, args.results, args.no_readme) == ([16, 64], Path("/tmp/x"), True)
    for bad in (["--wrk", "/bin/true", "-c", "0"], ["--wrk", "/bin/true", "-d", "0"], ["--wrk", ""]):
        with pytest.raises(SystemExit):
            vs.parse_args(bad)
