"""The Responses API through the gateway: what it costs next to a chat completion, and
what remembering where each response is stored costs.

    python benchmarks/responses_api.py [-c 1 64] [-d 8] [--no-readme]

One same-stack load-test upstream (``loadtest_upstream.py --server asgi``, an instant
OpenAI-shaped server, NOT a model: its ``/v1/responses`` answers at once and stores
nothing) and one gateway in front of it with its embedded Redis. The same wrk load
goes, for each mode (non-streaming, streaming) and concurrency, to five targets in turn:

- ``direct``: ``POST /v1/responses`` to the upstream itself;
- ``chat``: ``POST /v1/chat/completions`` through the gateway (an answer of the same
  9 tokens), the endpoint the gateway was tuned on;
- ``unstored``: ``POST /v1/responses`` with ``store: false`` through the gateway
  (proxied and re-framed; nothing remembered);
- ``stored``: the same with ``store`` left at its default, so every answer's id is
  written to Redis before the client sees it;
- ``continued``: a stored request that also continues an earlier response
  (``previous_response_id``): one Redis lookup to find its server, then the write.

Recorded per cell: requests/s, latency p50/p99, and the CPU per request of the gateway
and of its Redis server. Writes ``results/responses_api-<time>.json`` and the
"Responses API" section of benchmarks/README.md (``--no-readme`` skips it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import httpx

import gateway_overhead as go
from _common import git_commit, machine_facts, rewrite_section, save_report
from gateway_ab import redis_server_of

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
RESULTS = HERE / "results"
TARGETS = ("direct", "chat", "unstored", "stored", "continued")
INPUT = "Summarise the plot of Hamlet in two sentences."


def body_for(target: str, stream: bool, previous: str | None) -> tuple[str, dict]:
    """The path and body a target's requests carry."""
    if target == "chat":
        return "chat/completions", go.request_body(stream)
    body: dict = {"model": go.EXPERT, "input": INPUT, "max_output_tokens": 16}
    if stream:
        body["stream"] = True
    if target == "unstored":
        body["store"] = False
    if target == "continued":
        body["previous_response_id"] = previous
    return "responses", body


def check(gateway: str) -> str:
    """A stored response is pinned and its continuation found; returns its id."""
    with httpx.Client(timeout=30) as c:
        first = c.post(f"{gateway}/responses", json=body_for("stored", False, None)[1])
        _, cont = body_for("continued", False, first.json().get("id"))
        second = c.post(f"{gateway}/responses", json=cont)
        streamed = c.post(f"{gateway}/responses", json=body_for("stored", True, None)[1])
    if first.status_code != 200 or second.status_code != 200 or second.headers.get("x-switchyard-router") != "pinned":
        raise go.BenchError(f"the gateway does not pin responses: {first.status_code} {second.status_code} "
                            f"{second.headers.get('x-switchyard-router')} {second.text[:200]}")
    if streamed.status_code != 200 or not streamed.text.startswith("event: response.created"):
        raise go.BenchError(f"streamed responses do not come through: {streamed.text[:200]}")
    return first.json()["id"]


def measure(args: argparse.Namespace, upstream: str, up_pid: int, gateway: str, gw_pid: int,
            redis_pid: int | None, previous: str, workdir: Path) -> list[dict]:
    rows = []
    for stream in (False, True):
        for conns in args.concurrency:
            for target in TARGETS:
                base, pid = (upstream, up_pid) if target == "direct" else (gateway, gw_pid)
                path, body = body_for(target, stream, previous)
                lua = workdir / f"{target}-{'stream' if stream else 'plain'}.lua"
                lua.write_text(go.LUA % {"body": json.dumps(body), "headers": ""})
                url = f"{base}/{path}"
                go.run_wrk(args.wrk, url, lua, conns, args.warmup)
                cpu0 = go.cpu_seconds(pid)
                r0 = go.cpu_seconds(redis_pid) if redis_pid and target != "direct" else 0.0
                res = go.run_wrk(args.wrk, url, lua, conns, args.duration)
                cpu = go.cpu_seconds(pid) - cpu0
                rcpu = go.cpu_seconds(redis_pid) - r0 if redis_pid and target != "direct" else 0.0
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


