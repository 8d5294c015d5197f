"""API keys: created, listed and revoked by an admin, stored hashed in Redis, each with
its own policy (which models it may call, a spend budget over a period, requests and
tokens per minute), and the limiter that enforces that policy across every gateway
process sharing the Redis.

Layout (under the store's prefix, beside the expert registry)::

    {prefix}keys                        hash  key id -> KeyRecord JSON (the secret's SHA-256, never the secret)
    {prefix}keys:hashes                 hash  SHA-256 of the secret -> key id
    {prefix}keys:version                int   bumped on every write; gateways poll it
    {prefix}usage:{id}                  hash  lifetime totals: requests, input_tokens, output_tokens, spend_nano
    {prefix}spend:{id}:{period}         int   nano-dollars spent in one budget period (day, ISO week, month, all)
    {prefix}rl:{id}:{r|t}:{minute}      int   requests / tokens counted in one clock minute (expire after 2)

Why SHA-256 and not a slow password hash: a key is 32 random bytes, so there is no
dictionary to guess from, and the lookup runs on every request. Spend is kept in integer
nano-dollars with ``INCRBY`` (tokens x $ per 1M tokens x 1000), so concurrent requests
in any number of processes never lose an update and no float drifts.

Limits, checked before a request in one Lua script (atomic, one round trip; the requests
that ask in the same turn of the event loop share one call, checked in order):

- ``rpm``: a sliding-window counter (this minute's count plus the previous minute's,
  weighted by how much of it still overlaps the last 60 s); an admitted request counts
  at once.
- ``tpm``: the same window over tokens; tokens are known only after the answer, so a
  request is admitted while the window is under the limit and its tokens are added
  when it completes.
- ``budget_usd`` per ``budget_period`` (UTC calendar day, ISO week, month, or ``total``):
  admitted while the period's spend is under the budget; the spend of requests in
  flight lands after them, so a budget can be overshot by what those cost.

Over ``rpm``/``tpm``: 429 with ``Retry-After`` (seconds until the window admits the
request). Over budget: 402 ``insufficient_quota`` naming when the period resets (an
OpenAI SDK retries 429s; a spent budget is not worth retrying).
"""

from __future__ import annotations

import asyncio
import calendar
import fnmatch
import functools
import hashlib
import logging
import math
import secrets
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Literal

import orjson
import redis
from pydantic import BaseModel, ConfigDict, Field, field_validator

from router_gateway.errors import BudgetExceeded, PermissionDenied, RateLimited

log = logging.getLogger(__name__)

Period = Literal["day", "week", "month", "total"]
KEY_PREFIX = "sy-"
WINDOW_S = 60


class KeyMissing(KeyError):
    """No key with that id exists."""


