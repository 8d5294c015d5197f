"""``switchyard logs``: the decision log a gateway keeps in Redis, shown and exported.

``export`` writes DESIGN.md's benchmark-log rows (JSONL, CSV or Parquet by suffix) from
answered requests joined with the scores clients sent to ``POST /v1/feedback``, so that
``switchyard train --logs FILE`` can train a router on a deployment's own traffic.
"""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from router_gateway.cli_common import console, fail, open_store
from router_gateway.settings import Settings

logs_app = typer.Typer(help="The decision log: recent routing decisions, and export for retraining routers.",
                       no_args_is_help=True)

_AGO = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_when(text: Optional[str], now: float | None = None) -> float | None:
    """A point in time: ``30m``/``12h``/``7d`` ago, or an ISO date/time (UTC unless it says)."""
    if text is None:
        return None
    m = _AGO.fullmatch(text.strip())
    if m:
        return (time.time() if now is None else now) - float(m.group(1)) * _UNIT_S[m.group(2)]
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise typer.BadParameter(f"{text!r} is neither a duration like 12h / 7d nor an ISO date like "
                                 "2026-12-01T08:00") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


@logs_app.command("export")
def export(
    out: Path = typer.Option(..., "--out", "-o", help="File to write: .jsonl, .csv or .parquet"),
    since: Optional[str] = typer.Option(None, help="Only requests after this (12h, 7d, or an ISO date)"),
    until: Optional[str] = typer.Option(None, help="Only requests before this"),
    task: str = typer.Option("traffic", help="The task label the rows get"),
    unscored: bool = typer.Option(False, "--unscored", help="Also write answered requests without feedback "
                                                            "(empty score)"),
) -> None:
    """Export answered requests with their feedback scores as benchmark-log rows."""
    from router_gateway.decision_log import export_rows
    from router_models.logs import write_logs

    if out.suffix not in (".jsonl", ".csv", ".parquet"):
        fail(f"--out must end in .jsonl, .csv or .parquet (got {out.name})")
    store = open_store(Settings())
    rows, rep = export_rows(store.client, store.prefix, since=parse_when(since), until=parse_when(until),
                            task=task, unscored=unscored)
    if not rows:
        why = ", ".join(f"{n} {k}" for k, n in sorted(rep.skipped.items())) or "the log is empty"
        fail(f"nothing to export: {rep.decisions} decisions in the log ({why})")
    write_logs(rows, out)
    console.print(f"wrote {rep.exported} rows from {rep.decisions} logged decisions to {out}")
    for why, n in sorted(rep.skipped.items()):
        console.print(f"  skipped {n}: {why}")


@logs_app.command("tail")
def tail(n: int = typer.Option(20, "-n", min=1, max=10_000, help="How many of the latest decisions")) -> None:
    """The latest routing decisions."""
    from router_gateway.decision_log import decisions_key

    store = open_store(Settings())
    entries = store.client.xrevrange(decisions_key(store.prefix), count=n)
    table = Table("time (UTC)", "request id", "key", "model", "router", "expert", "status", "latency",
                  "tokens", "cost USD", "cache")
    for _, d in reversed(entries):
        ts = datetime.fromtimestamp(float(d.get("ts") or 0), timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        tokens = f"{d['input_tokens']}+{d['output_tokens']}" if d.get("input_tokens") else "-"
        latency = f"{float(d['latency_s']) * 1000:.1f} ms" if d.get("latency_s") else "-"
        table.add_row(ts, d.get("rid", ""), d.get("key") or "-", d.get("model", ""), d.get("router") or "-",
                      d.get("expert") or "-", d.get("status", ""), latency, tokens, d.get("cost_usd") or "-",
                      d.get("cache") or "-")
    console.print(table)
