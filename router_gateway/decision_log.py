"""The decision log: one entry per proxied request in a Redis stream, capped, plus the
scores users attach to past requests, exported into the benchmark-log schema so that a
router can be retrained on a deployment's own traffic.

Layout (under the store's prefix)::

    {prefix}decisions   stream  one entry per answered or refused proxied request
    {prefix}feedback    stream  request_id, score (0..1), key, comment

Both are trimmed to about ``decision_log_max_entries`` with ``XADD MAXLEN ~`` (Redis
trims whole macro-nodes, so a stream holds the cap or slightly more). A decision entry
has: ``rid ts key endpoint model router expert fallback_from status latency_s route_ms
input_tokens output_tokens cost_usd scores prompt cache`` (all strings; empty when unknown;
``prompt`` only with ``decision_log_prompts``, the default; ``cache`` the response cache's
verdict, see ``router_gateway.cache``; ``expert`` the one that answered, or the last that
failed). ``router_gateway.usage`` sums entries up by expert, router, key and so on.

Entries are buffered and written by one background task in pipelined batches (the
answer never waits on Redis); when Redis is down a batch is dropped, counted in
``switchyard_decision_log_dropped_total`` and logged once per outage.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import redis

from router_gateway.observe import Trace
from router_gateway.resp import bulk as _bulk, roundtrip

log = logging.getLogger(__name__)

MAX_BACKLOG = 10_000   # entries waiting for Redis; beyond this the oldest are dropped
BATCH = 500


def decisions_key(prefix: str) -> str:
    return f"{prefix}decisions"


def feedback_key(prefix: str) -> str:
    return f"{prefix}feedback"


def entry_of(t: Trace, with_prompt: bool) -> dict[str, str]:
    """The stream entry for one ended proxied request."""
    end = t.ended if t.ended is not None else time.perf_counter()
    usage = t.usage
    return {
        "rid": t.rid, "ts": f"{t.wall:.3f}", "key": t.key, "endpoint": t.endpoint, "model": t.model,
        "router": t.router, "expert": t.expert, "fallback_from": t.fallback_from, "status": str(t.status),
        "latency_s": f"{end - t.t0:.6f}", "route_ms": "" if t.route_s is None else f"{t.route_s * 1000:.3f}",
        "input_tokens": "" if usage is None else str(usage[0]),
        "output_tokens": "" if usage is None else str(usage[1]),
        "cost_usd": "" if usage is None else repr(t.cost_usd), "scores": t.scores or "",
        "prompt": (t.prompt or "") if with_prompt else "", "cache": t.cache,
    }


class DecisionLog:
    """Buffers the traces of ended requests and appends their entries to the stream in the
    background, each packed as its ``XADD`` (:meth:`packed`) when its batch is written:
    packing a batch in one loop cost less CPU per entry than packing each entry as its
    request ended."""

    def __init__(self, aredis: Any, prefix: str, max_entries: int, with_prompts: bool = True,
                 on_drop: Callable[[int], None] = lambda n: None, flush_s: float = 0.1):
        self.r = aredis
        self.key = decisions_key(prefix)
        self.max_entries = max_entries
        self.with_prompts = with_prompts
        self.on_drop = on_drop
        self.flush_s = flush_s
        self._pending: deque[Trace] = deque()
        self._wake = asyncio.Event()
        self._failing = False
        head = _head(self.key, max_entries).decode("utf-8", "surrogateescape")
        self._head = head if head.isascii() else None   # else every entry takes pack_xadds

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0

    def append(self, t: Trace) -> None:
        if not self.enabled:
            return
        if len(self._pending) >= MAX_BACKLOG:
            self._pending.popleft()
            self.on_drop(1)
        if t.ended is None:
            t.ended = time.perf_counter()
        self._pending.append(t)
        if len(self._pending) >= BATCH:
            self._wake.set()

    def packed(self, t: Trace) -> bytes:
        """``pack_xadds(key, max_entries, [entry_of(t, with_prompts)])``, built as one
        string where every value is ASCII (the usual case: ids, numbers, names, most
        prompts), which takes half the CPU of building the dict and packing it: a few per
        cent of the gateway's CPU per proxied request. The fields are ``entry_of``'s, in
        its order; a test holds the two paths equal."""
        head = self._head
        if head is None:
            return pack_xadds(self.key, self.max_entries, [entry_of(t, self.with_prompts)])
        end = t.ended if t.ended is not None else time.perf_counter()
        calls = t.calls
        if not calls:
            i = o = c = ""
        else:
            if len(calls) == 1:
                _, i, o, c = calls[0]
                c = 0 + c   # what sum() gives, as Trace.cost_usd does (-0.0 becomes 0.0)
            else:
                i, o = t.usage   # type: ignore[misc]
                c = t.cost_usd
            i, o, c = str(i), str(o), repr(c)
        rid, ts, key, ep, model, router = t.rid, f"{t.wall:.3f}", t.key, t.endpoint, t.model, t.router
        expert, fb, status, lat = t.expert, t.fallback_from, str(t.status), f"{end - t.t0:.6f}"
        rms = "" if t.route_s is None else f"{t.route_s * 1000:.3f}"
        sc, pr, ca = t.scores or "", (t.prompt or "") if self.with_prompts else "", t.cache
        text = (f"{head}$3\r\nrid\r\n${len(rid)}\r\n{rid}\r\n$2\r\nts\r\n${len(ts)}\r\n{ts}\r\n"
                f"$3\r\nkey\r\n${len(key)}\r\n{key}\r\n$8\r\nendpoint\r\n${len(ep)}\r\n{ep}\r\n"
                f"$5\r\nmodel\r\n${len(model)}\r\n{model}\r\n$6\r\nrouter\r\n${len(router)}\r\n{router}\r\n"
                f"$6\r\nexpert\r\n${len(expert)}\r\n{expert}\r\n$13\r\nfallback_from\r\n${len(fb)}\r\n{fb}\r\n"
                f"$6\r\nstatus\r\n${len(status)}\r\n{status}\r\n$9\r\nlatency_s\r\n${len(lat)}\r\n{lat}\r\n"
                f"$8\r\nroute_ms\r\n${len(rms)}\r\n{rms}\r\n$12\r\ninput_tokens\r\n${len(i)}\r\n{i}\r\n"
                f"$13\r\noutput_tokens\r\n${len(o)}\r\n{o}\r\n$8\r\ncost_usd\r\n${len(c)}\r\n{c}\r\n"
                f"$6\r\nscores\r\n${len(sc)}\r\n{sc}\r\n$6\r\nprompt\r\n${len(pr)}\r\n{pr}\r\n"
                f"$5\r\ncache\r\n${len(ca)}\r\n{ca}\r\n")
        if text.isascii():   # then every length above counts bytes
            return text.encode("ascii")
        return pack_xadds(self.key, self.max_entries, [entry_of(t, self.with_prompts)])

    async def run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.flush_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        while self._pending:
            pending, packed = self._pending, self.packed
            batch = [packed(pending.popleft()) for _ in range(min(BATCH, len(pending)))]
            try:
                await self._write(batch)
            except Exception as exc:   # Redis down: these entries are lost, the answers went out
                self.on_drop(len(batch))
                if not self._failing:
                    log.warning("decision log: could not write %d entries (dropped until Redis answers): %s",
                                len(batch), exc)
                self._failing = True
                return
            if self._failing:
                log.info("decision log: writing again")
                self._failing = False

    async def _write(self, batch: list[bytes]) -> None:
        """One round trip for the batch: its packed XADDs (:meth:`packed`, :func:`pack_xadds`),
        then one reply read per command (:func:`router_gateway.resp.roundtrip`). The same
        commands as a redis-py pipeline, without its per-argument packing (a tenth of the
        gateway's CPU per proxied request at saturation) or a timeout context per reply
        (2.4%)."""
        await roundtrip(self.r, b"".join(batch), len(batch))


def _head(key: str, max_entries: int) -> bytes:
    """``XADD key MAXLEN ~ max_entries *`` of an entry with 17 fields, in the Redis protocol."""
    return b"*40\r\n" + b"".join(_bulk(a) for a in ("XADD", key, "MAXLEN", "~", str(max_entries), "*"))


def _template(head: bytes, names: tuple[str, ...]) -> bytes:
    """One XADD with a ``$%d\\r\\n%b\\r\\n`` slot (length, bytes) after each field name;
    ``%`` in the key or the names is escaped."""
    def literal(b: bytes) -> bytes:
        return b.replace(b"%", b"%%")

    return literal(b"*%d\r\n" % (6 + 2 * len(names)) + head) + b"".join(
        literal(_bulk(k)) + b"$%d\r\n%b\r\n" for k in names)


def pack_xadds(key: str, max_entries: int, entries: list[dict[str, str]]) -> bytes:
    """``XADD key MAXLEN ~ max_entries * field value ...`` for each entry, in the Redis
    protocol (RESP2 arrays of bulk strings), concatenated; text is sent as UTF-8 (a lone
    surrogate becomes '?'). Entries with the same fields (all of the decision log's) share
    one packed template, filled with one ``%`` per entry."""
    head = b"".join(_bulk(a) for a in ("XADD", key, "MAXLEN", "~", str(max_entries), "*"))
    templates: dict[tuple[str, ...], bytes] = {}
    out = []
    for entry in entries:
        names = tuple(entry)
        template = templates.get(names)
        if template is None:
            template = templates[names] = _template(head, names)
        values = []
        for v in entry.values():
            data = v.encode("utf-8", "replace")
            values += (len(data), data)
        out.append(template % tuple(values))
    return b"".join(out)


async def add_feedback(aredis: Any, prefix: str, max_entries: int, request_id: str, score: float, key: str,
                       comment: str | None) -> str:
    fields = {"rid": request_id, "score": repr(score), "key": key, "ts": f"{time.time():.3f}",
              "comment": comment or ""}
    entry_id = await aredis.xadd(feedback_key(prefix), fields, maxlen=max(max_entries, 1), approximate=True)
    return _text(entry_id)


# --- reading and export (sync; the CLI) ---------------------------------------------------
def _stream(client: redis.Redis, key: str, since: float | None, until: float | None,
            count: int = 1000) -> Iterator[dict[str, str]]:
    """Entries of a stream between two unix times (its ids are millisecond times)."""
    start = "-" if since is None else f"{int(since * 1000)}-0"
    end = "+" if until is None else f"{int(until * 1000)}-18446744073709551615"
    while True:
        chunk = client.xrange(key, start, end, count=count)
        if not chunk:
            return
        for _, fields in chunk:
            yield {_text(k): _text(v) for k, v in fields.items()}
        last = _text(chunk[-1][0])
        ms, seq = last.split("-")
        start = f"{ms}-{int(seq) + 1}"


def _text(x: bytes | str) -> str:
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else x


def read_decisions(client: redis.Redis, prefix: str, since: float | None = None,
                   until: float | None = None) -> Iterator[dict[str, str]]:
    return _stream(client, decisions_key(prefix), since, until)


def read_feedback(client: redis.Redis, prefix: str) -> dict[tuple[str, str], float]:
    """(request id, key id) -> the latest score given for it by that key."""
    out: dict[tuple[str, str], float] = {}
    for f in _stream(client, feedback_key(prefix), None, None):
        try:
            out[(f["rid"], f.get("key", ""))] = float(f["score"])
        except (KeyError, ValueError):
            continue
    return out


@dataclass
class ExportReport:
    decisions: int = 0
    exported: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, why: str) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + 1


def _float(text: str) -> float | None:
    try:
        x = float(text)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def export_rows(client: redis.Redis, prefix: str, *, since: float | None = None, until: float | None = None,
                task: str = "traffic", unscored: bool = False) -> tuple[list[dict], ExportReport]:
    """Benchmark-log rows (DESIGN.md's schema) from the decision log joined with feedback.

    A row per answered request (HTTP 2xx) whose prompt was logged. Its ``score`` is the
    latest feedback from the key that made the request (or the admin key); requests
    without one are skipped unless ``unscored`` (then ``score`` is empty, which
    ``load_logs`` drops with a count). ``prompt_id`` is a hash of the prompt text, so the
    same prompt answered by several experts lines up as one prompt."""
    feedback = read_feedback(client, prefix)
    rows: list[dict] = []
    rep = ExportReport()
    for d in read_decisions(client, prefix, since, until):
        rep.decisions += 1
        if not d.get("status", "").startswith("2"):
            rep.skip("not answered (status not 2xx)")
            continue
        if d.get("endpoint") == "embeddings":
            rep.skip("an embeddings request (routers learn from completions)")
            continue
        if not d.get("prompt"):
            rep.skip("prompt not logged")
            continue
        if not d.get("expert"):
            rep.skip("no expert")
            continue
        if d.get("cache") == "hit":
            rep.skip("answered from the response cache (the expert's answer is exported once)")
            continue
        rid, key = d.get("rid", ""), d.get("key", "")
        score = feedback.get((rid, key))
        if score is None:
            score = feedback.get((rid, "admin"))
        if score is None and not unscored:
            rep.skip("no feedback score")
            continue
        prompt = d["prompt"]
        rows.append({
            "prompt_id": hashlib.sha256(prompt.encode()).hexdigest()[:16], "prompt": prompt, "task": task,
            "model": d["expert"], "score": score, "cost_usd": _float(d.get("cost_usd", "")),
            "input_tokens": _float(d.get("input_tokens", "")), "output_tokens": _float(d.get("output_tokens", "")),
            "latency_s": _float(d.get("latency_s", "")),
        })
        rep.exported += 1
    return rows, rep
