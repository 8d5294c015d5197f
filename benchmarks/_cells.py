"""Shared by the benchmarks that put several gateway targets side by side under wrk
(``response_cache.py``, ``responses_api.py``): the command line, one measured cell per
(mode, concurrency, target) with the CPU of the process serving it and of its Redis
server, and the table they write into benchmarks/README.md."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Callable

import gateway_overhead as go

HERE = Path(__file__).resolve().parent

# A target's place in one cell: (base URL, pid whose CPU is counted, URL path under the
# base, wrk Lua script)
Plan = Callable[[str, bool], tuple[str, int, str, str]]


def parse_args(doc: str, argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("-c", "--concurrency", type=int, nargs="+", default=[1, 64])
    p.add_argument("-d", "--duration", type=int, default=8, help="seconds measured per cell")
    p.add_argument("--warmup", type=int, default=1, help="seconds of discarded load before each cell")
    p.add_argument("--no-readme", action="store_true")
    p.add_argument("--wrk", default=shutil.which("wrk"))
    return p.parse_args(argv)


def measure(args: argparse.Namespace, targets: tuple[str, ...], plan: Plan, redis_pid: int | None,
            workdir: Path) -> list[dict]:
    """Every (mode, concurrency, target) cell in turn; ``direct`` is the upstream alone
    (no Redis CPU counted for it)."""
    rows = []
    for stream in (False, True):
        for conns in args.concurrency:
            for target in targets:
                base, pid, path, script = plan(target, stream)
                lua = workdir / f"{target}-{'stream' if stream else 'plain'}.lua"
                lua.write_text(script)
                url = f"{base}/{path}"
                counts_redis = bool(redis_pid) and target != "direct"
                go.run_wrk(args.wrk, url, lua, conns, args.warmup)
                cpu0 = go.cpu_seconds(pid)
                r0 = go.cpu_seconds(redis_pid) if counts_redis else 0.0
                res = go.run_wrk(args.wrk, url, lua, conns, args.duration)
                cpu = go.cpu_seconds(pid) - cpu0
                rcpu = go.cpu_seconds(redis_pid) - r0 if counts_redis else 0.0
                n, secs = res["requests"], res["duration_us"] / 1e6
                row = {"target": target, "stream": stream, "concurrency": conns, "requests": n,
                       "errors": res["errors"], "rps": n / secs, "p50_ms": res["p50_us"] / 1e3,
                       "p99_ms": res["p99_us"] / 1e3, "server_cpu_us_per_req": 1e6 * cpu / n if n else None,
                       "redis_cpu_us_per_req": 1e6 * rcpu / n if n and target != "direct" else None}
                rows.append(row)
                print(f"{target:9} {'stream' if stream else 'plain ':6} c={conns:<4} {row['rps']:9.0f} req/s  "
                      f"p50 {row['p50_ms']:8.3f} ms  p99 {row['p99_ms']:8.3f} ms  errors {row['errors']}",
                      flush=True)
    return rows


def fmt(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def render(report: dict, baseline: str) -> str:
    """The README table: one row per cell, requests/s also as a ratio to ``baseline``'s."""
    m = report["machine"]
    lines = [f"Measured {report['when']} on {m['cpu']}, {m['cores']} cores (Python {m['python']}, "
             f"1-min load average at start {m['loadavg_at_start'][0]:.2f}), commit {report['commit']}, "
             "every process on that machine, with this command:", "",
             f"    {report['command']}", "",
             f"Raw results: [`{report['json']}`]({report['json']}). Latency in ms; CPU in us per request "
             "(gateway process; its Redis server apart).", "",
             f"| mode | c | target | req/s | vs {baseline} | p50 / p99 | gateway CPU | Redis CPU |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    cell = {(r["target"], r["stream"], r["concurrency"]): r for r in report["rows"]}
    for r in report["rows"]:
        base = cell[(baseline, r["stream"], r["concurrency"])]
        ratio = "" if r["target"] in ("direct", baseline) else f"{r['rps'] / base['rps']:.2f}x"
        lines.append(f"| {'streaming' if r['stream'] else 'non-streaming'} | {r['concurrency']} | {r['target']} | "
                     f"{fmt(r['rps'])} | {ratio} | {r['p50_ms']:.3f} / {r['p99_ms']:.3f} | "
                     f"{fmt(r['server_cpu_us_per_req']) if r['target'] != 'direct' else '-'} | "
                     f"{fmt(r['redis_cpu_us_per_req'])} |")
    return "\n".join(lines)


def by_cell(rows: list[dict], concurrency: list[int]) -> dict[str, dict[str, dict]]:
    """``{"plain/c64": {target: row}, ...}`` for the summaries."""
    return {f"{'stream' if stream else 'plain'}/c{conns}":
            {r["target"]: r for r in rows if r["stream"] == stream and r["concurrency"] == conns}
            for stream in (False, True) for conns in concurrency}


def run(argv: list[str] | None, doc: str, stem: str, targets: tuple[str, ...], baseline: str,
        start: Callable[[go.Fleet, Path], tuple[Plan, int | None]],
        summarize: Callable[[dict[str, dict[str, dict]]], dict], heading: str) -> int:
    """A whole benchmark: parse ``argv``, ``start`` the processes (it returns the plan and
    the Redis server's pid), measure every cell, save ``results/<stem>-<time>.json`` and,
    unless ``--no-readme``, rewrite the README section marked ``<!-- <stem>:begin -->``
    (underscores as dashes) under ``heading``."""
    import datetime as dt
    import json
    import sys
    import tempfile

    from _common import git_commit, machine_facts, rewrite_section, save_report

    args = parse_args(doc, argv)
    if not args.wrk:
        print("wrk is needed (apt install wrk)", file=sys.stderr)
        return 2
    when = dt.datetime.now(dt.timezone.utc)
    report = {"when": when.strftime("%Y-%m-%d %H:%M UTC"), "machine": machine_facts(), "commit": git_commit(),
              "command": " ".join([f"python benchmarks/{stem}.py", *(argv if argv is not None else sys.argv[1:])])}
    with tempfile.TemporaryDirectory() as d, go.Fleet(Path(d)) as fleet:
        plan, redis_pid = start(fleet, Path(d))
        report["rows"] = measure(args, targets, plan, redis_pid, Path(d))
    report["summary"] = summarize(by_cell(report["rows"], args.concurrency))
    out = save_report(report, HERE / "results", stem, when)
    print(json.dumps(report["summary"], indent=1))
    print(f"wrote {out}")
    if not args.no_readme:
        marker = stem.replace("_", "-")
        rewrite_section(HERE / "README.md", f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->",
                        render(report, baseline), heading)
    return 0
