"""From a validated request to the upstream's answer: resolve the target, call, re-frame.

The upstream's answer comes back unchanged except for ``model`` (the name the client
asked for) and the ``x-switchyard-*`` headers. Non-2xx answers: 4xx pass through as
the upstream sent them (it is the client's error); 5xx and transport failures become
502/504. An error after a stream started is an SSE error frame, then ``[DONE]``.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, NoReturn

import anyio
import orjson
from starlette.responses import Response, StreamingResponse

from expert_registry.spec import ExpertSpec
from expert_registry.upstream import (
    HTTPUpstream,
    LiteLLMUpstream,
    UpstreamBusy,
    UpstreamFailure,
    UpstreamNotTried,
    UpstreamProtocolError,
    UpstreamStream,
    UpstreamTimedOut,
    UpstreamUnreachable,
)
from router_gateway.aggregate import Aggregation, answer_text
from router_gateway.errors import (
    ExpertUnavailable,
    GatewayError,
    GatewayOverloaded,
    InvalidRequest,
    ModelNotFound,
    UpstreamError,
    UpstreamTimeout,
    error_body,
    responses_error_event,
    sse_error_frame,
)
from router_gateway.keys import decode_usage, estimate_usage, usage_from
from router_gateway.model_string import ModelTarget
from router_gateway.registry_view import RegistryView
from router_gateway.slots import Slots
from router_gateway.sse import reframe

if TYPE_CHECKING:  # routing imports RouteDecision from here
    from router_gateway.observe import Metrics
    from router_gateway.routing import RoutingTable

log = logging.getLogger(__name__)

Meter = Callable[[ExpertSpec, "tuple[int, int]", bool], None]
"""Called once per paid-for answer with the expert, its (prompt, completion) tokens (as
the upstream reported them, else estimated at 4 characters a token) and whether it is
the answer the client gets (False for a recruited expert's); books usage against the
caller's key. The flag defaults to True."""
OnId = Callable[[ExpertSpec, str], Awaitable[None]]
"""Called with the endpoint (the expert at the URL that answered) and the id of each
Responses API answer, before the client sees that id; the gateway remembers where the
response is stored (``router_gateway.responses``)."""


@dataclass(frozen=True)
class RouteDecision:
    target: ModelTarget
    expert: ExpertSpec
    router: str  # "direct" when the client named the expert, else the router deployment's name
    fallbacks: tuple[ExpertSpec, ...] = ()  # the router's next choices, best first
    route_s: float | None = None  # scoring + policy time (routed requests only)
    scores: str | None = None  # "expert=quality;..." when the client asked (x-switchyard-explain)
    recruited: tuple[ExpertSpec, ...] = ()  # aggregation (?k=K): the experts whose answers ``expert`` merges
    skipped: tuple[str, ...] = ()  # the named expert, when it was unhealthy and ``expert`` is its fallback
    replica: int | None = None  # pinned to one of several URLs: which (x-switchyard-replica; 0: base_url)


class Dispatcher:
    def __init__(self, view: RegistryView, http: HTTPUpstream, litellm: LiteLLMUpstream,
                 routing: RoutingTable | None = None, cooldown: CooldownPolicy | None = None,
                 metrics: Metrics | None = None, slots: Slots | None = None):
        self.view = view
        self.metrics = metrics
        self.cooldown = cooldown or CooldownPolicy()
        self.http = http
        self.litellm = litellm
        self.routing = routing
        self.slots = slots or Slots(None)   # places under the experts' max_concurrency

    # --- resolving ---------------------------------------------------------------
    def available(self) -> str:
        experts = ", ".join(sorted(n for n, s in self.view.experts.items() if s.backend != "collab"))
        names = self.routing.names() if self.routing is not None else []
        routers = ", ".join(f"router:{r}" for r in names) or "none deployed"
        groups = sorted(f"collab:{n}" for n, s in self.view.experts.items() if s.backend == "collab")
        return (f"experts: {experts or 'none registered'}; routers: {routers}"
                + (f"; groups: {', '.join(groups)}" if groups else ""))

    async def route(self, target: ModelTarget, body: dict, endpoint: str, explain: bool = False) -> RouteDecision:
        """A ``router:``/``auto`` target: score the request and pick an expert (any other
        target goes through :meth:`resolve`)."""
        entry = self.routing.lookup(target) if self.routing is not None else None
        if entry is None or target.kind not in ("router", "auto"):
            return self.resolve(target)
        return await self.routing.decide(entry, target, body, endpoint, with_scores=explain)

    def resolve(self, target: ModelTarget) -> RouteDecision:
        """An expert named directly (the fast path: no awaits); other targets that are
        not routable raise the 404 naming what is available."""
        if target.kind == "expert":
            spec = self.view.experts.get(target.name)
            if spec is None or spec.backend == "collab":
                raise ModelNotFound(f"model '{target.name}' does not exist. Available {self.available()}",
                                    param="model")
            fallbacks = self._fallbacks(spec) if spec.fallbacks else ()
            bad = self.view.is_unhealthy(spec.name)
            if bad is not None:
                up = [f for f in fallbacks if self.view.is_unhealthy(f.name) is None]
                if up:
                    return RouteDecision(target, up[0], "direct", fallbacks=tuple(up[1:]), skipped=(spec.name,))
                also = " (and so are its fallbacks)" if fallbacks else ""
                raise ExpertUnavailable(f"expert '{spec.name}' is unhealthy ({bad.error or 'failed its health check'})"
                                        f"{also}; try another model. Available {self.available()}",
                                        headers=_retry_in(bad))
            return RouteDecision(target, spec, "direct", fallbacks=fallbacks)
        if target.kind == "router":
            raise ModelNotFound(f"router '{target.name}' is not available. Available {self.available()}",
                                param="model")
        if target.kind == "auto":
            raise ModelNotFound("'auto' needs a default router, and none is configured yet "
                                "(`switchyard routers add NAME ... --default`). "
                                f"Name an expert or a router instead. Available {self.available()}", param="model")
        spec = self.view.experts.get(target.name)
        if spec is not None and spec.backend == "collab":
            bad = self.view.is_unhealthy(spec.name)
            if bad is not None:
                raise ExpertUnavailable(f"collaboration group '{spec.name}' is unhealthy "
                                        f"({bad.error or 'failed its health check'}); try another model. "
                                        f"Available {self.available()}")
            return RouteDecision(target, spec, "collab")
        groups = sorted(n for n, s in self.view.experts.items() if s.backend == "collab")
        raise ModelNotFound(f"collaboration group '{target.name}' is not available "
                            f"(groups: {', '.join(groups) or 'none'}). Available {self.available()}",
                            param="model")

    def at(self, target: ModelTarget, expert: str, url: str | None) -> RouteDecision | None:
        """The decision to call ``expert`` at its one URL ``url`` and nowhere else (a stored
        response lives there), or None when that expert or URL is no longer registered."""
        spec = self.view.experts.get(expert)
        if spec is None:
            return None
        endpoints = self.view.replicas.endpoints(spec)
        for index, ep in enumerate(endpoints):
            if ep.base_url == url:
                return RouteDecision(target, ep.model_copy(update={"replicas": []}) if ep.replicas else ep, "pinned",
                                     replica=index if len(endpoints) > 1 else None)
        return None

    async def stored(self, decision: RouteDecision, method: str, path: str, client_model: str,
                     request_id: str) -> Response:
        """``method`` on ``path`` (``responses/ID...``) at the one URL of ``decision``: the
        upstream's answer with ``model`` rewritten to ``client_model``; a streamed retrieve
        (``?stream=true``, a background response's events) is relayed as it comes."""
        spec = decision.expert
        if not isinstance(self._upstream(spec), HTTPUpstream):
            raise InvalidRequest(f"expert '{spec.name}' is reached through litellm, which keeps no stored "
                                 "responses the gateway can fetch; ask its provider", code="unsupported_backend")
        headers = {"x-switchyard-expert": spec.name, "x-switchyard-router": decision.router}
        if decision.replica is not None:
            headers["x-switchyard-replica"] = str(decision.replica)
        try:
            stream = await self.http.open(spec, method, path, request_id)
            if stream.status == 200 and stream.content_type.startswith("text/event-stream"):
                rewrite = client_model if client_model != spec.served_model else None
                relay = self._relay(stream, rewrite, spec, responses=True)
                return StreamingResponse(_RelayBody(relay, stream.aclose), media_type="text/event-stream",
                                         headers=headers)
            status, content = stream.status, await stream.read_all()
        except UpstreamFailure as exc:
            raise _failed(exc).error from exc
        content, _ = _answer_or_raise(spec, status, content, client_model)
        return JSONAnswer(content, status, headers)

    def _fallbacks(self, spec: ExpertSpec) -> tuple[ExpertSpec, ...]:
        """The registered experts among ``spec.fallbacks``, in order (groups left out)."""
        found = (self.view.experts.get(name) for name in spec.fallbacks)
        return tuple(f for f in found if f is not None and f.backend != "collab")

    def _upstream(self, spec: ExpertSpec) -> HTTPUpstream | LiteLLMUpstream:
        return self.litellm if spec.backend == "litellm" else self.http

    # --- calling -----------------------------------------------------------------
    async def handle(self, endpoint: str, body: dict, decision: RouteDecision, request_id: str,
                     t0: float, meter: Meter | None = None, timeout_s: float | None = None,
                     on_id: OnId | None = None) -> Response:
        """Call the decided expert and answer. With a ``meter``, a chat or text completion
        stream asks the upstream for its usage chunk (and drops it again when the client
        did not ask for it). ``timeout_s`` replaces the configured upstream timeout for
        this request; ``on_id`` (Responses API only) is told each answer's id."""
        headers = {"x-switchyard-router": decision.router}
        if decision.replica is not None:
            headers["x-switchyard-replica"] = str(decision.replica)
        if decision.recruited:
            in_flight = self.http.client.in_use   # each recruit asked at its first replica in order, no failover
            recruited = tuple(self.view.replicas.order(s, in_flight)[0][1] for s in decision.recruited)
            body, good, bad = await Aggregation(self._upstream, slots=self.slots).gather(endpoint, body, recruited,
                                                                                         request_id)
            headers["x-switchyard-recruited"] = ",".join(a.expert.name for a in good)
            headers["x-switchyard-recruited-tokens"] = str(sum(a.tokens for a in good))
            if meter is not None:            # the recruits' answers are paid for too
                for a in good:
                    meter(a.expert, a.usage, False)
            if bad:
                headers["x-switchyard-recruited-failed"] = ",".join(a.expert.name for a in bad)
        client_model = body["model"]
        if decision.route_s is not None:
            headers["x-switchyard-route-ms"] = _ms(decision.route_s)
        if decision.scores is not None:
            headers["x-switchyard-scores"] = decision.scores
        hide_usage = (meter is not None and body.get("stream") is True and endpoint != "responses"
                      and _ask_for_usage(body))
        failed: list[str] = list(decision.skipped)
        last: _Failed | None = None
        for spec in (decision.expert, *decision.fallbacks):
            if failed and self.view.is_unhealthy(spec.name) is not None:
                continue                     # cooled down or failed its probe since the ranking
            if failed:
                headers["x-switchyard-fallback-from"] = ",".join(failed)
            try:
                if spec.max_concurrency is None and not spec.replicas:   # what _call_expert comes down to
                    return await self._call(spec, endpoint, body, client_model, request_id, t0, dict(headers),
                                            meter, hide_usage, timeout_s, on_id)
                return await self._call_expert(spec, endpoint, body, client_model, request_id, t0, headers, meter,
                                               hide_usage, timeout_s, on_id)
            except _Failed as exc:
                failed.append(spec.name)
                last = exc
                await self._note_failure(spec, exc)
        if last is None:   # every one went unhealthy before its turn (possible only after a skip)
            raise ExpertUnavailable(f"'{client_model}' and its fallbacks are unhealthy; try another model")
        if last.response is not None:       # an upstream 429 or too-long 400 with nobody left to ask: as it came
            return last.response
        # The error names the last expert that failed, as an answer names the one that
        # answered (and so do the metrics and the decision log).
        if len(failed) > 1:
            headers["x-switchyard-fallback-from"] = ",".join(failed[:-1])
        last.error.headers = {**headers, "x-switchyard-expert": failed[-1], **last.error.headers}
        raise last.error

    async def _call_expert(self, spec: ExpertSpec, endpoint: str, body: dict, client_model: str, request_id: str,
                           t0: float, headers: dict, meter: Meter | None, hide_usage: bool,
                           timeout_s: float | None, on_id: OnId | None) -> Response:
        """``_call_replicas`` within the expert's ``max_concurrency``: at it, a ``_Failed``
        that the next choice or a fallback may take (not counted toward a cooldown); a
        request holds its place until its answer is read, or its stream relayed, whole."""
        limit = spec.max_concurrency
        if limit is None:
            return await self._call_replicas(spec, endpoint, body, client_model, request_id, t0, headers, meter,
                                             hide_usage, timeout_s, on_id)
        release = await self.slots.take(spec.name, limit)
        if release is None:
            raise _Failed(ExpertUnavailable(
                f"expert '{spec.name}' is at its max_concurrency ({limit} requests in flight); retry shortly",
                headers={"retry-after": "1"}), reason="at_capacity", counts=False)
        try:
            response = await self._call_replicas(spec, endpoint, body, client_model, request_id, t0, headers,
                                                 meter, hide_usage, timeout_s, on_id)
        except BaseException:
            release()
            raise
        relay = getattr(response, "body_iterator", None)
        if isinstance(relay, _RelayBody):
            relay.then(release)
        else:
            release()
        return response

    async def _call_replicas(self, spec: ExpertSpec, endpoint: str, body: dict, client_model: str, request_id: str,
                             t0: float, headers: dict, meter: Meter | None, hide_usage: bool,
                             timeout_s: float | None, on_id: OnId | None) -> Response:
        """``spec`` at its one URL, or at its replicas in the order :class:`Replicas` gives,
        the next after each failure (``x-switchyard-replica`` says which answered: 0 for
        ``base_url``, i for ``replicas[i - 1]``). Raises the last replica's ``_Failed``."""
        if not spec.replicas:
            return await self._call(spec, endpoint, body, client_model, request_id, t0, dict(headers), meter,
                                    hide_usage, timeout_s, on_id)
        replicas = self.view.replicas
        order = replicas.order(spec, self.http.client.in_use)
        for index, ep in order:
            try:
                return await self._call(ep, endpoint, body, client_model, request_id, t0,
                                        headers | {"x-switchyard-replica": str(index)}, meter, hide_usage, timeout_s,
                                        on_id)
            except _Failed as exc:
                if exc.counts:
                    pause = _seconds(exc.retry_after)
                    replicas.failed(ep, None if pause is None else min(pause, self.cooldown.max_retry_after_s))
                if ep is order[-1][1] or exc.reason == "context_length":   # every replica has the same window
                    raise
                if self.metrics is not None:
                    self.metrics.upstream_failure(spec.name, exc.reason)
                log.info("expert %s: replica %s failed (%s), trying the next", spec.name, ep.base_url, exc)
        raise AssertionError("unreachable")

    async def _call(self, spec: ExpertSpec, endpoint: str, body: dict, client_model: str, request_id: str,
                    t0: float, headers: dict, meter: Meter | None, hide_usage: bool,
                    timeout_s: float | None = None, on_id: OnId | None = None) -> Response:
        """One attempt at one expert. Raises ``_Failed`` for what the next expert may fix:
        no connection, a timeout or a 5xx before the first byte, or a 429."""
        headers["x-switchyard-expert"] = spec.name
        body["model"] = spec.served_model
        rewrite = client_model if client_model != spec.served_model else None
        upstream = self._upstream(spec)
        t_up = time.perf_counter()
        try:
            if body.get("stream") is True:
                stream = await upstream.open_stream(spec, endpoint, body, request_id, timeout_s)
                up_s = time.perf_counter() - t_up
                if stream.status == 200:
                    await _first_events(spec, stream)
                    headers["x-switchyard-overhead-ms"] = _ms(time.perf_counter() - t0 - up_s)
                    relay = self._relay(stream, rewrite, spec, meter, hide_usage, body, on_id,
                                        endpoint == "responses")
                    return StreamingResponse(_RelayBody(relay, lambda: _end_relay(stream, spec, meter, None, body, 0)),
                                             media_type="text/event-stream", headers=headers)
                status, content, retry_after = stream.status, await stream.read_all(), stream.retry_after
            else:
                status, content, retry_after = await upstream.answer(spec, endpoint, body, request_id, timeout_s)
                up_s = time.perf_counter() - t_up
        except UpstreamFailure as exc:
            raise _failed(exc) from exc
        try:
            content, answer = _answer_or_raise(spec, status, content, rewrite)
        except UpstreamError as exc:
            raise _Failed(exc, reason="5xx" if status >= 500 else "bad_answer") from exc
        if status == 429:
            if retry_after is not None:
                headers["retry-after"] = retry_after
            raise _Failed(UpstreamError(f"expert '{spec.name}' is rate limited"), "429", retry_after=retry_after,
                          response=Response(content, status_code=429, media_type="application/json",
                                            headers=headers))
        if status == 400 and _too_long(content):   # another expert may have the room: not this one's fault
            raise _Failed(InvalidRequest(f"the request does not fit expert '{spec.name}''s context window"),
                          "context_length", counts=False, response=JSONAnswer(content, status, dict(headers)))
        if on_id is not None and status == 200 and answer is None:   # parsed once, for its id and usage
            answer = _parsed(content)
        if meter is not None and status < 400:
            usage = decode_usage(content) if answer is None else usage_from(answer)
            meter(spec, usage or estimate_usage(body, len(answer_text(content))))
        if on_id is not None and status == 200:
            rid = answer.get("id") if isinstance(answer, dict) else None
            if isinstance(rid, str) and rid:
                await on_id(spec, rid)
        headers["x-switchyard-overhead-ms"] = _ms(time.perf_counter() - t0 - up_s)
        return JSONAnswer(content, status, headers)

    async def _note_failure(self, spec: ExpertSpec, failure: _Failed) -> None:
        """Count the failure in Redis (shared by every gateway process); at the policy's
        threshold, or when the upstream sent Retry-After, the expert goes into cooldown. A
        busy one (``counts`` false) is only in the metrics."""
        p = self.cooldown
        if self.metrics is not None:
            self.metrics.upstream_failure(spec.name, failure.reason)
        if not failure.counts:
            return
        pause = _seconds(failure.retry_after)
        try:
            rec = await anyio.to_thread.run_sync(lambda: self.view.store.note_failure(
                spec.name, failure.error.message, threshold=p.failures, window_s=p.window_s,
                cooldown_s=p.cooldown_s, retry_after_s=None if pause is None else min(pause, p.max_retry_after_s)))
        except Exception as exc:  # Redis down: the failure still fails over, it is just not counted
            log.warning("could not count a failure of expert %s: %s", spec.name, exc)
            return
        if rec is not None:
            log.warning("expert %s: %s", spec.name, rec.error)
            self.view.cooled(spec.name, rec)
            if self.metrics is not None:
                self.metrics.cooldown(spec.name)

    async def _relay(self, stream: UpstreamStream, rewrite: str | None, spec: ExpertSpec,
                     meter: Meter | None = None, hide_usage: bool = False,
                     body: dict | None = None, on_id: OnId | None = None,
                     responses: bool = False) -> AsyncIterator[bytes]:
        seen: list[tuple[int, int]] = []
        chars = 0   # of streamed text, for an estimate when the upstream reports no usage
        ids: list[str] = []   # Responses API: the id in ``response.created``, to report before it is sent

        def inspect(obj: Any) -> bool:
            nonlocal chars
            usage = usage_from(obj)
            if usage is None:
                chars += _streamed_chars(obj)
                return True
            seen.append(usage)
            return not (hide_usage and not obj.get("choices"))   # the usage-only chunk we asked for

        def inspect_event(obj: Any) -> bool:   # a Responses API event: id and usage are in its "response"
            nonlocal chars, sequence
            if not isinstance(obj, dict):
                return True
            n = obj.get("sequence_number")
            if type(n) is int:
                sequence = n
            held = obj.get("response")
            if not isinstance(held, dict):
                chars += _streamed_chars(obj)
                return True
            if on_id is not None and obj.get("type") == "response.created" and isinstance(held.get("id"), str):
                ids.append(held["id"])
            usage = usage_from(held)
            if usage is not None:
                seen.append(usage)
            return True

        sequence = -1   # Responses API: the last event's sequence_number, for an error event after it
        # A Responses stream is always read (for its sequence numbers); a chat or text one
        # only when its usage is booked.
        watch = inspect_event if responses else inspect if meter is not None else None
        try:
            async for frame in reframe(stream.chunks, rewrite, watch):
                while ids:
                    await on_id(spec, ids.pop())
                yield frame
        except UpstreamFailure as exc:
            log.warning("stream from expert %s broke: %s", spec.name, exc)
            err = UpstreamTimeout(str(exc)) if isinstance(exc, UpstreamTimedOut) else UpstreamError(str(exc))
            yield responses_error_event(err, sequence + 1) if responses else sse_error_frame(err)
        finally:
            await _end_relay(stream, spec, meter, seen[-1] if seen else None, body, chars)


async def _end_relay(stream: UpstreamStream, spec: ExpertSpec, meter: Meter | None,
                     usage: tuple[int, int] | None, body: dict | None, chars: int) -> None:
    """A relayed stream is over: its upstream connection goes back, its usage is booked
    (the upstream's own count, else an estimate from the prompt and ``chars`` streamed)."""
    await stream.aclose()
    if meter is not None:
        meter(spec, usage if usage is not None else estimate_usage(body or {}, chars))


_overload_logged = 0.0


def _overloaded(exc: UpstreamNotTried) -> NoReturn:
    """This process could not open a socket (out of file descriptors or local ports):
    the client gets a 503 to retry, and no expert is blamed, failed over from or cooled
    down for it. Logged at most once a minute, as it comes in bursts."""
    global _overload_logged
    now = time.monotonic()
    if now - _overload_logged > 60:
        _overload_logged = now
        log.warning("gateway out of sockets, answering 503 (raise the open files limit, `ulimit -n`): %s", exc)
    raise GatewayOverloaded(f"the gateway is overloaded and could not reach the expert; retry shortly ({exc})",
                            headers={"retry-after": "1"}) from exc


class _RelayBody:
    """A relayed stream's body (``StreamingResponse.body_iterator``): iterates
    ``Dispatcher._relay``, and ``aclose`` also ends a relay that never started. An async
    generator closed before its first ``__anext__`` runs none of its code, ``finally``
    included: a client that hung up while its streamed answer was starting (the body is
    then closed unread) kept one of the upstream pool's connections for good, and once the
    pool was used up every later request to that upstream waited forever."""

    __slots__ = ("_gen", "_end", "_started", "_then")

    def __init__(self, gen: AsyncIterator[bytes], end: Callable[[], Awaitable[None]]):
        self._gen, self._end, self._started = gen, end, False
        self._then: Callable[[], None] | None = None

    def __aiter__(self) -> _RelayBody:
        return self

    def __anext__(self) -> Awaitable[bytes]:
        self._started = True
        return self._gen.__anext__() if self._then is None else self._next()

    async def _next(self) -> bytes:
        try:
            return await self._gen.__anext__()
        except BaseException:   # the end of the stream, or its failure
            self._done()
            raise

    def then(self, done: Callable[[], None]) -> None:
        """Call ``done`` once when the relay is over: iterated to its end, failed, or closed."""
        self._then = done

    def _done(self) -> None:
        done, self._then = self._then, None
        if done is not None:
            done()

    async def aclose(self) -> None:
        try:
            await self._gen.aclose()
            if not self._started:
                self._started = True
                await self._end()
        finally:
            self._done()


_SSE_STARTS = (b"data:", b"event:", b"id:", b"retry:", b":")


async def _first_events(spec: ExpertSpec, stream: UpstreamStream) -> None:
    """Wait for a stream's first bytes and check they are server-sent events, so that a
    stream failing before its first byte (or answering 200 with something else, an HTML
    page say) fails over like a plain answer would; the bytes stay in ``stream``."""
    try:
        first = await anext(stream.chunks, b"")
    except UpstreamFailure:
        await stream.aclose()
        raise
    head = first.lstrip(b"\xef\xbb\xbf \t\r\n")
    if not (head.startswith(_SSE_STARTS) or (0 < len(head) < 6 and any(s.startswith(head) for s in _SSE_STARTS))):
        await stream.aclose()
        what = "nothing" if not first else f"{first[:60]!r}"
        raise UpstreamProtocolError(f"expert '{spec.name}' answered a streamed request with {what}, "
                                    "not server-sent events")
    rest = stream.chunks

    async def chunks() -> AsyncIterator[bytes]:
        yield first
        async for chunk in rest:
            yield chunk

    stream.chunks = chunks()


def _streamed_chars(obj: Any) -> int:
    """Characters of text in one streamed chunk (chat deltas, completion text, or a
    Responses API text delta)."""
    n = 0
    if isinstance(obj, dict) and obj.get("type") == "response.output_text.delta":
        return len(obj["delta"]) if isinstance(obj.get("delta"), str) else 0
    choices = obj.get("choices") if isinstance(obj, dict) else None
    for c in choices if isinstance(choices, list) else ():
        if isinstance(c, dict):
            delta = c.get("delta")
            text = delta.get("content") if isinstance(delta, dict) else c.get("text")
            if isinstance(text, str):
                n += len(text)
    return n


def _ask_for_usage(body: dict) -> bool:
    """Make a streamed request include the upstream's usage chunk; True when the client
    had not asked for it (so the relay drops it again)."""
    opts = body.get("stream_options")
    if isinstance(opts, dict) and opts.get("include_usage") is True:
        return False
    body["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
    return True


def _failed(exc: UpstreamFailure) -> _Failed:
    """A transport failure as an attempt the next expert may succeed at (or, when this side
    is out of sockets, the 503 no other expert would fare better at)."""
    if isinstance(exc, UpstreamNotTried):
        _overloaded(exc)
    if isinstance(exc, UpstreamBusy):       # busy, not failing: another expert may take it; no cooldown
        return _Failed(GatewayOverloaded(f"{exc}; retry shortly", headers={"retry-after": "1"}),
                       reason="busy", counts=False)
    if isinstance(exc, UpstreamTimedOut):
        return _Failed(UpstreamTimeout(str(exc)), reason="timeout")
    return _Failed(UpstreamError(str(exc)), reason="unreachable" if isinstance(exc, UpstreamUnreachable)
                   else "protocol")


# How upstreams say a request does not fit the model's context window: OpenAI's code
# context_length_exceeded, vLLM's "This model's maximum context length is N tokens" and
# "max_tokens=N cannot be greater than max_model_len=M", Anthropic's "prompt is too long",
# litellm's ContextWindowExceededError.
_TOO_LONG = re.compile(rb"context[_ ]?(?:length|window)|max_model_len|prompt is too long|input is too long",
                       re.IGNORECASE)


def _too_long(content: bytes) -> bool:
    """Whether an upstream's 400 says the request is too long for its context window."""
    return _TOO_LONG.search(content, 0, 4096) is not None


def _parsed(content: bytes) -> Any:
    """``content`` as JSON, or None when it is not."""
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        return None


class _Failed(Exception):
    """An attempt the next expert may succeed at: the error to answer if none does, the
    upstream's Retry-After, and (429) the upstream's own answer to pass on as it came."""

    def __init__(self, error: GatewayError, reason: str, retry_after: str | None = None,
                 response: Response | None = None, counts: bool = True):
        super().__init__(error.message)
        self.error = error
        self.reason = reason  # for metrics: timeout, unreachable, protocol, 5xx, bad_answer, 429, busy, context_length
        self.counts = counts  # toward the expert's cooldown
        self.retry_after = retry_after
        self.response = response


@dataclass(frozen=True)
class CooldownPolicy:
    failures: int = 3              # failed calls within window_s that start a cooldown
    window_s: float = 60.0
    cooldown_s: float = 30.0
    max_retry_after_s: float = 300.0   # an upstream's Retry-After is honoured up to this


def _retry_in(rec) -> dict[str, str] | None:
    """Retry-After for an expert in cooldown: when its cooldown ends (then a probe decides)."""
    if rec.until is None:
        return None
    return {"retry-after": str(max(1, math.ceil(rec.until - time.time())))}


def _seconds(retry_after: str | None) -> float | None:
    """Retry-After in seconds (delta-seconds or an HTTP date), None when absent or unreadable."""
    if retry_after is None:
        return None
    try:
        return max(0.0, float(retry_after))
    except ValueError:
        pass
    try:
        from email.utils import parsedate_to_datetime

        return max(0.0, parsedate_to_datetime(retry_after).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _ms(seconds: float) -> str:
    return f"{max(seconds, 0.0) * 1000:.3f}"


def _answer_or_raise(spec: ExpertSpec, status: int, content: bytes, rewrite: str | None
                     ) -> tuple[bytes, Any]:
    """The body to send back: rewritten on success, passed through on 4xx; raises on
    5xx/garbage. With it the answer as parsed for the rewrite (None when not parsed), so
    that its usage is not parsed out of the body a second time."""
    if status >= 500:
        raise UpstreamError(f"expert '{spec.name}' answered HTTP {status}: {_upstream_message(content)}")
    if status >= 400:
        try:
            obj = orjson.loads(content)
            if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
                return content, None
        except orjson.JSONDecodeError:
            pass
        return orjson.dumps(error_body(f"expert '{spec.name}': {_upstream_message(content)}",
                                       "invalid_request_error", None, f"upstream_{status}")), None
    if rewrite is None:
        return content, None
    try:
        obj = orjson.loads(content)
    except orjson.JSONDecodeError:
        raise UpstreamError(f"expert '{spec.name}' answered with invalid JSON") from None
    if isinstance(obj, dict) and "model" in obj:
        obj["model"] = rewrite
        return orjson.dumps(obj), obj
    return content, obj


def _upstream_message(content: bytes, limit: int = 300) -> str:
    try:
        obj = orjson.loads(content)
        if isinstance(obj, dict):
            err = obj.get("error")
            if isinstance(err, dict) and err.get("message"):
                return str(err["message"])[:limit]
            if isinstance(obj.get("message"), str):
                return obj["message"][:limit]
            if isinstance(obj.get("detail"), str):
                return obj["detail"][:limit]
    except orjson.JSONDecodeError:
        pass
    return content[:limit].decode("utf-8", "replace") or "(empty body)"


class JSONAnswer(Response):
    """An expert's JSON answer with the gateway's headers (lower-case names): what
    ``Response(content, status_code=status, media_type="application/json",
    headers=headers)`` builds, without Starlette's generic header handling, which cost
    ~4% of the gateway's CPU per proxied request."""

    media_type = "application/json"

    def __init__(self, content: bytes, status_code: int, headers: dict[str, str]):
        self.status_code = status_code
        self.background = None
        self.body = content
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        raw.append((b"content-type", b"application/json"))
        if status_code >= 200 and status_code not in (204, 304):
            raw.append((b"content-length", b"%d" % len(content)))
        self.raw_headers = raw


def error_response(err: GatewayError) -> Response:
    return Response(orjson.dumps(err.body()), status_code=err.status_code, media_type="application/json",
                    headers=err.headers)


def internal_error_response(exc: BaseException) -> Response:
    """A bug in the gateway: logged with its traceback, answered as an OpenAI-shaped 500."""
    log.error("unexpected error", exc_info=exc)
    return Response(orjson.dumps(error_body("internal error in the gateway", "internal_error")), status_code=500,
                    media_type="application/json")
