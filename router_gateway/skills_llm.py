"""Skills of a query from an expert LLM (Symbolic-MoE's way), cached in Redis.

A router deployment with ``skills_expert`` set asks that registered expert to list the
query's skills before scoring (``router_models.symbolic.skill_prompt`` /
``parse_skill_list``). Answers are cached by (expert, query text)::

    {prefix}skills:{expert}:{sha1(text)}   string  JSON list of skill words, 30-day TTL

so a repeated query costs one Redis read. An expert with replicas is asked at them in
the order the gateway's requests take them, the next after one that fails. Any failure (the expert unknown or unhealthy,
a timeout, an HTTP error, an answer with no skill in it, Redis down) returns ``None``
with the reason, and the router falls back to its zero-shot skills: asking for skills
never fails a request. Failures are not cached, so a recovered expert is asked again.
A question takes a place under the expert's ``max_concurrency`` like a request does;
with none free the zero-shot skills answer at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass

import orjson

from expert_registry.spec import ExpertSpec
from expert_registry.store import ExpertStore
from expert_registry.upstream import HTTPUpstream, LiteLLMUpstream, UpstreamFailure
from router_gateway.aggregate import answer_text
from router_gateway.registry_view import RegistryView
from router_gateway.slots import Slots

log = logging.getLogger(__name__)

CACHE_TTL_S = 30 * 24 * 3600
SKILL_MAX_TOKENS = 48


@dataclass(frozen=True)
class SkillAnswer:
    words: list[str] | None  # None: use the zero-shot path
    source: str  # "llm", "llm-cache", or "zero-shot (<why>)"


class SkillAsker:
    def __init__(self, store: ExpertStore, view: RegistryView, http: HTTPUpstream, litellm: LiteLLMUpstream,
                 slots: Slots | None = None):
        self.store = store
        self.view = view
        self.http = http
        self.litellm = litellm
        self.slots = slots or Slots(None)  # places under the experts' max_concurrency: a question takes one too
        self.asked = 0  # upstream calls made (cache misses), for tests and metrics

    def _key(self, expert: str, text: str) -> str:
        digest = hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()
        return f"{self.store.prefix}skills:{expert}:{digest}"

    async def _cached(self, key: str) -> list[str] | None:
        try:
            raw = await asyncio.to_thread(self.store.client.get, key)
        except Exception as exc:  # Redis down: ask the expert instead
            log.warning("skills cache read failed: %s", exc)
            return None
        if raw is None:
            return None
        try:
            words = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        return words if isinstance(words, list) and all(isinstance(w, str) for w in words) and words else None

    async def _remember(self, key: str, words: list[str]) -> None:
        try:
            await asyncio.to_thread(self.store.client.set, key, orjson.dumps(words), ex=CACHE_TTL_S)
        except Exception as exc:  # a cache that cannot write is only slower
            log.warning("skills cache write failed: %s", exc)

    async def skills(self, text: str, expert: str, timeout_s: float, request_id: str | None = None) -> SkillAnswer:
        key = self._key(expert, text)
        hit = await self._cached(key)
        if hit is not None:
            return SkillAnswer(hit, "llm-cache")
        spec = self.view.experts.get(expert)
        if spec is None:
            return SkillAnswer(None, f"zero-shot (skills expert '{expert}' is not registered)")
        if self.view.is_unhealthy(expert) is not None:
            return SkillAnswer(None, f"zero-shot (skills expert '{expert}' is unhealthy)")
        async with self.slots.place(spec) as free:
            if not free:
                return SkillAnswer(None, f"zero-shot (skills expert '{expert}' is at its max_concurrency)")
            return await self._ask(text, spec, key, timeout_s, request_id)

    async def _ask(self, text: str, spec: ExpertSpec, key: str, timeout_s: float, request_id: str | None
                   ) -> SkillAnswer:
        from router_models.symbolic import parse_skill_list, skill_prompt

        expert = spec.name
        body = {"model": spec.served_model, "messages": skill_prompt(text), "max_tokens": SKILL_MAX_TOKENS,
                "temperature": 0, "stream": False}
        upstream = self.litellm if spec.backend == "litellm" else self.http
        self.asked += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        why = ""
        # Its replicas in the order requests take them; a failed one (no connection, a 5xx,
        # a 429) hands over to the next while time is left.
        for _, ep in self.view.replicas.order(spec, self.http.client.in_use):
            try:
                status, content = await asyncio.wait_for(upstream.send(ep, "chat/completions", body, request_id),
                                                         max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:
                return SkillAnswer(None, f"zero-shot (skills expert '{expert}' took over {timeout_s:g} s)")
            except UpstreamFailure as exc:
                why = f"failed: {exc}"
                continue
            if status == 200:
                break
            why = f"answered HTTP {status}"
            if status < 500 and status != 429:   # the request itself is wrong: another replica says the same
                return SkillAnswer(None, f"zero-shot (skills expert '{expert}' {why})")
        else:
            return SkillAnswer(None, f"zero-shot (skills expert '{expert}' {why})")
        words = parse_skill_list(answer_text(content))
        if not words:
            return SkillAnswer(None, f"zero-shot (skills expert '{expert}' listed no skills)")
        await self._remember(key, words)
        return SkillAnswer(words, "llm")