class KeyPolicy(BaseModel):
    """What a key may do; every field optional (None: no restriction)."""

    model_config = ConfigDict(extra="forbid")

    models: list[str] | None = Field(default=None, description="Model names or glob patterns the key may call "
                                     "(an expert's name, router:NAME, collab:NAME, auto); None: all")
    # The caps keep the limit arithmetic finite (nano-dollars in 64 bits); far above any real limit.
    budget_usd: float | None = Field(default=None, gt=0, le=1e9, description="Spend limit per budget_period, in USD")
    budget_period: Period = "month"
    rpm: int | None = Field(default=None, ge=1, le=10**12, description="Requests per minute")
    tpm: int | None = Field(default=None, ge=1, le=10**15, description="Tokens (input + output) per minute")

    @field_validator("models")
    @classmethod
    def _non_empty_names(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and any(not isinstance(m, str) or not m.strip() for m in v):
            raise ValueError("model names must be non-empty strings")
        return None if v is None else [m.strip() for m in v]

    @property
    def limited(self) -> bool:
        return self.budget_usd is not None or self.rpm is not None or self.tpm is not None


class KeyRecord(KeyPolicy):
    """One key as stored: its policy plus identity; the secret itself is never kept."""

    id: str
    name: str
    hash: str
    hint: str                      # "sy-…last4", enough to tell keys apart in a list
    created_at: float
    revoked_at: float | None = None

    def public(self) -> dict:
        return self.model_dump(exclude={"hash"})

    def check_model(self, model: str) -> None:
        """403 unless the key may call ``model`` (knobs after ``?`` are ignored)."""
        if self.models is None:
            return
        bare = model.split("?", 1)[0]
        if not any(fnmatch.fnmatchcase(bare, p) for p in self.models):
            raise PermissionDenied(f"API key '{self.name}' may not use model '{bare}' "
                                   f"(allowed: {', '.join(self.models)})", param="model", code="model_not_allowed")

    def allows(self, model: str) -> bool:
        try:
            self.check_model(model)
            return True
        except PermissionDenied:
            return False


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


# -- periods ---------------------------------------------------------------------------------
def _day(now: float) -> int:
    """The UTC day (days since the epoch) of unix time ``now``, rounded to the microsecond
    as ``datetime.fromtimestamp`` rounds it."""
    return round(now * 1_000_000) // 86_400_000_000


def period_key(period: Period, now: float) -> str:
    return _period_of_day(period, _day(now))[0]


def period_end(period: Period, now: float) -> float | None:
    """When the budget period containing ``now`` ends (None for ``total``)."""
    return _period_of_day(period, _day(now))[1]


@functools.lru_cache(maxsize=256)
def _period_of_day(period: Period, day: int) -> tuple[str, float | None]:
    """``(name, end)`` of the budget period holding UTC day ``day`` (days since the epoch;
    periods are whole UTC days, so the request path computes them once a day)."""
    t = datetime.fromtimestamp(day * 86400, timezone.utc)
    if period == "day":
        return t.strftime("%Y-%m-%d"), (t + timedelta(days=1)).timestamp()
    if period == "week":
        year, week, _ = t.isocalendar()
        return f"{year}-W{week:02d}", (t + timedelta(days=7 - t.weekday())).timestamp()
    if period == "month":
        end = t.replace(day=1) + timedelta(days=calendar.monthrange(t.year, t.month)[1])
        return t.strftime("%Y-%m"), end.timestamp()
    return "all", None


def cost_nano(input_tokens: int, output_tokens: int, input_per_mtok: float, output_per_mtok: float) -> int:
    """Nano-dollars for a request: tokens x $ per 1M tokens = micro-dollars, x 1000."""
    return round((input_tokens * input_per_mtok + output_tokens * output_per_mtok) * 1000)


# -- the store (sync: CLI and admin routes, in a thread) -------------------------------------
class KeyStore:
    def __init__(self, client: redis.Redis, prefix: str = "switchyard:"):
        self.r = client
        self.prefix = prefix
        self.k_keys = f"{prefix}keys"
        self.k_hashes = f"{prefix}keys:hashes"
        self.k_version = f"{prefix}keys:version"

    def usage_key(self, key_id: str) -> str:
        return f"{self.prefix}usage:{key_id}"

    def spend_key(self, key_id: str, period: Period, now: float) -> str:
        return f"{self.prefix}spend:{key_id}:{period_key(period, now)}"

    def window_key(self, key_id: str, kind: str, minute: int) -> str:
        return f"{self.prefix}rl:{key_id}:{kind}:{minute}"

    def create(self, name: str, policy: KeyPolicy | None = None) -> tuple[str, KeyRecord]:
        """A new key: returns (the secret, shown once; its record)."""
        if not name.strip():
            raise ValueError("a key needs a name")
        secret = new_secret()
        rec = KeyRecord(**(policy or KeyPolicy()).model_dump(), id="key-" + uuid.uuid4().hex[:12],
                        name=name.strip(), hash=hash_secret(secret), hint=f"{KEY_PREFIX}…{secret[-4:]}",
                        created_at=round(time.time(), 3))
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self.k_keys, rec.id, rec.model_dump_json())
        pipe.hset(self.k_hashes, rec.hash, rec.id)
        pipe.incr(self.k_version)
        pipe.execute()
        return secret, rec

    def get(self, key_id: str) -> KeyRecord:
        raw = self.r.hget(self.k_keys, key_id)
        if raw is None:
            raise KeyMissing(key_id)
        return KeyRecord.model_validate_json(raw)

    def by_hash(self, digest: str) -> KeyRecord | None:
        key_id = self.r.hget(self.k_hashes, digest)
        if key_id is None:
            return None
        try:
            return self.get(key_id)
        except KeyMissing:
            return None

    def list(self) -> list[KeyRecord]:
        recs = [KeyRecord.model_validate_json(v) for v in self.r.hgetall(self.k_keys).values()]
        return sorted(recs, key=lambda r: r.created_at)

    def update(self, key_id: str, changes: dict) -> KeyRecord:
        """Change a key's policy (only policy fields; validated as a whole)."""
        unknown = set(changes) - set(KeyPolicy.model_fields)
        if unknown:
            raise ValueError(f"unknown or read-only field(s): {', '.join(sorted(unknown))}")
        rec = self.get(key_id)
        new = KeyRecord.model_validate({**rec.model_dump(), **changes})
        self._put(new)
        return new

    def revoke(self, key_id: str) -> KeyRecord:
        """Revoked keys stop working at once here and within a refresh elsewhere; their
        record and spend stay for the books."""
        rec = self.get(key_id)
        if rec.revoked_at is None:
            rec = rec.model_copy(update={"revoked_at": round(time.time(), 3)})
            self._put(rec)
        return rec

    def _put(self, rec: KeyRecord) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self.k_keys, rec.id, rec.model_dump_json())
        pipe.incr(self.k_version)
        pipe.execute()

    def version(self) -> int:
        return int(self.r.get(self.k_version) or 0)

    def usage(self, rec: KeyRecord, now: float | None = None) -> dict:
        """Lifetime totals and the current budget period's spend, in USD."""
        now = time.time() if now is None else now
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(self.usage_key(rec.id))
        pipe.get(self.spend_key(rec.id, rec.budget_period, now))
        totals, period = pipe.execute()
        return {"requests": int(totals.get("requests", 0)), "input_tokens": int(totals.get("input_tokens", 0)),
                "output_tokens": int(totals.get("output_tokens", 0)),
                "spend_usd": int(totals.get("spend_nano", 0)) / 1e9,
                "period": period_key(rec.budget_period, now), "period_spend_usd": int(period or 0) / 1e9}


