"""``switchyard logs``: the decision log a gateway keeps in Redis, shown, summed up and
exported.

``usage`` sums it up by expert, router, key, model, endpoint or status over a window
(``router_gateway.usage``; ``GET /v1/usage`` answers the same).

``export`` writes DESIGN.md's benchmark-log rows (JSONL, CSV or Parquet by suffix) from
answered requests joined with the scores clients sent to ``POST /v1/feedback``, so that
``switchyard train --logs FILE`` can train a router on a deployment's own traffic.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from router_gateway.cli_common import console, fail, open_store
from router_gateway.settings import Settings

logs_app = typer.Typer(help="The decision log: recent routing decisions, usage and cost by expert, router or "
                            "key, and export for retraining routers.", no_args_is_help=True)


def parse_when(text: Optional[str], now: float | None = None) -> float | None:
    """A point in time: ``30m``/``12h``/``7d`` ago, or an ISO date/time (UTC unless it says)."""
    from router_gateway.usage import parse_when as parse

    try:
        return parse(text, now)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


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


def _when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


@logs_app.command("usage")
def usage(
    since: Optional[str] = typer.Option(None, help="From this (12h, 7d, or an ISO date); default: the whole log"),
    until: Optional[str] = typer.Option(None, help="Up to this (default: now)"),
    by: List[str] = typer.Option(["expert"], "--by", help="Group by expert, router, key, model, endpoint or "
                                                          "status; repeat to group by several"),
    as_json: bool = typer.Option(False, "--json", help="Print GET /v1/usage's JSON instead of a table"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also draw requests and cost over time, stacked by "
                                                            "group, into this image (.png, .svg, .pdf)"),
    interval: Optional[str] = typer.Option(None, help="Time buckets of the plot and of the JSON's 'series' "
                                                      "(5m, 1h, 1d); default: at most 60 over the window"),
) -> None:
    """Requests, errors, fallbacks, tokens, cost and latency by expert, router or key."""
    from router_gateway.keys import KeyStore
    from router_gateway.usage import check_grouping, key_label, parse_interval, plot_usage, usage_report

    try:
        grouping = check_grouping(by)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--by") from None
    try:
        step = None if interval is None else parse_interval(interval)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--interval") from None
    if plot is not None and plot.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise typer.BadParameter(f"the plot must end in .png, .svg or .pdf (got {plot.name})", param_hint="--plot")
    start = parse_when(since)
    settings = Settings()
    store = open_store(settings)
    try:
        report = usage_report(store.client, store.prefix, grouping, start, parse_when(until),
                              settings.decision_log_max_entries, timeline=plot is not None or interval is not None)
    except ValueError as exc:
        fail(str(exc))
    names = {r.id: r.name for r in KeyStore(store.client, store.prefix).list()} if "key" in grouping else {}
    if plot is not None:
        plot_usage(report, plot, step, names)
        console.print(f"wrote {plot}")
    if as_json:
        body = report.public(names if "key" in grouping else None)
        if interval is not None:
            body["series"] = report.series(step)
        typer.echo(json.dumps(body, indent=2))
        return
    window = f"{_when(start) if start is not None else 'the start of the log'} to {_when(report.until) if until else 'now'}"
    if report.log_starts is None:
        console.print("The decision log is empty (is SWITCHYARD_DECISION_LOG_MAX_ENTRIES 0, or no request made yet?)")
        return
    if report.truncated():
        console.print(f"[yellow]The decision log starts at {_when(report.log_starts)} UTC (it keeps the newest "
                      f"{report.log_entries:,} entries, SWITCHYARD_DECISION_LOG_MAX_ENTRIES): earlier requests "
                      "are not counted.[/yellow]")
    table = Table(*grouping, "requests", "answered", "4xx", "5xx", "fallbacks", "cached", "tokens in",
                  "tokens out", "cost USD", "share", "p50 ms", "p99 ms", title=f"Usage, {window} UTC")
    for col in table.columns[len(grouping):]:
        col.justify = "right"
    total = report.total

    def cells(t) -> list[str]:
        p = t.public()["latency_ms"]
        share = f"{t.cost_usd / total.cost_usd:.0%}" if total.cost_usd > 0 else "-"
        return [f"{t.requests:,}", f"{t.answered:,}", f"{t.refused:,}", f"{t.failed:,}", f"{t.fallbacks:,}",
                f"{t.cache_hits:,}", f"{t.input_tokens:,}", f"{t.output_tokens:,}", f"{t.cost_usd:.6f}", share,
                "-" if p["p50"] is None else f"{p['p50']:.1f}", "-" if p["p99"] is None else f"{p['p99']:.1f}"]

    for values, tally in report.rows():
        labels = [key_label(v, names) + (f" ({v})" if v not in ("", "static", "admin") else "")
                  if f == "key" else (v or "-") for f, v in zip(grouping, values)]
        table.add_row(*labels, *cells(tally))
    table.add_section()
    table.add_row("total", *[""] * (len(grouping) - 1), *cells(total))
    console.print(table)
