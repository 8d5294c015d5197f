"""The gateway's in-memory view of the registry, so the hot path never waits on Redis.

A background task polls ``experts:version`` every ``refresh_s``, reloads the experts
when it changed, and re-reads health; a second task probes each expert's upstream and
writes health back to the store (shared by every gateway process on that Redis).
Writes made through this process's admin API refresh the view at once.
"""

from __future__ import annotations

import asyncio
import logging
import time

import anyio

from expert_registry.http1 import HTTP1Client, HTTPClientError, LocalResourcesExhausted, PoolExhausted
from expert_registry.spec import ExpertSpec
from expert_registry.store import ExpertStore, HealthRecord

log = logging.getLogger(__name__)


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

    def _load(self) -> None:
        version = self.store.version()
        if version != self._version:
            self.experts = {s.name: s for s in self.store.list()}
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


async def probe_all(view: RegistryView, client: HTTP1Client) -> dict[str, tuple[bool, str | None]]:
    specs = list(view.experts.values())
    results = await asyncio.gather(*(probe(client, s) for s in specs))
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