# -- the limiter (async: the request path) ---------------------------------------------------
_CHECK = """
-- Checks, in order, of the requests of one batch: for request i (0-based),
-- KEYS[5i+1..5i+5]: requests prev/cur window, tokens prev/cur window, period spend;
-- ARGV[4i+1..4i+4]: rpm, tpm, budget (nano; < 0: none), seconds into the current window.
-- Returns {verdict, wait, verdict, wait, ...}: 0 admitted (and counted), 1 over rpm,
-- 2 over budget, 3 over tpm; wait = seconds until the window admits it (a string).
local function wait(prev, cur, limit, elapsed)
  -- seconds until prev * (1 - x/60) + cur <= limit, x = seconds into a window
  if cur <= limit then
    return 60 * (1 - (limit - cur) / prev) - elapsed
  end
  return (60 - elapsed) + 60 * (1 - limit / cur)
end
local function over(k_prev, k_cur, limit, elapsed)
  -- nil when one more fits the window, else the seconds to wait
  local prev = tonumber(redis.call('GET', k_prev) or '0')
  local cur = tonumber(redis.call('GET', k_cur) or '0')
  if prev * (1 - elapsed / 60) + cur + 1 > limit then return tostring(wait(prev, cur + 1, limit, elapsed)) end
  return nil
end
local function check(k, a)
  local elapsed = tonumber(ARGV[a + 4])
  local budget = tonumber(ARGV[a + 3])
  if budget >= 0 then
    if tonumber(redis.call('GET', KEYS[k + 5]) or '0') >= budget then return 2, 0 end
  end
  local tpm = tonumber(ARGV[a + 2])
  if tpm > 0 then
    local w = over(KEYS[k + 3], KEYS[k + 4], tpm, elapsed)
    if w then return 3, w end
  end
  local rpm = tonumber(ARGV[a + 1])
  if rpm > 0 then
    local w = over(KEYS[k + 1], KEYS[k + 2], rpm, elapsed)
    if w then return 1, w end
    redis.call('INCR', KEYS[k + 2])
    redis.call('EXPIRE', KEYS[k + 2], 120)
  end
  return 0, 0
end
local out = {}
for i = 0, #ARGV / 4 - 1 do
  local verdict, w = check(5 * i, 4 * i)
  out[2 * i + 1] = verdict
  out[2 * i + 2] = w
end
return out
"""
MAX_CHECKS = 256   # requests per check script call (5 keys and 4 arguments each)