def render(report: dict) -> str:
    m = report["machine"]
    lines = [f"Measured {report['when']} on {m['cpu']}, {m['cores']} cores (Python {m['python']}, "
             f"1-min load average at start {m['loadavg_at_start'][0]:.2f}), commit {report['commit']}, "
             "every process on that machine, with this command:", "",
             f"    {report['command']}", "",
             f"Raw results: [`{report['json']}`]({report['json']}). Latency in ms; CPU in us per request "
             "(gateway process; its Redis server apart).", "",
             "| mode | c | target | req/s | vs unstored | p50 / p99 | gateway CPU | Redis CPU |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    cell = {(r["target"], r["stream"], r["concurrency"]): r for r in report["rows"]}
    for r in report["rows"]:
        base = cell[("unstored", r["stream"], r["concurrency"])]
        ratio = "" if r["target"] in ("direct", "unstored") else f"{r['rps'] / base['rps']:.2f}x"
        lines.append(f"| {'streaming' if r['stream'] else 'non-streaming'} | {r['concurrency']} | {r['target']} | "
                     f"{fmt(r['rps'])} | {ratio} | {r['p50_ms']:.3f} / {r['p99_ms']:.3f} | "
                     f"{fmt(r['server_cpu_us_per_req']) if r['target'] != 'direct' else '-'} | "
                     f"{fmt(r['redis_cpu_us_per_req'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-c", "--concurrency", type=int, nargs="+", default=[1, 64])
    p.add_argument("-d", "--duration", type=int, default=8, help="seconds measured per cell")
    p.add_argument("--warmup", type=int, default=1, help="seconds of discarded load before each cell")
    p.add_argument("--no-readme", action="store_true")
    p.add_argument("--wrk", default=shutil.which("wrk"))
    args = p.parse_args(argv)
    if not args.wrk:
        print("wrk is needed (apt install wrk)", file=sys.stderr)
        return 2
    import datetime as dt

    when = dt.datetime.now(dt.timezone.utc)
    report = {"when": when.strftime("%Y-%m-%d %H:%M UTC"), "machine": machine_facts(), "commit": git_commit(),
              "command": " ".join(["python benchmarks/responses_api.py", *(argv if argv is not None else sys.argv[1:])])}
    with tempfile.TemporaryDirectory() as d, go.Fleet(Path(d)) as fleet:
        upstream, up_pid = go.start_upstream(fleet, "asgi")
        gateway, gw_pid = go.start_gateway(fleet, upstream)
        previous = check(gateway)
        redis_pid = redis_server_of(Path(d) / "gateway-data")
        report["rows"] = measure(args, upstream, up_pid, gateway, gw_pid, redis_pid, previous, Path(d))
    summary = {}
    for stream in (False, True):
        for conns in args.concurrency:
            c = {r["target"]: r for r in report["rows"] if r["stream"] == stream and r["concurrency"] == conns}
            summary[f"{'stream' if stream else 'plain'}/c{conns}"] = {
                "stored_vs_unstored_rps": c["stored"]["rps"] / c["unstored"]["rps"],
                "continued_vs_unstored_rps": c["continued"]["rps"] / c["unstored"]["rps"],
                "unstored_vs_chat_rps": c["unstored"]["rps"] / c["chat"]["rps"],
                "unstored_vs_direct_rps": c["unstored"]["rps"] / c["direct"]["rps"],
                "added_p50_ms": {t: c[t]["p50_ms"] - c["direct"]["p50_ms"] for t in TARGETS[2:]}}
    report["summary"] = summary
    out = save_report(report, RESULTS, "responses_api", when)
    print(json.dumps(summary, indent=1))
    print(f"wrote {out}")
    if not args.no_readme:
        rewrite_section(README, "<!-- responses-api:begin -->", "<!-- responses-api:end -->", render(report),
                        "## Responses API")
    return 0


if __name__ == "__main__":
    sys.exit(main())
