"""The gateway's in-memory view of the registry, so the hot path never waits on Redis.

A background task polls ``experts:version`` every ``refresh_s``, reloads the experts
when it changed, and re-reads health; a second task probes each expert's upstream and
writes health back to the store (shared by every gateway process on that Redis).
Writes made through this process's admin API refresh the view at once.

An expert with ``replicas`` is probed at every URL; it is healthy while one of them is.
Which replica a request tries first is :class:`Replicas`' call, in each process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

import anyio

from expert_registry.http1 import HTTP1Client, HTTPClientError, LocalResourcesExhausted, PoolExhausted
from expert_registry.spec import ExpertSpec
from expert_registry.store import ExpertStore, HealthRecord

log = logging.getLogger(__name__)


class Replicas:
    """The order in which a request tries an expert's URLs (``ExpertSpec.endpoints``).

    This process's own judgement, not shared through Redis (the expert's cooldown is):
    a replica that failed a call goes last for ``eject_s`` seconds (or the Retry-After it
    sent), one that failed its health probe until a probe passes. Among the rest, the
    one with the fewest requests in flight from this process goes first, ties in turn,
    so that long generations do not pile up on one replica."""

    def __init__(self, eject_s: float = 30.0):
        self.eject_s = eject_s
        self.failed_until: dict[str, float] = {}   # base URL -> time.monotonic() it is tried first again
        self.probe_down: set[str] = set()
        self._turn = 0
        self._endpoints: dict[str, tuple[ExpertSpec, ...]] = {}   # expert name -> its URLs, when it has replicas

    def load(self, experts: dict[str, ExpertSpec]) -> None:
        """Build the endpoints of the experts with replicas, once per registry load."""
        self._endpoints = {name: s.endpoints() for name, s in experts.items() if s.replicas}

    def endpoints(self, spec: ExpertSpec) -> tuple[ExpertSpec, ...]:
        """``spec.endpoints()``, as built at the last registry load."""
        found = self._endpoints.get(spec.name)
        return found if found is not None else spec.endpoints()

    def order(self, spec: ExpertSpec, in_flight: Callable[[str], int]) -> list[tuple[int, ExpertSpec]]:
        """``(i, endpoint)`` pairs, best first; ``i`` is the endpoint's place in
        ``spec.endpoints()`` (0: ``base_url``)."""
        endpoints = self.endpoints(spec)
        n = len(endpoints)
        if n == 1:
            return [(0, spec)]
        self._turn += 1
        now = time.monotonic()
        turn = [((i + self._turn) % n, endpoints[(i + self._turn) % n]) for i in range(n)]
        return sorted(turn, key=lambda p: (self.is_out(p[1].base_url, now), in_flight(p[1].base_url)))

    def is_out(self, url: str, now: float | None = None) -> bool:
        return url in self.probe_down or self.failed_until.get(url, 0.0) > (time.monotonic() if now is None else now)

    def failed(self, endpoint: ExpertSpec, seconds: float | None = None) -> None:
        self.failed_until[endpoint.base_url] = time.monotonic() + (self.eject_s if seconds is None else seconds)

    def probed(self, endpoint: ExpertSpec, healthy: bool, error: str | None) -> None:
        url = endpoint.base_url
        if healthy:
            self.probe_down.discard(url)
        elif url not in self.probe_down:
            self.probe_down.add(url)
            log.warning("expert %s: replica %s failed its health probe: %s", endpoint.name, url, error)


class RegistryView:
    def __init__(self, store: ExpertStore, refresh_s: float = 1.0):
        self.store = store
        self.refresh_s = refresh_s
        self.experts: dict[str, ExpertSpec] = {}
        self.health: dict[str, HealthRecord] = {}
        self._version = -1
        self.last_refresh = 0.0
        self.store_error: str | None = None
        self.probing = False   # set when a health loop runs (cooldowns then end through a probe)
        self.replicas = Replicas()

    def _load(self) -> None:
        version = self.store.version()
        if version != self._version:
            self.experts = {s.name: s for s in self.store.list()}
            self.replicas.load(self.experts)
            self._version = version
        self.health = self.store.health()
        self.last_refresh = time.time()

    async def refresh(self) -> None:
        try:
            await anyio.to_thread.run_sync(self._load)
            self.store_error = None
        except Exception as exc:  # keep serving the last good view when Redis hiccups
            if self.store_error is None:
                log.warning("registry refresh failed, serving the last view: %s", exc)
            self.store_error = str(exc)

    async def run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.refresh_s)

    def is_unhealthy(self, name: str) -> HealthRecord | None:
        """The record that keeps ``name`` out of rotation: failed its last probe, or in a
        cooldown. A cooldown that has run out ends with the next good probe, or by itself
        when this gateway does not probe (``health_interval_s <= 0``)."""
        rec = self.health.get(name)
        if rec is None or rec.healthy:
            return None
        if rec.until is not None and rec.until <= time.time() and not self.probing:
            return None
        return rec

    def cooled(self, name: str, rec: HealthRecord) -> None:
        """A cooldown this process started: in effect here at once, elsewhere at their next refresh."""
        self.health[name] = rec


def health_url(spec: ExpertSpec) -> str | None:
    """Where to probe an expert: vLLM's /health, or /models for other OpenAI servers."""
    if spec.base_url is None:
        return None
    if spec.backend in ("vllm", "collab"):
        root = spec.base_url[:-3] if spec.base_url.endswith("/v1") else spec.base_url
        return root + "/health"
    if spec.backend == "openai":
        return spec.base_url + "/models"
    return None  # litellm providers: no cheap probe; judged by their answers