class Limiter:
    """Admits requests against a key's limits and books what they used, in Redis."""

    def __init__(self, store: KeyStore, aclient, clock=time.time, batch_s: float = 0.02):
        self.store = store
        self.r = aclient                  # redis.asyncio client on the same server as ``store``
        self.clock = clock
        self._check = aclient.register_script(_CHECK)
        self.batch_s = batch_s
        self._batch: list[tuple[KeyRecord, int, int, int, int, float]] = []
        self._flusher: asyncio.Task | None = None
        self._admits: list[tuple[KeyRecord, float, asyncio.Future]] = []
        self._checking: set[asyncio.Task] = set()

    def _windows(self, key_id: str, now: float) -> tuple[list[str], float]:
        minute = int(now // WINDOW_S)
        keys = [self.store.window_key(key_id, kind, m) for kind in ("r", "t") for m in (minute - 1, minute)]
        return keys, now - minute * WINDOW_S

    async def admit(self, rec: KeyRecord) -> None:
        """Raise ``RateLimited`` (429) or ``BudgetExceeded`` (402), else count the request.

        The requests that ask during one turn of the event loop are checked together, in
        the order they asked, by one call of the check script (atomic, one round trip):
        at saturation that is one Redis call for many requests instead of one each."""
        if not rec.limited:
            return
        now = self.clock()
        loop = asyncio.get_running_loop()
        answer = loop.create_future()
        self._admits.append((rec, now, answer))
        if len(self._admits) == 1:
            loop.call_soon(self._check_admits)
        verdict, wait = await answer
        if verdict == 0:
            return
        if verdict == 2:
            end = period_end(rec.budget_period, now)
            when = ("" if end is None else
                    f"; it resets at {datetime.fromtimestamp(end, timezone.utc):%Y-%m-%d %H:%M} UTC")
            raise BudgetExceeded(f"API key '{rec.name}' has spent its budget of ${rec.budget_usd:g} "
                                 f"for this {rec.budget_period if rec.budget_period != 'total' else 'key'}{when}",
                                 code="budget_exceeded")
        retry = max(1, math.ceil(float(wait)))
        what = f"{rec.rpm} requests" if verdict == 1 else f"{rec.tpm} tokens"
        raise RateLimited(f"API key '{rec.name}' is over its limit of {what} per minute; retry in {retry} s",
                          code="rate_limit_exceeded", headers={"retry-after": str(retry)})

    def _check_admits(self) -> None:
        """Send the waiting admissions to Redis, ``MAX_CHECKS`` per script call."""
        admits, self._admits = self._admits, []
        loop = asyncio.get_running_loop()
        for start in range(0, len(admits), MAX_CHECKS):
            task = loop.create_task(self._check_many(admits[start:start + MAX_CHECKS]))
            self._checking.add(task)
            task.add_done_callback(self._checking.discard)

    async def _check_many(self, admits: list[tuple[KeyRecord, float, asyncio.Future]]) -> None:
        keys: list[str] = []
        args: list = []
        for rec, now, _ in admits:
            windows, elapsed = self._windows(rec.id, now)
            keys += windows
            keys.append(self.store.spend_key(rec.id, rec.budget_period, now))
            args += (rec.rpm or 0, rec.tpm or 0, -1 if rec.budget_usd is None else round(rec.budget_usd * 1e9),
                     f"{elapsed:.3f}")
        try:
            reply = await self._check(keys=keys, args=args)
        except (redis.RedisError, OSError) as exc:
            # Degraded on purpose: without Redis, limits and budgets cannot be shared, so
            # they are not enforced; the key itself was checked against the cached keys.
            log.warning("limits of %d request(s) not checked, the store is unreachable: %s", len(admits), exc)
            reply = [0, 0] * len(admits)
        except BaseException as exc:   # cancelled (shutdown) or a bug: the waiting requests end too
            for _, _, answer in admits:
                if not answer.done():
                    if isinstance(exc, Exception):
                        answer.set_exception(exc)
                    else:
                        answer.cancel()
            raise
        for i, (_, _, answer) in enumerate(admits):
            if not answer.done():   # a request whose client left is no longer waiting
                answer.set_result((int(reply[2 * i]), reply[2 * i + 1]))

    async def record(self, rec: KeyRecord, input_tokens: int, output_tokens: int, nano: int,
                     requests: int = 1) -> None:
        """Book one finished answer at once (``book`` batches them); see ``_record_many``."""
        await self._record_many([(rec, input_tokens, output_tokens, nano, requests, self.clock())])

    async def _record_many(self, bookings: list[tuple[KeyRecord, int, int, int, int, float]]) -> None:
        """Book finished answers: tokens into their minute windows, spend into the budget
        periods and the lifetime totals (``requests``: 0 for a recruited expert's answer,
        part of its client request); summed per key and window, one atomic transaction."""
        windows: dict[str, int] = {}
        spends: dict[str, list] = {}
        totals: dict[str, list[int]] = {}
        for rec, p, c, nano, requests, now in bookings:
            if rec.tpm is not None and p + c:
                win = self.store.window_key(rec.id, "t", int(now // WINDOW_S))
                windows[win] = windows.get(win, 0) + p + c
            spend = self.store.spend_key(rec.id, rec.budget_period, now)
            spends.setdefault(spend, [0, period_end(rec.budget_period, now)])[0] += nano
            t = totals.setdefault(self.store.usage_key(rec.id), [0, 0, 0, 0])
            t[0] += requests
            t[1] += p
            t[2] += c
            t[3] += nano
        pipe = self.r.pipeline(transaction=True)
        for win, tokens in windows.items():
            pipe.incrby(win, tokens)
            pipe.expire(win, 120)
        for spend, (nano, end) in spends.items():
            pipe.incrby(spend, nano)
            if end is not None:
                pipe.expireat(spend, int(end) + 7 * 86400)   # kept a week past the period for reports
        for usage, (requests, p, c, nano) in totals.items():
            if requests:
                pipe.hincrby(usage, "requests", requests)
            pipe.hincrby(usage, "input_tokens", p)
            pipe.hincrby(usage, "output_tokens", c)
            pipe.hincrby(usage, "spend_nano", nano)
        await pipe.execute()

    def book(self, rec: KeyRecord, usage: tuple[int, int], input_per_mtok: float,
             output_per_mtok: float, final: bool = True) -> None:
        """Book a finished answer in the background (the answer does not wait on Redis);
        ``final``: the answer the client gets (a recruited expert's is not). Bookings
        made within ``batch_s`` of each other go to Redis in one transaction."""
        p, c = usage
        self._batch.append((rec, p, c, cost_nano(p, c, input_per_mtok, output_per_mtok), int(final), self.clock()))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_soon())

    def meter(self, rec: KeyRecord):
        """The ``Dispatcher`` meter for requests made with ``rec``: books each answer at the
        answering expert's prices."""
        return lambda spec, usage, final=True: self.book(rec, usage, spec.input_price_per_mtok,
                                                         spec.output_price_per_mtok, final)

    async def _flush_soon(self) -> None:
        await asyncio.sleep(self.batch_s)
        while self._batch:
            batch, self._batch = self._batch, []
            try:
                await self._record_many(batch)
            except Exception as exc:  # Redis down: the answers went out; the books miss these
                spent = sum(b[3] for b in batch)
                log.error("could not record the usage of %d answers (%d nano-USD): %s", len(batch), spent, exc)

    @property
    def busy(self) -> bool:
        """Bookings not yet written."""
        return bool(self._batch) or (self._flusher is not None and not self._flusher.done())

    async def drain(self) -> None:
        """Wait for the bookings in flight (shutdown, tests)."""
        while self._flusher is not None and not self._flusher.done():
            await asyncio.gather(self._flusher, return_exceptions=True)


def usage_from(obj: object) -> tuple[int, int] | None:
    """(prompt, completion) tokens from an OpenAI ``usage`` object, or None (then the caller
    estimates them) where they are not two non-negative integers. An embeddings answer's
    usage has no ``completion_tokens`` and a ``total_tokens`` equal to its prompt's; a
    Responses API answer's says ``input_tokens`` and ``output_tokens``."""
    if not isinstance(obj, dict):
        return None
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        return None
    p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if p is None and "input_tokens" in usage:   # the Responses API's names
        p, c = usage.get("input_tokens"), usage.get("output_tokens")
    elif "completion_tokens" not in usage and usage.get("total_tokens") == p:
        c = 0
    # bool is an int subclass; a negative count would credit a budget back
    if type(p) is not int or type(c) is not int or p < 0 or c < 0:
        return None
    return p, c


CHARS_PER_TOKEN = 4  # tokens are estimated from characters; no tokenizer on the hot path


def _chars(x: object) -> int:
    """Characters of text in a prompt, message list or content parts."""
    if isinstance(x, str):
        return len(x)
    if isinstance(x, list):
        return sum(_chars(i) for i in x)
    if isinstance(x, dict):
        return _chars(x.get("content")) + _chars(x.get("text"))
    return 0


def estimate_usage(body: dict, completion_chars: int) -> tuple[int, int]:
    """(prompt, completion) tokens at ``CHARS_PER_TOKEN`` characters a token, for answers
    whose upstream reports no usage, so that they are not free against a budget."""
    prompt = (_chars(body.get("messages")) + _chars(body.get("prompt")) + _chars(body.get("input"))
              + _chars(body.get("instructions")))
    return -(-prompt // CHARS_PER_TOKEN), -(-completion_chars // CHARS_PER_TOKEN)


def decode_usage(content: bytes) -> tuple[int, int] | None:
    try:
        return usage_from(orjson.loads(content))
    except orjson.JSONDecodeError:
        return None
