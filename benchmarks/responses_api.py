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

import json
import sys
from pathlib import Path

import httpx

import _cells as cells
import gateway_overhead as go
from gateway_ab import redis_server_of

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


def start(fleet: go.Fleet, workdir: Path) -> tuple[cells.Plan, int | None]:
    upstream, up_pid = go.start_upstream(fleet, "asgi")
    gateway, gw_pid = go.start_gateway(fleet, upstream)
    previous = check(gateway)

    def plan(target: str, stream: bool) -> tuple[str, int, str, str]:
        base, pid = (upstream, up_pid) if target == "direct" else (gateway, gw_pid)
        path, body = body_for(target, stream, previous)
        return base, pid, path, go.LUA % {"body": json.dumps(body), "headers": ""}

    return plan, redis_server_of(workdir / "gateway-data")


def summarize(by_cell: dict[str, dict[str, dict]]) -> dict:
    return {name: {"stored_vs_unstored_rps": c["stored"]["rps"] / c["unstored"]["rps"],
                   "continued_vs_unstored_rps": c["continued"]["rps"] / c["unstored"]["rps"],
                   "unstored_vs_chat_rps": c["unstored"]["rps"] / c["chat"]["rps"],
                   "unstored_vs_direct_rps": c["unstored"]["rps"] / c["direct"]["rps"],
                   "added_p50_ms": {t: c[t]["p50_ms"] - c["direct"]["p50_ms"] for t in TARGETS[2:]}}
            for name, c in by_cell.items()}


def main(argv: list[str] | None = None) -> int:
    return cells.run(argv, __doc__, "responses_api", TARGETS, "unstored", start, summarize, "## Responses API")


if __name__ == "__main__":
    sys.exit(main())
