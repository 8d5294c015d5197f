"""Aggregation mode: ``model: "router:NAME?k=K"`` asks K recruited experts, then one
aggregator expert writes the answer from theirs (after Symbolic-MoE and Mixture-of-Agents).

1. Recruiting: the router ranks the experts as usual (skills, cost knobs and all); the
   top K healthy ones are recruited (fewer when fewer are available).
2. The recruited experts answer the client's request in parallel, non-streaming, with
   the client's own parameters. One that fails (transport error, timeout, non-2xx, an
   answer with no text) is left out; if all fail the request fails like a single
   expert's would (their 4xx passes through as a 400, anything else is a 502). A
   recruit with a ``max_concurrency`` takes a place under it for its call; one that
   finds no place is left out like a failed one (all of them: a 503 to retry).
3. The aggregator answers a new request: the client's messages, preceded by a system
   message that carries the recruited answers and asks for one answer built from them.
   It streams when the client asked for a stream. The aggregator is the deployment's
   ``aggregator`` when set, else the mapped expert with the best mean logged score
   (``router.competence_``), else the top-ranked one.

Headers on the answer: ``x-switchyard-expert`` (the aggregator), ``x-switchyard-recruited``
(the experts whose answers were used, comma-separated), ``x-switchyard-recruited-failed``
(those that failed, if any) and ``x-switchyard-recruited-tokens`` (their total tokens, so
the client can see what the whole answer cost). Only ``/v1/chat/completions`` aggregates.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import orjson

from expert_registry.spec import ExpertSpec
from expert_registry.upstream import UpstreamFailure
from router_gateway.errors import ExpertUnavailable, InvalidRequest, UpstreamError
from router_gateway.keys import decode_usage, estimate_usage
from router_gateway.slots import Slots

log = logging.getLogger(__name__)

AGGREGATOR_PROMPT = (
    "You are given a user's request and answers to it from {n} expert models. Write the single best answer "
    "to the request: keep what the answers get right, fix what they get wrong, and resolve disagreements "
    "by reasoning. Answer the user directly, in the form the request asks for; do not mention the experts "
    "or their answers.\n\n{answers}"
)


@dataclass(frozen=True)
class ExpertAnswer:
    expert: ExpertSpec
    text: str | None  # None: it failed (``error`` says how)
    usage: tuple[int, int] | None = None   # (prompt, completion) tokens as reported, or estimated
    error: str | None = None
    status: int | None = None
    full: bool = False   # not asked: the expert was at its max_concurrency

    @property
    def tokens(self) -> int:
        return sum(self.usage) if self.usage is not None else 0


def answer_text(content: bytes) -> str:
    """The first choice's text of a chat or text completion ('' when the body is not one)."""
    try:
        choice = orjson.loads(content)["choices"][0]
        text = choice["message"]["content"] if "message" in choice else choice.get("text")
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
        return ""
    return text if isinstance(text, str) else ""


def recruit_body(body: dict, spec: ExpertSpec) -> dict:
    """The client's request as one recruited expert gets it: its model id, no stream."""
    out = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    out["model"] = spec.served_model
    out["n"] = 1
    return out


def aggregator_body(body: dict, answers: list[ExpertAnswer]) -> dict:
    """The aggregator's request: our system message with the answers, then the client's messages."""
    listed = "\n\n".join(f"[Answer {i + 1}]\n{a.text.strip()}" for i, a in enumerate(answers) if a.text)
    system = {"role": "system", "content": AGGREGATOR_PROMPT.format(n=len(answers), answers=listed)}
    return {**body, "messages": [system, *body["messages"]]}


class Aggregation:
    """Calls the recruited experts for one request (``upstream_for`` picks the transport)."""

    def __init__(self, upstream_for, timeout_s: float | None = None, slots: Slots | None = None):
        self.upstream_for = upstream_for
        self.timeout_s = timeout_s
        self.slots = slots or Slots(None)   # places under the experts' max_concurrency

    async def _ask(self, spec: ExpertSpec, body: dict, request_id: str) -> ExpertAnswer:
        async with self.slots.place(spec) as free:
            if not free:
                return ExpertAnswer(spec, None, error=f"at its max_concurrency ({spec.max_concurrency} requests in "
                                    "flight)", full=True)
            return await self._call(spec, body, request_id)

    async def _call(self, spec: ExpertSpec, body: dict, request_id: str) -> ExpertAnswer:
        try:
            call = self.upstream_for(spec).send(spec, "chat/completions", recruit_body(body, spec), request_id)
            status, content = await (asyncio.wait_for(call, self.timeout_s) if self.timeout_s else call)
        except asyncio.TimeoutError:
            return ExpertAnswer(spec, None, error=f"no answer within {self.timeout_s:g} s")
        except UpstreamFailure as exc:
            return ExpertAnswer(spec, None, error=str(exc))
        if status != 200:
            return ExpertAnswer(spec, None, error=f"HTTP {status}", status=status)
        text = answer_text(content)
        if not text.strip():
            return ExpertAnswer(spec, None, error="an answer with no text", status=status)
        usage = decode_usage(content) or estimate_usage(recruit_body(body, spec), len(text))
        return ExpertAnswer(spec, text, usage, status=status)

    async def gather(self, endpoint: str, body: dict, recruited: tuple[ExpertSpec, ...],
                     request_id: str) -> tuple[dict, list[ExpertAnswer], list[ExpertAnswer]]:
        """(the aggregator's body, answers used, answers that failed). Raises when all fail."""
        if endpoint != "chat/completions":
            raise InvalidRequest("aggregation ('?k=' above 1) needs /v1/chat/completions", param="model")
        answers = await asyncio.gather(*(self._ask(s, body, request_id) for s in recruited))
        good = [a for a in answers if a.text is not None]
        bad = [a for a in answers if a.text is None]
        for a in bad:
            log.warning("recruited expert %s failed: %s", a.expert.name, a.error)
        if not good:
            detail = "; ".join(f"{a.expert.name}: {a.error}" for a in bad)
            if bad and all(a.status is not None and 400 <= a.status < 500 for a in bad):
                raise InvalidRequest(f"every recruited expert refused the request ({detail})")
            if bad and all(a.full for a in bad):
                raise ExpertUnavailable(f"every recruited expert is at its max_concurrency ({detail}); retry shortly",
                                        headers={"retry-after": "1"})
            raise UpstreamError(f"every recruited expert failed ({detail})")
        return aggregator_body(body, good), good, bad
