"""OpenAI's Responses API through the gateway: where each stored response lives.

``POST /v1/responses`` is proxied like a chat completion (``app._proxy``): an expert's
name dispatches to it, ``router:...`` and ``auto`` route on the ``input`` text, keys,
limits and budgets apply, and the answer comes back with ``model`` rewritten. What the
other endpoints do not have is state. A response the upstream stores (``store`` not
false) lives on the one server that made it, and clients continue a conversation by
sending its id back (``previous_response_id``) or fetch it later (``GET
/v1/responses/{id}``). So for each answer the gateway remembers, in Redis under
``{prefix}resp:ID`` for ``responses_ttl_s`` seconds:

- the expert and the URL (which replica) that answered;
- who asked (the API key's id): for any other caller the id does not exist, even
  when it names the expert that holds it;
- the model name the client asked for (``auto``, a router...), put back in ``model``.

A continuation goes to that expert at that URL, with no routing and no fallback (no
other server holds the conversation), unless the client names another expert, which is
then asked as named. A ``previous_response_id`` the gateway does not know is a 404
``previous_response_not_found`` for a routed request; a named expert is asked anyway (the
response may have been made there directly) and its answer passes through. If Redis
cannot be read, the request goes on as if it carried no known id.

The pin is written before the client sees the id: before a plain answer is returned,
and before the streamed ``response.created`` event is sent.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import orjson

from router_gateway.resp import Batcher, command, mget, roundtrip

log = logging.getLogger(__name__)

TIMEOUT_S = 1.0   # the longest a request waits on Redis for a pin (then goes on without it)


@dataclass(frozen=True)
class Pin:
    expert: str
    url: str | None   # the base URL that answered (one replica of the expert)
    caller: str       # the API key id that asked ("" on an open gateway)
    model: str        # what the client had in ``model``


class PinStoreError(Exception):
    """Redis could not be read; the caller goes on without the pin."""


class ResponsePins:
    """Pins in Redis. The reads of one event-loop turn go out as one ``MGET`` and the
    writes as one pipelined batch of ``SET PX``, each packed by hand (``resp.py``): at
    64 concurrent requests, one redis-py command per request had cost the gateway 45% of
    its requests per second, batched 20% (benchmarks/README.md, "Responses API")."""

    def __init__(self, aredis: Any, prefix: str, ttl_s: float):
        self.aredis = aredis
        self.prefix = prefix
        self.ttl_ms = int(ttl_s * 1000)
        self._reads = Batcher(lambda keys: mget(self.aredis, keys, TIMEOUT_S))
        self._writes = Batcher(self._set)

    @property
    def enabled(self) -> bool:
        return self.ttl_ms > 0

    def key(self, response_id: str) -> str:
        return f"{self.prefix}resp:{response_id}"

    async def keep(self, response_id: str, pin: Pin) -> None:
        """Remember ``pin`` for ``response_id``. A failure (or a second without an answer)
        is logged, never the client's error: the answer is good, only a later
        continuation will not find its server."""
        value = orjson.dumps({"e": pin.expert, "u": pin.url, "c": pin.caller, "m": pin.model})
        try:
            await self._writes.call((self.key(response_id), value))
        except Exception as exc:
            log.warning("could not remember where response %s is stored: %s", response_id,
                        exc or type(exc).__name__)

    async def find(self, response_id: str) -> Pin | None:
        """The pin of ``response_id``, whoever made it (the caller checks ``Pin.caller``),
        else None. Raises ``PinStoreError`` when Redis fails or takes over a second."""
        try:
            raw = await self._reads.call(self.key(response_id))
        except Exception as exc:
            raise PinStoreError(str(exc) or type(exc).__name__) from exc
        if raw is None:
            return None
        try:
            d = orjson.loads(raw)
            pin = Pin(str(d["e"]), d["u"], str(d["c"]), str(d["m"]))
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.warning("unreadable pin for response %s: %r", response_id, raw[:200])
            return None
        return pin

    async def forget(self, response_id: str) -> None:
        try:
            await self.aredis.delete(self.key(response_id))
        except Exception as exc:
            log.warning("could not forget response %s: %s", response_id, exc)

    async def _set(self, items: list[tuple[str, bytes]]) -> list[Any]:
        ttl = str(self.ttl_ms)
        payload = b"".join(command("SET", key, value, "PX", ttl) for key, value in items)
        async with asyncio.timeout(TIMEOUT_S):
            return await roundtrip(self.aredis, payload, len(items))
