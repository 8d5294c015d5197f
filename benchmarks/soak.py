"""Soak test: a long run of mixed, partly hostile traffic against one gateway, watching
that every answer stays right and that nothing leaks.

    python benchmarks/soak.py                      # 10 minutes, 32 clients
    python benchmarks/soak.py -d 3600 -c 64        # an hour
    python benchmarks/soak.py -d 60 --no-readme    # a quick look

It starts, on loopback, the raw-socket load-test upstream (``loadtest_upstream.py``,
canned answers, not a model), a *stuck* upstream in this process (it accepts
connections, reads, and never answers), and one gateway (``switchyard serve``, embedded
Redis, a fresh data dir, 64 KiB body limit) with three experts: ``loadtest`` on the
load-test upstream, ``stuck`` on the stuck one and ``down`` on a port nobody listens on.

``-c`` client tasks then send requests back to back for ``-d`` seconds, each request a
behaviour drawn at random by weight (:data:`BEHAVIOURS`): well-formed answers plain,
streamed and pipelined on kept-alive connections; clients that hang up before the answer,
in the middle of a stream, or half-way through their own body; bad JSON, wrong types, an
unknown model, a body over the limit, bytes that are not HTTP, a bad header; an expert
that is down (502, then 503 while it cools down) and one that never answers (504 at the
client's ``x-switchyard-timeout``, then 503). Every answer is checked: its status is one
the behaviour allows, a 200 carries the canned answer (a stream ends in ``data: [DONE]``),
an error is OpenAI-shaped (``{"error": {"message", "type", ...}}``); a request with no
answer after ``--client-timeout`` counts as hung.

Every ``--sample`` seconds it records the gateway process's resident memory and open
file descriptors, the embedded Redis server's memory, the stuck upstream's open
connections, ``/health``'s latency and the answers so far. After the load it waits for
the connections to settle and checks that the gateway still answers plain and streamed
requests and that its descriptors are back near where they started.

Writes ``results/soak-<time>.json`` and a plot of the samples, and rewrites the "Soak"
section of ``benchmarks/README.md`` (``--no-readme``: not). Exit status 1 when the
gateway failed a check (an unexpected answer, a hung request, leaked descriptors, a
failed final request).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime as dt
import json
import os
import random
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable
from urllib.parse import urlsplit

import httptools
import numpy as np

import gateway_overhead as go
from _common import git_commit, machine_facts, rewrite_section, save_report
from gateway_ab import redis_server_of

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
RESULTS = HERE / "results"
BEGIN, END = "<!-- soak:begin -->", "<!-- soak:end -->"
MAX_BODY = 64 * 1024
#: descriptors other than sockets that the gateway may hold after the load beyond those it
#: held before it (Redis connections, unix sockets, are counted apart and not checked: the
#: gateway keeps them open, up to its Redis pools' sizes)
FD_SLACK = 4
STUCK_TIMEOUT_S = 0.5   # the x-switchyard-timeout sent to the stuck expert
PRICES = (1, 2)   # USD per 1M input / output tokens of every expert: whole nano-dollars per token
#: the key of ``--keys``: every limit set (each is checked per request), none ever reached
KEY_POLICY = {"name": "soak", "rpm": 10**9, "tpm": 10**12, "budget_usd": 10**6, "budget_period": "total"}


# ---- one HTTP/1.1 exchange, read with httptools --------------------------------------------
@dataclass
class Answer:
    status: int = 0
    body: bytearray = field(default_factory=bytearray)
    done: bool = False


class _Answers:
    """httptools callbacks collecting the answers read from one connection."""

    def __init__(self) -> None:
        self.answers: list[Answer] = []
        self.parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        self.answers.append(Answer())

    def on_headers_complete(self) -> None:
        self.answers[-1].status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.answers[-1].body += body

    def on_message_complete(self) -> None:
        self.answers[-1].done = True

    def complete(self) -> int:
        return sum(a.done for a in self.answers)


def request(method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
            length: int | None = None) -> bytes:
    """One HTTP/1.1 request; ``length`` overrides the content-length (a truncated body)."""
    lines = [f"{method} {path} HTTP/1.1", "host: 127.0.0.1"]
    if body is not None:
        lines += ["content-type: application/json", f"content-length: {len(body) if length is None else length}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def chat(model: str = go.EXPERT, stream: bool = False, **extra) -> bytes:
    body = {"model": model, "messages": go.PROMPT, "max_tokens": 16, **extra}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return json.dumps(body).encode()


class Conn:
    """A client connection; ``exchange`` writes bytes and reads ``n`` whole answers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> "Conn":
        return cls(*await asyncio.open_connection(host, port))

    def close(self) -> None:
        self.writer.close()

    async def exchange(self, data: bytes, n: int = 1) -> list[Answer]:
        """The answers read until ``n`` are whole or the server closes (then the last
        may be partial, or there may be none)."""
        self.writer.write(data)
        got = _Answers()
        while got.complete() < n:
            chunk = await self.reader.read(65536)
            if not chunk:
                break
            try:
                got.parser.feed_data(chunk)
            except httptools.HttpParserUpgrade:
                break
        return got.answers

    async def first_bytes(self, data: bytes) -> bytes:
        self.writer.write(data)
        return await self.reader.read(256)