async def probe(client: HTTP1Client, spec: ExpertSpec, timeout_s: float = 3.0) -> tuple[bool, str | None] | None:
    """(healthy, why not); None when this process could not even open a socket (out of
    descriptors) or every connection to the expert's origin is busy with requests (the
    probe shares their pool): that says nothing about the expert."""
    url = health_url(spec)
    if url is None:
        return True, None
    headers = {"authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
    try:
        resp = await client.request("GET", url, headers=headers, read_timeout=timeout_s)
        await resp.read()
    except (LocalResourcesExhausted, PoolExhausted):
        return None
    except HTTPClientError as exc:
        return False, f"{type(exc).__name__} from {url}: {exc}"
    if resp.status >= 400:
        return False, f"HTTP {resp.status} from {url}"
    return True, None


async def probe_replicas(client: HTTP1Client, spec: ExpertSpec, replicas: Replicas) -> tuple[bool, str | None] | None:
    """:func:`probe` at every URL of ``spec``: healthy while one replica is, else why each
    is not; each replica's verdict also goes to ``replicas``."""
    if not spec.replicas:
        return await probe(client, spec)
    endpoints = replicas.endpoints(spec)
    results = await asyncio.gather(*(probe(client, e) for e in endpoints))
    known = [(e, r) for e, r in zip(endpoints, results) if r is not None]
    for e, (ok, err) in known:
        replicas.probed(e, ok, err)
    if not known:
        return None
    if any(ok for _, (ok, _) in known):
        return True, None
    return False, "every replica failed: " + "; ".join(str(err) for _, (_, err) in known)


async def probe_all(view: RegistryView, client: HTTP1Client) -> dict[str, tuple[bool, str | None]]:
    specs = list(view.experts.values())
    results = await asyncio.gather(*(probe_replicas(client, s, view.replicas) for s in specs))
    out = {s.name: r for s, r in zip(specs, results) if r is not None}

    def write() -> list[str]:
        return [name for name, (ok, err) in out.items() if view.store.set_health(name, ok, err)]

    written = await anyio.to_thread.run_sync(write)   # not over a running cooldown
    view.health.update({n: HealthRecord(out[n][0], time.time(), out[n][1]) for n in written})
    return out


async def health_loop(view: RegistryView, client: HTTP1Client, interval_s: float) -> None:
    view.probing = True
    while True:
        try:
            await probe_all(view, client)
        except Exception as exc:  # a probe round must never kill the loop
            log.warning("health probe round failed: %s", exc)
        await asyncio.sleep(interval_s)


async def probe_all_once(store: ExpertStore) -> dict[str, tuple[bool, str | None]]:
    """One probe round outside a running gateway (the CLI's `experts health`)."""
    view = RegistryView(store)
    await view.refresh()
    client = HTTP1Client(connect_timeout=3.0, read_timeout=3.0)
    try:
        return await probe_all(view, client)
    finally:
        await client.aclose()
