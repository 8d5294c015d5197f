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
import re
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


_COLUMNS = ("time (UTC)", "request id", "key", "model", "router", "expert", "status", "latency", "tokens",
            "cost USD", "cache")


def _cells(d: dict) -> list[str]:
    ts = datetime.fromtimestamp(float(d.get("ts") or 0), timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    tokens = f"{d['input_tokens']}+{d['output_tokens']}" if d.get("input_tokens") else "-"
    latency = f"{float(d['latency_s']) * 1000:.1f} ms" if d.get("latency_s") else "-"
    return [ts, d.get("rid", ""), d.get("key") or "-", d.get("model", ""), d.get("router") or "-",
            d.get("expert") or "-", d.get("status", ""), latency, tokens, d.get("cost_usd") or "-",
            d.get("cache") or "-"]


def decision_filter(expert: Optional[str], key: Optional[str], model: Optional[str], status: Optional[str]):
    """A test of one decision-log entry: ``expert``, ``key`` and ``model`` are names or
    glob patterns, ``status`` a code (``429``) or a class (``5xx``); None passes all."""
    import fnmatch

    if status is not None and not re.fullmatch(r"[1-5](\d\d|xx)", status.lower()):
        raise typer.BadParameter(f"{status!r} is neither a status code like 429 nor a class like 5xx",
                                 param_hint="--status")
    wanted = [(f, p) for f, p in (("expert", expert), ("key", key), ("model", model)) if p is not None]
    klass = status.lower()[0] if status is not None and status.lower().endswith("xx") else None

    def test(d: dict) -> bool:
        if any(not fnmatch.fnmatchcase(d.get(f, ""), p) for f, p in wanted):
            return False
        code = d.get("status", "")
        return status is None or (code[:1] == klass if klass else code == status)

    return test


@logs_app.command("tail")
def tail(
    n: int = typer.Option(20, "-n", min=1, max=10_000, help="How many of the latest decisions"),
    follow: bool = typer.Option(False, "--follow", "-f", help="Then print new decisions as they come (Ctrl-C stops)"),
    expert: Optional[str] = typer.Option(None, help="Only this expert (a name or a glob pattern)"),
    key: Optional[str] = typer.Option(None, help="Only this API key id (or pattern; 'admin', 'static')"),
    model: Optional[str] = typer.Option(None, help="Only requests that asked for this model (or pattern)"),
    status: Optional[str] = typer.Option(None, help="Only this status code (429) or class (5xx)"),
) -> None:
    """The latest routing decisions, optionally filtered; with -f, then the new ones live."""
    from router_gateway.decision_log import decisions_key

    keep = decision_filter(expert, key, model, status)
    store = open_store(Settings())
    stream = decisions_key(store.prefix)
    found: list[dict] = []
    last_id, before = "0-0", "+"
    while len(found) < n:   # newest first, a page at a time, until n match or the log ends
        page = store.client.xrevrange(stream, before, "-", count=max(n, 500))
        if last_id == "0-0" and page:
            last_id = page[0][0]
        found += [d for _, d in page if keep(d)]
        if len(page) < max(n, 500):
            break
        ms, seq = page[-1][0].split("-")
        before = f"{ms}-{int(seq) - 1}" if int(seq) > 0 else f"{int(ms) - 1}-18446744073709551615"
    table = Table(*_COLUMNS)
    for d in reversed(found[:n]):
        table.add_row(*_cells(d))
    console.print(table)
    if not follow:
        return
    console.print("[dim]following new decisions (Ctrl-C stops) ...[/dim]")
    try:
        while True:
            for _, entries in store.client.xread({stream: last_id}, block=1000, count=500) or ():
                for entry_id, d in entries:
                    last_id = entry_id
                    if keep(d):
                        console.print("  ".join(_cells(d)), highlight=False, soft_wrap=True)
    except KeyboardInterrupt:
        pass


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