# ---- what an answer should be ------------------------------------------------------------
def judge(answer: Answer | None, stream: bool = False) -> str:
    """The outcome label of one answer: its status, or what is wrong with it."""
    if answer is None or not answer.status:
        return "closed"
    if not answer.done:
        return "cut-off"
    body = bytes(answer.body)
    if answer.status == 200:
        if stream:
            return "200" if body.rstrip().endswith(b"data: [DONE]") and b"canned" in body else "bad-answer"
        return "200" if b"canned answer" in body or b'"object":"list"' in body else "bad-answer"
    try:
        error = json.loads(body)["error"]
        shaped = isinstance(error["message"], str) and isinstance(error["type"], str)
    except (ValueError, KeyError, TypeError):
        shaped = False
    return str(answer.status) if shaped else "bad-error"


Behaviour = Callable[["Client"], Awaitable[str]]


@dataclass
class Client:
    host: str
    port: int
    auth: dict[str, str] = field(default_factory=dict)   # the key's authorization header
    keep: Conn | None = None   # the kept-alive connection of well-formed requests

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                length: int | None = None) -> bytes:
        """:func:`request` with this client's key."""
        return request(method, path, body, {**self.auth, **(headers or {})}, length)

    async def kept(self) -> Conn:
        if self.keep is None:
            self.keep = await Conn.open(self.host, self.port)
        return self.keep

    async def on_kept(self, data: bytes, n: int = 1) -> list[Answer]:
        conn = await self.kept()
        answers = await conn.exchange(data, n)
        if len([a for a in answers if a.done]) < n:   # the server closed it: open anew next time
            conn.close()
            self.keep = None
        return answers

    async def fresh(self) -> Conn:
        return await Conn.open(self.host, self.port)

    def drop(self) -> None:
        if self.keep is not None:
            self.keep.close()
            self.keep = None


async def _once(client: Client, data: bytes, stream: bool = False) -> str:
    answers = await client.on_kept(data)
    return judge(answers[0] if answers else None, stream)


async def _fresh_once(client: Client, data: bytes) -> str:
    conn = await client.fresh()
    try:
        answers = await conn.exchange(data)
    finally:
        conn.close()
    return judge(answers[0] if answers else None)


async def plain(c: Client) -> str:
    return await _once(c, c.request("POST", "/v1/chat/completions", chat()))


async def streamed(c: Client) -> str:
    return await _once(c, c.request("POST", "/v1/chat/completions", chat(stream=True)), stream=True)


async def pipelined(c: Client) -> str:
    one = c.request("POST", "/v1/chat/completions", chat())
    answers = await c.on_kept(one * 3, 3)
    outcomes = [judge(a) for a in answers] + ["closed"] * (3 - len(answers))
    return next((o for o in outcomes if o != "200"), "200")


async def models(c: Client) -> str:
    return await _once(c, c.request("GET", "/v1/models"))


async def leave_before_answer(c: Client) -> str:
    conn = await c.fresh()
    conn.writer.write(c.request("POST", "/v1/chat/completions", chat(stream=random.random() < 0.5)))
    await conn.writer.drain()
    conn.close()
    return "left"


async def leave_mid_stream(c: Client) -> str:
    conn = await c.fresh()
    try:
        head = await conn.first_bytes(c.request("POST", "/v1/chat/completions", chat(stream=True)))
    finally:
        conn.close()
    return "left" if head.startswith(b"HTTP/1.1 200") else judge(None) if not head else "bad-answer"


