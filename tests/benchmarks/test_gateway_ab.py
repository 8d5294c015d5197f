"""The side-by-side gateway benchmark's own arithmetic, on hand-made runs.

The run itself needs wrk, a git worktree and two gateways (``python
benchmarks/gateway_ab.py --base REV``); these tests pin how it pairs the runs of the two
builds, which way "better" points for each measure, and the table it prints.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "benchmarks") not in sys.path:  # where the script finds gateway_overhead and _common, as when run
    sys.path.insert(0, str(ROOT / "benchmarks"))

import gateway_ab as ab  # noqa: E402


def _run(mode: str, rnd: int, build: str, cpu: float, rps: float, redis: float | None = 10.0) -> dict:
    return {"mode": mode, "round": rnd, "build": build, "requests": int(rps * 10), "errors": 0, "rps": rps,
            "p50_ms": 20.0, "gateway_cpu_us_per_req": cpu, "redis_cpu_us_per_req": redis}


def test_runs_are_paired_by_round_and_better_points_down_for_cpu_and_up_for_throughput():
    runs = [_run("plain", 0, "this", 300, 3000), _run("plain", 0, "base", 400, 2500),
            _run("plain", 1, "base", 350, 2900), _run("plain", 1, "this", 360, 2800),   # this round: worse
            _run("stream", 0, "this", 500, 2000, redis=None), _run("stream", 0, "base", 600, 1500, redis=None)]
    s = ab.summarize(runs)
    plain = s["plain"]
    assert plain["pairs"] == 2
    cpu = plain["gateway_cpu_us_per_req"]
    assert cpu["this"] == 330 and cpu["base"] == 375 and cpu["ratio_of_means"] == pytest.approx(330 / 375)
    assert cpu["pair_ratios"] == pytest.approx([0.75, 360 / 350]) and cpu["pairs_better"] == 1
    rps = plain["rps"]
    assert rps["pair_ratios"] == pytest.approx([1.2, 2800 / 2900]) and rps["pairs_better"] == 1
    assert s["stream"]["redis_cpu_us_per_req"]["this"] is None    # no redis reading: left out, not zero
    assert s["stream"]["rps"]["pairs_better"] == 1


def test_the_table_names_both_builds_and_skips_missing_measures():
    runs = [_run("stream", 0, "this", 500, 2000, redis=None), _run("stream", 0, "base", 600, 1500, redis=None)]
    result = {"date": "2026-12-03 12:00 UTC", "machine": {"cpu": "Test CPU", "cores": 2}, "base": "abc1234",
              "this": "def5678", "settings": {"concurrency": 64, "duration_s": 10, "rounds": 1},
              "runs": runs, "summary": ab.summarize(runs)}
    text = ab.render(result)
    assert "base abc1234 vs this def5678" in text and "c=64" in text
    assert "| stream | gateway CPU us/req | 600.0 | 500.0 | 0.833 | 1 of 1 |" in text
    assert "| stream | req/s | 1,500.0 | 2,000.0 | 1.333 | 1 of 1 |" in text
    assert "Redis" not in text and "answers" not in text and "expert added with" not in text
    result["settings"]["expert_args"] = "--max-concurrency 1000"
    assert "; expert added with --max-concurrency 1000" in ab.render(result).splitlines()[0]


def test_a_run_without_answers_is_named_and_left_out_of_the_ratios():
    stalled = {**_run("plain", 1, "base", 0, 0), "requests": 0, "rps": None, "gateway_cpu_us_per_req": None}
    runs = [_run("plain", 0, "this", 300, 3000), _run("plain", 0, "base", 400, 2500),
            stalled, _run("plain", 1, "this", 310, 2900)]
    summary = ab.summarize(runs)
    cpu = summary["plain"]["gateway_cpu_us_per_req"]
    assert cpu["base"] == 400 and cpu["pair_ratios"] == pytest.approx([0.75])
    assert summary["plain"]["rps"]["base"] == 2500
    result = {"date": "2026-12-03 12:00 UTC", "machine": {"cpu": "Test CPU", "cores": 2}, "base": "abc1234",
              "this": "def5678", "settings": {"concurrency": 64, "duration_s": 10, "rounds": 2},
              "runs": runs, "summary": summary}
    assert "plain round 1, base: 0 answers, 0 errors (left out of its measures)" in ab.render(result)


def test_no_redis_server_is_found_for_a_directory_none_works_in(tmp_path: Path):
    assert ab.redis_server_of(tmp_path) is None
