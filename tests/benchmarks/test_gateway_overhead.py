"""The gateway-overhead benchmark's own arithmetic and markdown, on hand-made cells.

No servers and no wrk here (the run itself: ``python benchmarks/gateway_overhead.py``).
These tests pin how targets in front of the two upstream flavours are named and paired
with their own direct target, and what the goals table says for each flavour.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "benchmarks") not in sys.path:  # where the script finds _common, as when run
    sys.path.insert(0, str(ROOT / "benchmarks"))

import gateway_overhead as go  # noqa: E402

#: (target, req/s at c=1, req/s at c=64, p50 ms at c=1); streaming at half the req/s
SPEEDS = [("direct", 10_000, 100_000, 0.10), ("gateway", 3_000, 5_000, 0.30),
          ("litellm", 100, 90, 9.0), ("direct-asgi", 5_000, 12_000, 0.20), ("gateway-asgi", 2_000, 4_000, 0.50)]


def _rows(speeds: list[tuple[str, float, float, float]] = SPEEDS) -> list[dict]:
    rows = []
    for stream in (False, True):
        for c in (1, 64):
            for target, rps1, rps64, p50 in speeds:
                rps = (rps1 if c == 1 else rps64) / (2 if stream else 1)
                rows.append({"target": target, "upstream": go.split_target(target)[1], "stream": stream,
                             "concurrency": c, "requests": int(rps * 2), "errors": 0, "rps": rps,
                             "p50_ms": p50 * (1 if c == 1 else 10), "p99_ms": p50 * 3, "mean_ms": p50,
                             "max_ms": p50 * 5, "server_cpu_us_per_req": 1e6 / rps, "wrk_cpu_us_per_req": 5.0,
                             "wrk_cpu_share": 0.1 if target != "direct" or c == 1 else 0.5})
    return rows


def _report(rows: list[dict]) -> dict:
    machine = {"cpu": "Test CPU", "cores": 2, "os": "Linux", "python": "3.11", "wrk": "wrk 4.1",
               "loadavg_at_start": (0.5, 0.5, 0.5)}
    return {"date": "2026-12-02 12:00 UTC", "machine": machine, "command": "python benchmarks/gateway_overhead.py",
            "json": "results/gateway_overhead-x.json", "rows": rows, "summary": go.summarize(rows)}


def test_target_names_round_trip() -> None:
    assert [go.target_name(k, "raw") for k in ("direct", "gateway", "litellm")] == ["direct", "gateway", "litellm"]
    assert go.target_name("gateway", "asgi") == "gateway-asgi"
    for up in go.UPSTREAMS:
        assert go.split_target(go.target_name("gateway", up)) == ("gateway", up)


def test_summary_reads_each_gateway_against_its_own_upstream() -> None:
    summary = go.summarize(_rows())
    assert summary["gateway/plain/c64"]["rps_ratio"] == pytest.approx(0.05)  # 5,000 / 100,000: raw, as before
    assert summary["gateway-asgi/plain/c64"]["rps_ratio"] == pytest.approx(4_000 / 12_000)
    assert summary["gateway-asgi/plain/c64"]["direct"] == "direct-asgi"
    assert summary["gateway-asgi/stream/c1"]["added_p50_ms"] == pytest.approx(0.30)
    assert summary["gateway/plain/c1"]["added_p50_ms"] == pytest.approx(0.20)
    assert summary["litellm/plain/c64"]["upstream"] == "raw"
    assert not any(key.startswith("direct") for key in summary)


def test_goals_table_has_throughput_rows_for_both_flavours() -> None:
    text = go.render(_report(_rows()))
    goals = [line for line in text.splitlines() if line.startswith("| added latency") or
             line.startswith("| gateway throughput")]
    assert goals == [
        "| added latency p50, c=1, non-streaming, vs raw-socket upstream | < 1 ms | 0.200 ms | yes |",
        "| gateway throughput, c=64, non-streaming, vs same-stack upstream (uvicorn ASGI) | >= 30% of direct "
        "| 33.3% | yes |",
        "| gateway throughput, c=64, non-streaming, vs raw-socket upstream | >= 30% of direct | 5.0% | **no** |",
        "| added latency p50, c=1, streaming, vs raw-socket upstream | < 1 ms | 0.200 ms | yes |",
        "| gateway throughput, c=64, streaming, vs same-stack upstream (uvicorn ASGI) | >= 30% of direct "
        "| 33.3% | yes |",
        "| gateway throughput, c=64, streaming, vs raw-socket upstream | >= 30% of direct | 5.0% | **no** |",
    ]
    assert "served 8.3x the same-stack one's requests at c=64" in text  # 100,000 / 12,000


def test_cell_table_one_row_per_upstream_litellm_only_on_raw() -> None:
    lines = go.render(_report(_rows())).splitlines()
    head = next(line for line in lines if line.startswith("| mode | c | upstream |"))
    assert "| gateway/direct | litellm/direct |" in head
    raw = next(line for line in lines if line.startswith("| non-streaming | 64 | raw socket |"))
    asgi = next(line for line in lines if line.startswith("| non-streaming | 64 | uvicorn ASGI |"))
    assert raw.split(" | ")[3:8] == ["100,000", "5,000", "90", "5.0%", "0.1%"]
    assert asgi.split(" | ")[3:8] == ["12,000", "4,000", "-", "33.3%", "-"]
    assert "| gateway | uvicorn ASGI | streaming | 0.300 | 0.900 |" in lines


def test_one_flavour_only() -> None:
    rows = [r for r in _rows() if r["upstream"] == "asgi"]
    text = go.render(_report(rows))
    assert "vs same-stack upstream (uvicorn ASGI) | < 1 ms | 0.300 ms | yes |" in text  # latency falls back to it
    assert "raw socket" not in text and "raw-socket upstream" not in text
    assert "Two upstreams" not in text


def test_upstreams_option() -> None:
    assert go.parse_args(["--wrk", "wrk"]).upstreams == ["raw", "asgi"]
    assert go.parse_args(["--wrk", "wrk", "--upstreams", "asgi", "asgi"]).upstreams == ["asgi"]
    with pytest.raises(SystemExit):
        go.parse_args(["--wrk", "wrk", "--upstreams", "nginx"])