async def leave_mid_body(c: Client) -> str:
    conn = await c.fresh()
    body = chat()
    conn.writer.write(c.request("POST", "/v1/chat/completions", body[: len(body) // 2], length=len(body)))
    await conn.writer.drain()
    conn.close()
    return "left"


async def bad_json(c: Client) -> str:
    return await _once(c, c.request("POST", "/v1/chat/completions", b'{"model": "loadtest", "messages": ['))


async def bad_types(c: Client) -> str:
    return await _once(c, c.request("POST", "/v1/chat/completions",
                                  json.dumps({"model": go.EXPERT, "messages": "hi", "max_tokens": "x"}).encode()))


async def unknown_model(c: Client) -> str:
    return await _once(c, c.request("POST", "/v1/chat/completions", chat(model="no-such-expert")))


async def too_large(c: Client) -> str:
    big = chat(user="x" * (MAX_BODY + 1))
    return await _fresh_once(c, c.request("POST", "/v1/chat/completions", big))


async def not_http(c: Client) -> str:
    """uvicorn answers bytes it cannot parse with a plain-text 400 and closes."""
    conn = await c.fresh()
    try:
        answers = await conn.exchange(b"\x16\x03\x01 this is not HTTP at all\r\n\r\n")
    finally:
        conn.close()
    return str(answers[0].status) if answers and answers[0].status else "closed"


async def bad_header(c: Client) -> str:
    return await _once(c, c.request("POST", "/v1/chat/completions", chat(),
                                  {"x-switchyard-timeout": "soon"}))


async def bad_key(c: Client) -> str:
    return await _once(c, request("POST", "/v1/chat/completions", chat(), {"authorization": "Bearer sk-not-a-key"}))


async def upstream_down(c: Client) -> str:
    return await _once(c, c.request("POST", "/v1/chat/completions", chat(model="down")))


async def upstream_stuck(c: Client) -> str:
    return await _once(c, c.request("POST", "/v1/chat/completions", chat(model="stuck", stream=random.random() < 0.5),
                                  {"x-switchyard-timeout": str(STUCK_TIMEOUT_S)}))


#: name -> (weight, behaviour, outcomes it allows). "left": the client hung up by design.
BEHAVIOURS: dict[str, tuple[float, Behaviour, frozenset[str]]] = {
    "plain": (30, plain, frozenset({"200"})),
    "stream": (20, streamed, frozenset({"200"})),
    "pipelined": (5, pipelined, frozenset({"200"})),
    "models": (2, models, frozenset({"200"})),
    "leave-before-answer": (6, leave_before_answer, frozenset({"left"})),
    "leave-mid-stream": (6, leave_mid_stream, frozenset({"left"})),
    "leave-mid-body": (4, leave_mid_body, frozenset({"left"})),
    "bad-json": (4, bad_json, frozenset({"400"})),
    "bad-types": (4, bad_types, frozenset({"400"})),
    "unknown-model": (4, unknown_model, frozenset({"404"})),
    "too-large": (1, too_large, frozenset({"413"})),
    "not-http": (2, not_http, frozenset({"400", "closed"})),
    "bad-header": (3, bad_header, frozenset({"400"})),
    "bad-key": (2, bad_key, frozenset({"401"})),   # only with --keys (the default)
    "upstream-down": (3, upstream_down, frozenset({"502", "503"})),
    "upstream-stuck": (2, upstream_stuck, frozenset({"504", "503"})),
}


def unexpected(outcomes: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """Per behaviour, the outcomes it does not allow, with their counts."""
    bad = {}
    for name, counts in outcomes.items():
        wrong = {o: n for o, n in counts.items() if o not in BEHAVIOURS[name][2]}
        if wrong:
            bad[name] = wrong
    return bad


# ---- the stuck upstream --------------------------------------------------------------------
class StuckUpstream:
    """Accepts connections and reads them, never answering; counts the open ones."""

    def __init__(self) -> None:
        self.open = 0
        self.accepted = 0
        self.server: asyncio.AbstractServer | None = None
        self.handlers: set[asyncio.Task] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._hold, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        self.accepted += 1
        task = asyncio.current_task()
        self.handlers.add(task)
        try:
            while await reader.read(65536):
                pass
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.open -= 1
            self.handlers.discard(task)
            writer.close()

    async def aclose(self) -> None:
        """Stop listening and end the connections still held (their handlers return)."""
        if self.server is not None:
            self.server.close()
        for task in list(self.handlers):
            task.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)


# ---- samples -------------------------------------------------------------------------------
def rss_mb(pid: int | None) -> float | None:
    with contextlib.suppress(OSError, ValueError, TypeError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return None


def open_fds(pid: int) -> int | None:
    with contextlib.suppress(OSError):
        return len(os.listdir(f"/proc/{pid}/fd"))
    return None


def connections(pid: int, ports: dict[str, int]) -> dict[str, int]:
    """``pid``'s open descriptors by what they are: ``clients`` (connections accepted on
    the gateway's port), ``upstream``/``stuck`` (connections to those upstreams'
    ports), ``unix`` (unix-domain sockets: connections to the embedded Redis) and
    ``other`` (every other descriptor: files, pipes, the listening socket...)."""
    inodes: set[str] = set()
    total = 0
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            total += 1
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
    counts = dict.fromkeys(("clients", "upstream", "stuck", "unix"), 0)
    with contextlib.suppress(OSError):   # unix sockets: the embedded Redis's clients
        for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
            f = line.split()
            if len(f) >= 7 and f[6] in inodes:
                counts["unix"] += 1
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                f = line.split()
                if len(f) < 10 or f[9] not in inodes or f[3] == "0A":   # 0A: listening
                    continue
                local, remote = int(f[1].rsplit(":", 1)[1], 16), int(f[2].rsplit(":", 1)[1], 16)
                kind = ("clients" if local == ports["gateway"] else "upstream" if remote == ports["upstream"]
                        else "stuck" if remote == ports["stuck"] else None)
                if kind:
                    counts[kind] += 1
    counts["other"] = total - sum(counts.values())
    return counts


async def fetch(host: str, port: int, data: bytes, timeout_s: float = 10.0) -> Answer | None:
    """One request on a new connection: its answer if a whole one came, else None."""
    with contextlib.suppress(OSError, asyncio.TimeoutError):
        conn = await asyncio.wait_for(Conn.open(host, port), timeout_s)
        try:
            answers = await asyncio.wait_for(conn.exchange(data), timeout_s)
        finally:
            conn.close()
        if answers and answers[0].done:
            return answers[0]
    return None


async def pool_counts(host: str, port: int) -> dict[str, dict[str, float]] | None:
    """The gateway's ``switchyard_upstream_connections`` gauge: origin -> state -> count."""
    answer = await fetch(host, port, request("GET", "/metrics"))
    if answer is None or answer.status != 200:
        return None
    out: dict[str, dict[str, float]] = {}
    for m in re.finditer(r'^switchyard_upstream_connections\{origin="([^"]*)",state="(\w+)"\} (\S+)$',
                         answer.body.decode(), re.M):
        out.setdefault(m.group(1), {})[m.group(2)] = float(m.group(3))
    return out


async def health_ms(host: str, port: int) -> float | None:
    t0 = time.perf_counter()
    answer = await fetch(host, port, request("GET", "/health"))
    return (time.perf_counter() - t0) * 1e3 if answer is not None and answer.status == 200 else None


async def admin_json(host: str, port: int, admin: str, method: str, path: str, body: dict | None = None) -> dict:
    answer = await fetch(host, port, request(method, path, None if body is None else json.dumps(body).encode(),
                                             {"authorization": f"Bearer {admin}"}))
    if answer is None or answer.status >= 300:
        raise go.BenchError(f"{method} {path}: {answer and answer.status} {answer and bytes(answer.body)[:300]!r}")
    return json.loads(bytes(answer.body))


def slope_per_min(t: list[float], y: list[float | None]) -> float | None:
    """Least-squares slope of ``y`` over ``t`` (seconds), per minute."""
    pts = [(a, b) for a, b in zip(t, y) if b is not None]
    if len(pts) < 3:
        return None
    x, v = np.array(pts).T
    return float(np.polyfit(x / 60.0, v, 1)[0])


# ---- the run -------------------------------------------------------------------------------
async def drive(host: str, ports: dict[str, int], args: argparse.Namespace, gw_pid: int,
                redis_pid: int | None, stuck: StuckUpstream, key: dict | None = None) -> dict:
    """The load, the samples, the quiet time and the final census; with ``key`` (its
    ``secret``, ``id`` and the ``admin`` key) every client sends the key, and the key's
    booked usage is read at the end."""
    port = ports["gateway"]
    auth = {"authorization": f"Bearer {key['secret']}"} if key else {}
    rng = random.Random(args.seed)
    names = [n for n in BEHAVIOURS if key or n != "bad-key"]   # without keys the gateway is open
    weights = [BEHAVIOURS[n][0] for n in names]
    outcomes: dict[str, collections.Counter] = {n: collections.Counter() for n in names}
    examples: dict[str, str] = {}
    samples: list[dict] = []
    t0 = time.monotonic()
    stop = t0 + args.duration

    async def one_client(i: int) -> None:
        client = Client(host, port, auth)
        try:
            while time.monotonic() < stop:
                name = rng.choices(names, weights)[0]
                try:
                    outcome = await asyncio.wait_for(BEHAVIOURS[name][1](client), args.client_timeout)
                except asyncio.TimeoutError:
                    outcome = "hung"
                    client.drop()
                except (ConnectionError, OSError) as exc:
                    outcome = f"conn-error:{type(exc).__name__}"
                    client.drop()
                outcomes[name][outcome] += 1
                if outcome not in BEHAVIOURS[name][2]:
                    examples.setdefault(f"{name}:{outcome}", f"at {time.monotonic() - t0:.1f} s")
        finally:
            client.drop()

    def answered() -> int:
        return sum(sum(c.values()) for c in outcomes.values())

    async def sampler() -> None:
        from tqdm import tqdm

        with tqdm(total=args.duration, unit="s", desc="soak", disable=not sys.stderr.isatty()) as bar:
            while True:
                now = time.monotonic()
                samples.append({"t": round(now - t0, 2), "requests": answered(),
                                "gateway_rss_mb": rss_mb(gw_pid), "gateway_fds": open_fds(gw_pid),
                                "gateway_conns": connections(gw_pid, ports),
                                "redis_rss_mb": rss_mb(redis_pid), "stuck_open": stuck.open,
                                "health_ms": await health_ms(host, port),
                                "pools": await pool_counts(host, port)})
                bar.update(min(args.duration, now - t0) - bar.n)
                if now >= stop:
                    return
                await asyncio.sleep(min(args.sample, max(0.0, stop - time.monotonic())) or 0.01)

    fds_before = connections(gw_pid, ports)
    rss_before = rss_mb(gw_pid)
    await asyncio.gather(sampler(), *(one_client(i) for i in range(args.concurrency)))
    elapsed = time.monotonic() - t0
    # Quiet: the connections the clients left close and timers run out. A health probe of
    # the stuck expert holds a connection to it for up to 3 s every 5 s, so the census
    # keeps, per kind, the fewest seen over the quiet time: what lasts is what leaked.
    # The health probes go through the same pools, so the in-use counts are the fewest seen
    # too, and the open upstream connections are matched against the pool's count (in use
    # plus idle) read right after them.
    census, origin = [], f"http://127.0.0.1:{ports['upstream']}"
    quiet_end = time.monotonic() + args.settle
    while True:
        fds = connections(gw_pid, ports) | {"stuck_open": stuck.open}
        pools = await pool_counts(host, port) or {}
        up = pools.get(origin, {})
        fds["unaccounted"] = abs(fds["upstream"] - up.get("in_use", 0) - up.get("idle", 0))
        census.append((fds, pools))
        if time.monotonic() >= quiet_end:
            break
        await asyncio.sleep(0.25)
    quiet = census[len(census) // 4:]
    fewest = {k: min(c[0][k] for c in quiet) for k in census[-1][0]}
    pools = {o: {state: min(c[1].get(o, {}).get(state, 0) for c in quiet) if state == "in_use" else n
                 for state, n in p.items()} for o, p in census[-1][1].items()}
    final = {"fds": {k: fewest[k] for k in ("clients", "upstream", "stuck", "unix", "other")},
             "stuck_open": fewest["stuck_open"], "unaccounted_upstream": fewest["unaccounted"],
             "pools": pools, "health_ms": await health_ms(host, port), "rss_mb": rss_mb(gw_pid)}
    client = Client(host, port, auth)
    final["plain"] = await asyncio.wait_for(plain(client), args.client_timeout)
    final["stream"] = await asyncio.wait_for(streamed(client), args.client_timeout)
    client.drop()
    if key:
        await asyncio.sleep(1.0)   # the two answers' bookings (batched) reach Redis
        final["usage"] = (await admin_json(host, port, key["admin"], "GET", f"/v1/keys/{key['id']}"))["usage"]
    return {"elapsed_s": elapsed, "concurrency": args.concurrency, "outcomes": {n: dict(c) for n, c in outcomes.items()},
            "examples": examples, "samples": samples, "fds_before": fds_before, "rss_before_mb": rss_before,
            "final": final}


#: behaviours whose requests reach the ``loadtest`` expert (so are booked), and how many each
BOOKED = {"plain": 1, "stream": 1, "pipelined": 3, "leave-before-answer": 1, "leave-mid-stream": 1}


def usage_bounds(run: dict) -> tuple[int, int]:
    """The fewest and the most requests the key can have been booked for: every answered
    one (200) at least; at most those plus every request that may have reached the expert
    without a whole answer (the clients that left, any cut-off answer)."""
    fewest = most = sum(run["final"][k] == "200" for k in ("plain", "stream"))   # the final two
    for name, per in BOOKED.items():
        counts = run["outcomes"].get(name, {})
        ok = counts.get("200", 0)
        fewest += per * ok
        most += per * sum(counts.values())
    return fewest, most


def verdict(run: dict) -> dict:
    """The checks a healthy gateway passes, and the memory trend to read."""
    samples = run["samples"]
    bad = unexpected(run["outcomes"])
    hung = sum(c.get("hung", 0) for c in run["outcomes"].values())
    final, before, pools = run["final"]["fds"], run["fds_before"], run["final"].get("pools")
    half = [s for s in samples if s["t"] >= samples[-1]["t"] / 2] if samples else []
    checks = {
        "every answer as its behaviour allows": not bad,
        "no request hung": hung == 0,
        "no client connection left open once the clients closed theirs": final["clients"] == 0,
        "every upstream connection given back to its pool (none in use)":
            bool(pools) and all(p.get("in_use", 1) == 0 for p in pools.values()),
        "every open upstream connection counted by its pool": run["final"].get("unaccounted_upstream") == 0,
        "no connection to the stuck upstream left open": final["stuck"] == 0 and run["final"]["stuck_open"] == 0,
        f"other descriptors back within {FD_SLACK} of the start": final["other"] <= before["other"] + FD_SLACK,
        "health answered in every sample": all(s["health_ms"] is not None for s in samples),
        "plain and streamed requests answered after the load":
            run["final"]["plain"] == "200" and run["final"]["stream"] == "200",
    }
    usage = run["final"].get("usage")
    if usage is not None:
        lo, hi = usage_bounds(run)
        nano = round(usage["spend_usd"] * 1e9)
        checks["the key booked every answered request, and none that cannot have reached the expert"] = \
            lo <= usage["requests"] <= hi
        checks["the key's spend is its tokens at the expert's prices"] = \
            nano == 1000 * (PRICES[0] * usage["input_tokens"] + PRICES[1] * usage["output_tokens"]) > 0
    return {"checks": checks, "healthy": all(checks.values()), "unexpected": bad, "hung": hung,
            "gateway_rss_slope_mb_per_min_second_half": slope_per_min([s["t"] for s in half],
                                                                       [s["gateway_rss_mb"] for s in half]),
            "redis_rss_slope_mb_per_min_second_half": slope_per_min([s["t"] for s in half],
                                                                    [s["redis_rss_mb"] for s in half]),
            "gateway_fds_max": max((s["gateway_fds"] or 0 for s in samples), default=None)}


def plot(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["run"]["samples"]
    t = [x["t"] / 60 for x in s]
    fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    axes[0].plot(t, [x["gateway_rss_mb"] for x in s], label="gateway")
    axes[0].plot(t, [x["redis_rss_mb"] for x in s], label="embedded Redis")
    axes[0].set_ylabel("resident memory, MB")
    axes[0].legend()
    axes[1].plot(t, [x["gateway_fds"] for x in s], label="gateway open descriptors, all", color="black")
    for kind, label in (("clients", "client connections"), ("upstream", "upstream connections"),
                        ("unix", "Redis connections"), ("other", "other descriptors")):
        axes[1].plot(t, [(x.get("gateway_conns") or {}).get(kind) for x in s], label=label, linewidth=1)
    axes[1].plot(t, [x["stuck_open"] for x in s], label="open connections to the stuck upstream")
    axes[1].plot(t, [sum(p.get("in_use", 0) for p in (x["pools"] or {}).values()) for x in s],
                 label="upstream connections in use (pool)")
    axes[1].set_ylabel("count")
    axes[1].legend(fontsize="small", ncol=2)
    rate = [0.0] + [(b["requests"] - a["requests"]) / max(1e-9, b["t"] - a["t"]) for a, b in zip(s, s[1:])]
    axes[2].plot(t, rate, label="requests/s (all behaviours)")
    axes[2].set_ylabel("requests/s")
    axes[2].set_xlabel("minutes")
    ax2 = axes[2].twinx()
    ax2.plot(t, [x["health_ms"] for x in s], color="tab:red", alpha=0.5, label="/health latency")
    ax2.set_ylabel("/health ms")
    axes[2].legend(loc="upper left")
    ax2.legend(loc="upper right")
    fig.suptitle(f"Soak: {report['args']['duration']} s, {report['args']['concurrency']} clients")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def _pools_text(pools: dict | None) -> str:
    if not pools:
        return "not read"
    return "; ".join(f"{origin} {int(p.get('in_use', -1))} in use, {int(p.get('idle', -1))} idle"
                     for origin, p in sorted(pools.items()))


def render(report: dict) -> str:
    run, v, a = report["run"], report["verdict"], report["args"]
    m = report["machine"]
    total = sum(sum(c.values()) for c in run["outcomes"].values())
    lines = [
        f"Measured {report['when']} on {m['cpu']}, {m['cores']} cores (Python {m['python']}, "
        f"{m['os']}; 1-min load average at start {m['loadavg_at_start'][0]:.2f}), commit {report['commit']}, "
        "with this command:", "", f"    {report['command']}", "",
        f"{total:,} requests from {a['concurrency']} clients in {run['elapsed_s']:.0f} s "
        f"({total / max(run['elapsed_s'], 1e-9):,.0f}/s over all behaviours). Raw results: "
        f"[`{report['json']}`]({report['json']}); plot: [`{report['plot']}`]({report['plot']}).", "",
        f"![soak samples]({report['plot']})", "",
        "| check | passed |", "| --- | --- |",
        *[f"| {k} | {'yes' if ok else '**no**'} |" for k, ok in v["checks"].items()], "",
        "| behaviour | requests | outcomes | allowed |", "| --- | --- | --- | --- |",
    ]
    for name, counts in run["outcomes"].items():
        shown = ", ".join(f"{o}: {n:,}" for o, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        lines.append(f"| {name} | {sum(counts.values()):,} | {shown} | {', '.join(sorted(BEHAVIOURS[name][2]))} |")
    s = run["samples"]
    first = next((x for x in s if x["t"] >= min(60.0, s[-1]["t"] / 4)), s[0]) if s else None

    def fmt(x: float | None, spec: str = ".1f") -> str:
        return "n/a" if x is None else format(x, spec)

    health = [x["health_ms"] for x in s if x["health_ms"] is not None]
    lines += [
        "",
        f"Gateway memory: {fmt(run['rss_before_mb'])} MB before the load, {fmt(first and first['gateway_rss_mb'])} MB "
        f"at {fmt(first and first['t'], '.0f')} s, {fmt(s[-1]['gateway_rss_mb'] if s else None)} MB at the end; "
        f"second-half trend {fmt(v['gateway_rss_slope_mb_per_min_second_half'], '+.2f')} MB/min. "
        f"Embedded Redis: {fmt(first and first['redis_rss_mb'])} -> {fmt(s[-1]['redis_rss_mb'] if s else None)} MB "
        f"(second half {fmt(v['redis_rss_slope_mb_per_min_second_half'], '+.2f')} MB/min; the decision log is "
        "capped at `decision_log_max_entries`). "
        f"Open descriptors: {sum(run['fds_before'].values())} before, at most {v['gateway_fds_max']} during, "
        f"{sum(run['final']['fds'].values())} after {a['settle']:g} s of quiet "
        f"({', '.join(f'{k} {n}' for k, n in run['final']['fds'].items())}; the fewest of each seen then), "
        f"upstream pools then: {_pools_text(run['final'].get('pools'))}. "
        f"`/health` during the load: median {fmt(float(np.median(health)) if health else None)} ms, "
        f"max {fmt(max(health) if health else None)} ms.",
    ]
    usage = run["final"].get("usage")
    if usage is not None:
        lo, hi = usage_bounds(run)
        lines += ["", f"The clients' key (every limit set, none reached) was booked for {usage['requests']:,} requests "
                  f"({usage['input_tokens']:,} input and {usage['output_tokens']:,} output tokens, "
                  f"${usage['spend_usd']:.6f}); {lo:,} were answered and at most {hi:,} can have reached the expert."]
    if run["examples"]:
        lines += ["", "First time each unexpected outcome was seen: " + "; ".join(
            f"{k} {w}" for k, w in sorted(run["examples"].items())) + "."]
    return "\n".join(lines)


async def _run(args: argparse.Namespace, fleet: go.Fleet) -> dict:
    stuck = StuckUpstream()
    ports = {"stuck": await stuck.start()}
    try:
        upstream, _ = await asyncio.to_thread(go.start_upstream, fleet, "raw")
        base, gw_pid = await asyncio.to_thread(
            go.start_gateway, fleet, upstream, env_extra={"SWITCHYARD_MAX_BODY_BYTES": str(MAX_BODY)},
            more_experts={"stuck": f"http://127.0.0.1:{ports['stuck']}/v1",
                          "down": f"http://127.0.0.1:{go.free_port()}/v1"},
            add_args=["--input-price", str(PRICES[0]), "--output-price", str(PRICES[1])])
        await asyncio.to_thread(go.check_target, "gateway", base, {})
        data_dir = fleet.workdir / "gateway-data"
        redis_pid = redis_server_of(data_dir)
        url = urlsplit(base)
        ports |= {"gateway": url.port, "upstream": urlsplit(upstream).port}
        key = None
        if args.keys:   # from here on the gateway takes no request without a key
            admin = (data_dir / "admin_key").read_text().strip()
            made = await admin_json(url.hostname, url.port, admin, "POST", "/v1/keys", KEY_POLICY)
            key = {"secret": made["key"], "id": made["id"], "admin": admin}
        return await drive(url.hostname, ports, args, gw_pid, redis_pid, stuck, key)
    finally:
        await stuck.aclose()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--duration", type=float, default=600, help="seconds of load")
    p.add_argument("-c", "--concurrency", type=int, default=32, help="client tasks")
    p.add_argument("--sample", type=float, default=5.0, help="seconds between samples")
    p.add_argument("--settle", type=float, default=6.0,
                   help="seconds of quiet before the final checks (over 5: one health-probe interval)")
    p.add_argument("--client-timeout", type=float, default=30.0,
                   help="seconds without a whole answer after which a request counts as hung")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-keys", dest="keys", action="store_false",
                   help="no API key (by default the clients use a managed key with every limit set, "
                        "and its booked usage is checked at the end)")
    p.add_argument("--no-readme", action="store_true", help="do not rewrite benchmarks/README.md")
    p.add_argument("--results", type=Path, default=RESULTS, help="folder for the JSON and the plot")
    args = p.parse_args(argv)
    if args.duration <= 0 or args.concurrency < 1 or args.sample <= 0:
        p.error("--duration and --sample must be above 0, --concurrency at least 1")
    facts = machine_facts()
    when = dt.datetime.now(dt.timezone.utc)
    with tempfile.TemporaryDirectory(prefix="switchyard-soak-") as tmp, go.Fleet(Path(tmp)) as fleet:
        run = asyncio.run(_run(args, fleet))
    report = {"when": when.strftime("%Y-%m-%d %H:%M UTC"), "machine": facts, "commit": git_commit(),
              "command": "python benchmarks/soak.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "behaviours": {n: {"weight": w, "allowed": sorted(ok)} for n, (w, _, ok) in BEHAVIOURS.items()},
              "run": run, "verdict": verdict(run)}
    out = save_report(report, args.results, "soak", when)
    report["plot"] = str(Path(report["json"]).with_suffix(".png"))
    plot(report, out.with_suffix(".png"))
    out.write_text(json.dumps(report, indent=1) + "\n")
    text = render(report)
    print(text)
    if not args.no_readme:
        rewrite_section(README, BEGIN, END, text, "## Soak")
    return 0 if report["verdict"]["healthy"] else 1


if __name__ == "__main__":
    sys.exit(main())
