"""Caps on requests in flight per expert (``ExpertSpec.max_concurrency``), shared in Redis
by every process of every gateway on it.

A request takes a place, a lease in the expert's sorted set ``{prefix}inflight:{expert}``
(member: this process's id and a counter; score: when the lease lapses, on Redis's clock),
and gives it back when its answer has been read or its stream relayed or left. A process
renews the leases it holds every third of ``lease_s``, so the places of a process that
died or hangs come free within ``lease_s``; a take that finds the cap reached first drops
the lapsed leases.

The takes of one event-loop turn go to Redis together, with the give-backs made since the
last call before them, as one call of one script (one round trip, atomic): a place given
back is free for a take that comes after it. A give-back waits at most ``LINGER_S`` for
a take to travel with, unless its place was taken with over half the cap held: then it
goes at once, as another process may be waiting for it. Experts without a cap never
reach this module.

Without Redis (unreachable, or an error) each process counts its own requests against the
cap, as if it were the only one (asking the store again after ``RETRY_S``), and says so
in the log once per outage; the places it took in Redis before lapse by themselves. When
the store answers again, the places taken meanwhile that are still held go into it as
leases, so that every process counts them until they are given back.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import os
import secrets
import socket
import time
from typing import Any, AsyncIterator, Callable, Iterable

import redis

from expert_registry.spec import ExpertSpec
from router_gateway.resp import bulk, command, roundtrip

log = logging.getLogger(__name__)

# KEYS[i]: the sorted set of op i. ARGV[1]: lease in ms; then per op three arguments:
# kind ('t' take, 'r' give back, 'n' renew), member, cap (takes only).
# Replies: per op 1 (given back, renewed); for a take the places now held (taken) or 0 (at the cap).
# A set's count is read once per call and then kept up to date here, and its expiry set
# once: a call carries a few dozen ops at load, most of them on the same few sets.
_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
local out, held, touched = {}, {}, {}
for i = 1, #KEYS do
  local key, kind, member = KEYS[i], ARGV[3 * i - 1], ARGV[3 * i]
  local n = held[key]
  out[i] = 1
  if kind == 'r' then
    local gone = redis.call('ZREM', key, member)
    if n then held[key] = n - gone end
  else
    if kind == 't' then
      local cap = tonumber(ARGV[3 * i + 1])
      n = n or redis.call('ZCARD', key)
      if n >= cap then   -- lapsed leases matter only at the cap
        redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
        n = redis.call('ZCARD', key)
      end
      out[i] = n < cap and n + 1 or 0
      held[key] = n
    end
    if out[i] > 0 then
      local added = redis.call('ZADD', key, now + lease, member)
      if held[key] then held[key] = held[key] + added end
      touched[key] = true
    end
  end
end
for key in pairs(touched) do redis.call('PEXPIRE', key, 2 * lease) end
return out
"""
_SHA = hashlib.sha1(_SCRIPT.encode()).hexdigest()
_CALL_HEAD = bulk("EVALSHA") + bulk(_SHA)
# KEYS: sorted sets; replies: the leases in each that have not lapsed.
_COUNT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i = 1, #KEYS do out[i] = redis.call('ZCOUNT', KEYS[i], '(' .. now, '+inf') end
return out
"""
MAX_OPS = 512      # ops per script call
LINGER_S = 0.01   # at most this long a give-back waits for a take to travel with
TIMEOUT_S = 1.0    # for one script call; past it the takes waiting on it count in this process
RETRY_S = 1.0      # after the store failed, takes count in this process this long before asking it again


def capped(specs: Iterable[ExpertSpec]) -> list[str]:
    """The names of the experts with a ``max_concurrency``."""
    return [s.name for s in specs if s.max_concurrency is not None]


def held_now(client: Any, prefix: str, specs: Iterable[ExpertSpec]) -> dict[str, int]:
    """Places held now per expert with a cap, across the gateway, read with a
    synchronous ``redis`` client (for the CLI)."""
    experts = capped(specs)
    if not experts:
        return {}
    reply = client.eval(_COUNT, len(experts), *(f"{prefix}inflight:{e}" for e in experts))
    return {e: int(n) for e, n in zip(experts, reply)}


class Place:
    """A place held under an expert's cap; calling it gives the place back (once)."""

    __slots__ = ("slots", "expert", "member", "crowded")

    def __init__(self, slots: "Slots", expert: str, member: str, crowded: bool = False):
        self.slots, self.expert, self.member = slots, expert, member
        self.crowded = crowded   # over half the cap was held with it: give it back without lingering

    def __call__(self) -> None:
        slots = self.slots
        if slots is None:
            return
        self.slots = None
        slots.local[self.expert] -= 1
        if slots.held.pop(self.member, None) is not None:
            slots._queue("r", slots.key(self.expert), self.member, 0, None, self.crowded)
        else:
            slots.unseen.pop(self.member, None)


class Slots:
    """Places under the experts' ``max_concurrency``, counted gateway-wide in Redis when
    ``aclient`` (a ``redis.asyncio`` client) is given, else in this process."""

    def __init__(self, aclient: Any | None, prefix: str = "switchyard:", lease_s: float = 30.0):
        self.prefix = prefix
        self.lease_s = lease_s
        self.r = aclient
        self._id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}:"
        self._seq = itertools.count()
        self._packed_keys: dict[str, bytes] = {}   # a sorted set's name as a bulk string
        self._packed_lease = bulk(str(round(lease_s * 1000)))
        self.held: dict[str, str] = {}    # member -> its sorted set: the leases this process holds in Redis
        self.local: dict[str, int] = {}   # places this process holds, per expert
        self.unseen: dict[str, str] = {}  # member -> its sorted set: places taken while the store failed
        self._ops: list[tuple[str, str, str, int, asyncio.Future | None]] = []
        self._sending: set[asyncio.Task] = set()
        self._soon = False                              # a flush is due at the end of this turn
        self._later: asyncio.TimerHandle | None = None  # one is due in LINGER_S
        self._outage = False
        self._retry_at = 0.0   # during an outage, when to ask the store again

    def key(self, expert: str) -> str:
        return f"{self.prefix}inflight:{expert}"   # as held_now() reads it

    async def take(self, expert: str, limit: int) -> Callable[[], None] | None:
        """A place for one request to ``expert`` (call it to give the place back), or None
        when ``limit`` requests hold one already."""
        if self.r is not None and (not self._outage or time.monotonic() >= self._retry_at):
            member = f"{self._id}{next(self._seq)}"
            answer = asyncio.get_running_loop().create_future()
            self._queue("t", self.key(expert), member, limit, answer)
            try:
                taken = await answer
            except (redis.RedisError, OSError) as exc:
                self._down(exc)
            else:
                self._up()
                if not taken:
                    return None
                self.held[member] = self.key(expert)
                return self._hold(expert, member, 2 * taken > limit)
        if self.local.get(expert, 0) >= limit:
            return None
        member = f"{self._id}{next(self._seq)}"
        if self.r is not None:   # the store failed: it hears of this place once it answers again
            self.unseen[member] = self.key(expert)
        return self._hold(expert, member)

    def _hold(self, expert: str, member: str, crowded: bool = False) -> Place:
        self.local[expert] = self.local.get(expert, 0) + 1
        return Place(self, expert, member, crowded)

    def _queue(self, kind: str, key: str, member: str, limit: int, answer: asyncio.Future | None,
               now: bool = True) -> None:
        """A take (or ``now``) goes out at the end of this turn; a give-back or renewal
        with the next take of this process (before it, so the take sees the place free),
        or on its own after ``LINGER_S`` when no take comes: at load one round trip serves
        both. A place taken when over half the cap was held goes back at once, as another
        process may be waiting for it."""
        self._ops.append((kind, key, member, limit, answer))
        if answer is not None or now:
            if not self._soon:
                self._soon = True
                asyncio.get_running_loop().call_soon(self._flush)
        elif self._later is None and not self._soon:
            self._later = asyncio.get_running_loop().call_later(LINGER_S, self._flush)

    def _flush(self) -> None:
        self._soon = False
        if self._later is not None:
            self._later.cancel()
            self._later = None
        ops, self._ops = self._ops, []
        for start in range(0, len(ops), MAX_OPS):
            task = asyncio.ensure_future(self._send(ops[start:start + MAX_OPS]))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, ops: list[tuple[str, str, str, int, asyncio.Future | None]]) -> None:
        call = self._pack(ops)
        try:
            async with asyncio.timeout(TIMEOUT_S):
                try:
                    [reply] = await roundtrip(self.r, call, 1)
                except redis.exceptions.NoScriptError:   # a new or flushed server: load it, once
                    _, reply = await roundtrip(self.r, command("SCRIPT", "LOAD", _SCRIPT) + call, 2)
        except BaseException as exc:   # the store failed (or a bug, or shutdown): the takes hear of it
            for *_, answer in ops:
                if answer is not None and not answer.done():
                    answer.set_exception(exc if isinstance(exc, Exception) else asyncio.CancelledError())
            if not isinstance(exc, (redis.RedisError, OSError)):
                raise
            if not any(op[4] is not None for op in ops):   # no take to report it: say it here
                self._down(exc)
            return
        for (kind, key, member, _, answer), taken in zip(ops, reply):
            if answer is None:
                continue
            if not answer.done():
                answer.set_result(int(taken))   # the places held with it, 0 when none was free
            elif taken:   # its request went away meanwhile: the place goes back at once
                self._queue("r", key, member, 0, None)

    def _pack(self, ops: list[tuple[str, str, str, int, asyncio.Future | None]]) -> bytes:
        """The script call for ``ops``, packed: what ``command("EVALSHA", ...)`` would
        give, in a few formatting steps per op instead of four ``bulk`` calls."""
        keys = self._packed_keys
        parts = [b"*%d\r\n%s$%d\r\n%d\r\n" % (4 + 4 * len(ops), _CALL_HEAD, len(str(len(ops))), len(ops))]
        for _, key, *_ in ops:
            packed = keys.get(key)
            if packed is None:
                packed = keys[key] = bulk(key)
            parts.append(packed)
        parts.append(self._packed_lease)
        for kind, _, member, limit, _ in ops:
            m, limit_s = member.encode(), b"%d" % limit
            parts.append(b"$1\r\n%s\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (kind.encode(), len(m), m, len(limit_s), limit_s))
        return b"".join(parts)

    @contextlib.asynccontextmanager
    async def place(self, spec: ExpertSpec) -> AsyncIterator[bool]:
        """A place for one call to ``spec`` for the length of the block: True when it has
        one (always, without a cap), False when its cap is reached."""
        if spec.max_concurrency is None:
            yield True
            return
        release = await self.take(spec.name, spec.max_concurrency)
        if release is None:
            yield False
            return
        try:
            yield True
        finally:
            release()

    async def counts(self, experts: list[str]) -> dict[str, int]:
        """Places held now per expert (see :func:`capped`): across the gateway, or in this
        process when the store does not answer (for the metrics and the API)."""
        if self.r is not None and experts:
            try:
                async with asyncio.timeout(TIMEOUT_S):
                    reply = await self.r.eval(_COUNT, len(experts), *(self.key(e) for e in experts))
                return {e: int(n) for e, n in zip(experts, reply)}
            except (redis.RedisError, OSError) as exc:
                log.debug("places in flight not read from the store: %s", exc)
        return {e: self.local.get(e, 0) for e in experts}

    async def run(self) -> None:
        """Renew this process's leases every third of ``lease_s``, until cancelled."""
        if self.r is None:
            return
        while True:
            await asyncio.sleep(self.lease_s / 3)
            for member, key in list(self.held.items()):
                self._queue("n", key, member, 0, None, False)

    async def drain(self) -> None:
        """Send what waits (the places given back at shutdown) and wait for it."""
        self._flush()
        while self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)

    def _down(self, exc: BaseException) -> None:
        self._retry_at = time.monotonic() + RETRY_S
        if not self._outage:
            self._outage = True
            log.warning("max_concurrency is counted per gateway process while the store is unreachable: %s", exc)

    def _up(self) -> None:
        if self._outage:
            self._outage = False
            log.warning("max_concurrency is counted across the gateway again (the store answers)")
            for member, key in self.unseen.items():   # still held: from now on every process counts them
                self.held[member] = key
                self._queue("n", key, member, 0, None)
            self.unseen.clear()
