"""The app factory: one pooled upstream client, the registry view and its background
tasks, all owned by the lifespan; thin routes over ``Dispatcher`` and ``ExpertStore``."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import logging
import math
import time
from typing import Any, AsyncIterator, Callable
from urllib.parse import quote

import anyio
import orjson
import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Match

from expert_registry.http1 import HTTP1Client
from expert_registry.spec import ExpertSpec
from expert_registry.store import ExpertStore, close_redis, open_async_redis, open_redis
from expert_registry.upstream import HTTPUpstream, LiteLLMUpstream
from router_gateway import admin_routes, router_routes
from router_gateway import feedback_routes, key_routes, usage_routes
from router_gateway.auth import KeyCache, KeyChecker
from router_gateway.cache import ResponseCache, cache_mode
from router_gateway.cors import Cors
from router_gateway.dispatch import (CooldownPolicy, Dispatcher, OnId, RouteDecision, error_response,
                                     internal_error_response)
from router_gateway.app_helpers import header, read_json
from router_gateway.decision_log import DecisionLog
from router_gateway.errors import (GatewayError, InvalidRequest, ModelNotFound, ResponseNotFound, StoreUnavailable,
                                   error_body)
from router_gateway.keys import KeyRecord, KeyStore, Limiter
from router_gateway.model_string import ModelTarget, parse_model
from router_gateway.protocol import (ChatCompletionRequest, CompletionRequest, EmbeddingRequest, ResponsesRequest,
                                     invalid_from_errors, validate_body)
from router_gateway.openapi import PROXY, errors, install as install_openapi, json_body
from router_gateway.observe import Metrics, Trace, configure_logging, request_id_from, route_label
from router_gateway.registry_view import RegistryView, health_loop
from router_gateway.responses import Pin, PinStoreError, ResponsePins
from router_gateway.routing import RoutingTable, query_text
from router_gateway.settings import Settings
from router_gateway.skills_llm import SkillAsker
from router_gateway.slots import Slots, capped

log = logging.getLogger(__name__)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def _gateway_error(_: Request, exc: GatewayError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> Response:
        return error_response(invalid_from_errors(list(exc.errors()), skip=("body",)))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            headers = {k: v for k, v in (headers or {}).items() if k.lower() != "allow"}
            headers["allow"] = ", ".join(allowed_methods(app, request.scope))
        return Response(orjson.dumps(error_body(str(exc.detail), kind)), status_code=exc.status_code,
                        media_type="application/json", headers=headers)

    @app.exception_handler(redis.RedisError)
    async def _store_error(_: Request, exc: redis.RedisError) -> Response:
        unavailable = store_unavailable(exc)
        return internal_error_response(exc) if unavailable is None else error_response(unavailable)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> Response:
        return internal_error_response(exc)


def allowed_methods(app: FastAPI, scope: dict) -> list[str]:
    """Every method some route of ``app`` takes at this request's path. Starlette's 405
    names only the first route that matched the path, so ``GET /v1/experts`` hid ``POST``."""
    methods: set[str] = set()
    for route in app.router.routes:
        match, _ = route.matches({**scope, "method": "GET"})
        if match != Match.NONE:
            methods.update(getattr(route, "methods", None) or ())
    return sorted(methods)


def store_unavailable(exc: redis.RedisError) -> StoreUnavailable | None:
    """A 503 for a Redis that cannot serve the registry now: unreachable, timed out,
    still loading its data, a read-only replica, out of memory, or refusing writes after
    a failed save. None for anything else (a bug: a 500)."""
    text = str(exc)
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError)) or \
            text.startswith(("OOM ", "MISCONF ")):
        log.warning("the registry store cannot serve a request: %s", text)
        return StoreUnavailable(f"the registry store (Redis) cannot serve this request now: {text}; "
                                "retry once it is back")
    return None


class FastPath:
    """Serves the hot POST routes straight from ASGI, ahead of FastAPI's middleware stack
    (which cost about half the gateway's CPU per proxied request); everything else,
    lifespan included, goes to the FastAPI app. The handlers are the same functions the
    FastAPI routes call, so both paths behave alike and the OpenAPI schema stays whole.

    Every HTTP request gets a ``Trace`` (``scope["switchyard.trace"]``): its request id
    goes on the response and into log lines, and ``observe`` gets the trace once the
    last byte is out (metrics, the decision log)."""

    def __init__(self, app: FastAPI, routes: dict[str, Any], observe: Callable[[Trace], None],
                 cors: Cors | None = None):
        self.app = app
        self.routes = routes
        self.state = app.state
        self.observe = observe
        self.cors = cors

    def begin(self, scope: dict) -> Trace:
        """The request's ``Trace``, stored in ``scope["switchyard.trace"]``."""
        rid = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                rid = value
                break
        trace = Trace(request_id_from(rid), time.perf_counter(), time.time(), route_label(scope["path"]))
        scope["switchyard.trace"] = trace
        return trace

    async def answer(self, handler: Callable, scope: dict, receive: Callable, body: bytes | None = None
                     ) -> Response:
        """A hot route's response; errors become their OpenAI-shaped responses. ``body``:
        the whole request body when the server already has it (read without ``receive``)."""
        scope["app"] = self.app
        request = Request(scope, receive)
        if body is not None:
            request._body = body   # what Starlette's Request.body() caches, read by stream()
        try:
            response = await handler(request)
        except GatewayError as exc:
            response = error_response(exc)
        except Exception as exc:  # never let a bug become a dropped connection
            response = internal_error_response(exc)
        if self.cors is not None:
            response.raw_headers.extend(self.cors.headers(scope["headers"]))
        return response

    def finish(self, trace: Trace) -> None:
        try:
            self.observe(trace)
        except Exception:  # metrics must never break an answer
            log.exception("could not record request %s", trace.rid)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        trace = self.begin(scope)
        rid_header = (b"x-request-id", trace.rid.encode())

        async def send_traced(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                trace.read_response_headers(message["status"], headers)
                headers.append(rid_header)
                message = {**message, "headers": headers}
            elif not message.get("more_body", False):
                trace.ended = time.perf_counter()
            await send(message)

        token = trace.enter()
        try:
            handler = self.routes.get(scope["path"]) if scope["method"] == "POST" else None
            if handler is None:
                await self.app(scope, receive, send_traced)
                return
            response = await self.answer(handler, scope, receive)
            try:
                await response(scope, receive, send_traced)
            finally:   # a client gone before a stream began leaves its body never iterated
                body = getattr(response, "body_iterator", None)
                if body is not None and hasattr(body, "aclose"):
                    await body.aclose()
        finally:
            self.finish(trace)
            Trace.leave(token)


GC_THRESHOLD = (100_000, 20, 100)   # gen0 allocations, gen0 runs per gen1, gen1 runs per gen2


def tune_gc() -> None:
    """Garbage-collector settings for a server that has finished starting: collect, then
    freeze every object alive now (modules, the app, clients) so later collections do not
    scan them, and run young collections every 100,000 net allocations instead of 700. A
    proxied request allocates a few thousand short-lived objects, nearly all freed by
    reference counting; at the default threshold the collector ran several times per
    request and took ~7% of the gateway's CPU at saturation. A young collection scans what
    the requests in flight hold (thousands of objects at 64 concurrent requests), so its
    cost depends little on the threshold: 100,000 rather than 10,000 took ~3% off the CPU
    per request; the garbage cycles it lets wait are a few MB at most."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


def create_app(settings: Settings | None = None, store: ExpertStore | None = None) -> FastPath:
    settings = settings or Settings()
    configure_logging(settings.log_level)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        st = store or ExpertStore(await anyio.to_thread.run_sync(open_redis, settings.redis_url, settings.data_dir))
        view = RegistryView(st, settings.registry_refresh_s)
        view.replicas.eject_s = settings.cooldown_s
        await view.refresh()
        routing = RoutingTable(st, view, settings.registry_refresh_s)
        await routing.refresh()
        key_store = KeyStore(st.client, st.prefix)
        keys = KeyCache(key_store, settings.registry_refresh_s)
        await keys.refresh()
        aredis = open_async_redis(st.client, settings.redis_url, settings.redis_max_connections)
        limiter = Limiter(key_store, aredis)
        slots = Slots(aredis, st.prefix, settings.concurrency_lease_s)
        decisions = DecisionLog(aredis, st.prefix, settings.decision_log_max_entries, settings.decision_log_prompts,
                                on_drop=metrics.log_dropped.inc)
        client = HTTP1Client(settings.upstream_max_connections, settings.upstream_connect_timeout_s,
                             settings.upstream_timeout_s)
        cache = ResponseCache(aredis, st.prefix, settings.cache_ttl_s, settings.cache_max_entry_bytes,
                              settings.cache_per_key, metrics.cache_result)
        try:
            app.state.cache = cache
            app.state.pins = ResponsePins(aredis, st.prefix, settings.responses_ttl_s)
            app.state.store = st
            app.state.view = view
            app.state.upstream_client = client
            app.state.routing = routing
            app.state.key_store, app.state.limiter = key_store, limiter
            app.state.decisions, app.state.aredis = decisions, aredis
            app.state.slots = slots
            app.state.keys = KeyChecker(settings.resolved_admin_key(), settings.api_keys, keys)
            http, litellm = HTTPUpstream(client), LiteLLMUpstream(settings.upstream_timeout_s)
            routing.skills = SkillAsker(st, view, http, litellm, slots)
            app.state.dispatcher = Dispatcher(view, http, litellm, routing, CooldownPolicy(
                settings.cooldown_failures, settings.cooldown_window_s, settings.cooldown_s,
                settings.max_retry_after_s), metrics, slots)
            tasks = [asyncio.create_task(view.run(), name="registry-refresh"),
                     asyncio.create_task(routing.run(), name="routers-refresh"),
                     asyncio.create_task(keys.run(), name="keys-refresh"),
                     asyncio.create_task(slots.run(), name="concurrency-leases"),
                     asyncio.create_task(metrics.run(), name="metrics")]
            if decisions.enabled:
                tasks.append(asyncio.create_task(decisions.run(), name="decision-log"))
            if settings.health_interval_s > 0:
                tasks.append(asyncio.create_task(health_loop(view, client, settings.health_interval_s),
                                                 name="health"))
            if settings.gc_tuning:
                tune_gc()
            try:
                yield
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await limiter.drain()
                await slots.drain()
                await cache.drain()
                await decisions.flush()
                await aredis.aclose()
                if store is None:  # we opened it, we close it
                    await anyio.to_thread.run_sync(close_redis, st.client)
        finally:
            await client.aclose()

    app = FastAPI(title="Switchyard", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible multi-LLM routing gateway")
    app.state.settings = settings
    cors = Cors(settings.cors_origins) if settings.cors_origins else None
    if cors is not None:
        cors.install(app)
    app.state.metrics = metrics = Metrics(lambda: getattr(app.state, "view", None),
                                          lambda: getattr(app.state, "upstream_client", None))
    _install_error_handlers(app)

    caching = settings.cache_ttl_s > 0

    async def _proxy(request: Request, endpoint: str, wire: type) -> Response:
        trace: Trace = request.scope["switchyard.trace"]
        state = request.app.state
        key, trace.key = await state.keys.caller(request)
        body = await read_json(request, settings.max_body_bytes)
        validate_body(wire, body)
        timeout_s = _timeout(header(request, b"x-switchyard-timeout"), settings.max_request_timeout_s)
        cache_as = cache_mode(request.headers) if caching and endpoint != "responses" else None
        trace.endpoint, trace.model = endpoint, body["model"]
        logging_decisions = state.decisions.enabled
        if logging_decisions and settings.decision_log_prompts:
            trace.prompt = _prompt_or_none(body, endpoint)
        if key is not None:
            key.check_model(body["model"])
        target = parse_model(body["model"])
        if endpoint == "embeddings" and target.kind != "expert":   # refused before it counts against a limit
            raise InvalidRequest(f"embeddings come from one expert: name it in 'model' (got {body['model']!r}; "
                                 "routers and collaboration groups answer chat and text completions only)",
                                 param="model")
        if key is not None:
            await state.limiter.admit(key)
        pinned, on_id = (await _responses_state(state, target, body, trace.key) if endpoint == "responses"
                         else (None, None))
        leads = False
        if cache_as is not None:   # before routing: a hit needs no decision
            cache: ResponseCache = state.cache
            entry, response, leads = await _cached(cache, cache_as, endpoint, body, trace.key, state.view)
            if response is not None:
                if key is not None:   # a request the key made, at no cost and no tokens
                    state.limiter.book(key, (0, 0), 0.0, 0.0)
                return response
        try:
            meter = trace.metering(state.limiter.meter(key) if key is not None else None)
            dispatcher: Dispatcher = state.dispatcher
            if pinned is not None:       # a stored response's continuation: where it is stored
                decision = pinned
            elif target.kind == "expert":  # the fast path: no awaits
                decision = dispatcher.resolve(target)
            else:
                explain = (header(request, b"x-switchyard-explain") or "").lower() in ("1", "true", "yes")
                decision = await dispatcher.route(target, body, endpoint, explain or logging_decisions)
                trace.route_s, trace.scores = decision.route_s, decision.scores
                if not explain and decision.scores is not None:
                    decision = dataclasses.replace(decision, scores=None)
            response = await dispatcher.handle(endpoint, body, decision, trace.rid, trace.t0, meter, timeout_s,
                                               on_id)
        except BaseException:
            if leads:   # the identical requests waiting on this one ask for themselves
                cache.settle(entry, None)
            raise
        if cache_as is not None:
            response.raw_headers.append((b"x-switchyard-cache", _CACHE_HEADER[cache_as]))
            if entry is not None:
                cache.keep(response, entry, leads)
        return response

    async def chat_completions(request: Request) -> Response:
        return await _proxy(request, "chat/completions", ChatCompletionRequest)

    async def completions(request: Request) -> Response:
        return await _proxy(request, "completions", CompletionRequest)

    async def embeddings(request: Request) -> Response:
        return await _proxy(request, "embeddings", EmbeddingRequest)

    async def responses(request: Request) -> Response:
        return await _proxy(request, "responses", ResponsesRequest)

    answer = {200: {"description": "The expert's answer: a JSON object, or with `stream: true` an event stream "
                    "ending in `data: [DONE]`", "content": {"application/json": {}, "text/event-stream": {}}}}
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"], tags=["openai"],
                      openapi_extra=json_body(ChatCompletionRequest), responses={**answer, **errors(*PROXY)})
    app.add_api_route("/v1/completions", completions, methods=["POST"], tags=["openai"],
                      openapi_extra=json_body(CompletionRequest), responses={**answer, **errors(*PROXY)})
    app.add_api_route("/v1/embeddings", embeddings, methods=["POST"], tags=["openai"],
                      openapi_extra=json_body(EmbeddingRequest),
                      responses={200: {"description": "The expert's embeddings"}, **errors(*PROXY)})
    app.add_api_route("/v1/responses", responses, methods=["POST"], tags=["openai"],
                      openapi_extra=json_body(ResponsesRequest),
                      responses={200: {"description": "The expert's response: a JSON object, or with `stream: "
                                       "true` typed server-sent events", "content": {"application/json": {},
                                                                                     "text/event-stream": {}}},
                                 **errors(*PROXY)})

    async def stored_response(request: Request, response_id: str, method: str, tail: str = "") -> Response:
        """A stored response's retrieve, delete, cancel or input items, at the server that made it."""
        trace: Trace = request.scope["switchyard.trace"]
        state = request.app.state
        _, trace.key = await state.keys.caller(request)
        pins: ResponsePins = state.pins
        try:
            pin = await pins.find(response_id) if pins.enabled else None
        except PinStoreError as exc:
            raise StoreUnavailable(f"cannot look up response '{response_id}': {exc}") from None
        if pin is not None and pin.caller != trace.key:   # another key's: as if it did not exist
            pin = None
        dispatcher: Dispatcher = state.dispatcher
        decision = None if pin is None else dispatcher.at(parse_model(pin.model), pin.expert, pin.url)
        if pin is None or decision is None:
            why = "" if pin is None else f" (the expert '{pin.expert}' that stored it is no longer registered there)"
            raise ResponseNotFound(f"response '{response_id}' not found{why}", param="response_id")
        query = request.url.query
        path = f"responses/{quote(response_id, safe='')}{tail}" + (f"?{query}" if query else "")
        response = await dispatcher.stored(decision, method, path, pin.model, trace.rid)
        if method == "DELETE" and response.status_code == 200:
            await pins.forget(response_id)
        return response

    @app.get("/v1/responses/{response_id}", tags=["openai"], responses=errors(400, 401, 404, 502, 503, 504))
    async def retrieve_response(response_id: str, request: Request) -> Response:
        return await stored_response(request, response_id, "GET")

    @app.delete("/v1/responses/{response_id}", tags=["openai"], responses=errors(400, 401, 404, 502, 503, 504))
    async def delete_response(response_id: str, request: Request) -> Response:
        return await stored_response(request, response_id, "DELETE")

    @app.post("/v1/responses/{response_id}/cancel", tags=["openai"], responses=errors(400, 401, 404, 502, 503, 504))
    async def cancel_response(response_id: str, request: Request) -> Response:
        return await stored_response(request, response_id, "POST", "/cancel")

    @app.get("/v1/responses/{response_id}/input_items", tags=["openai"],
             responses=errors(400, 401, 404, 502, 503, 504))
    async def response_input_items(response_id: str, request: Request) -> Response:
        return await stored_response(request, response_id, "GET", "/input_items")

    async def visible_models(request: Request) -> dict:
        """OpenAI's model list: experts, groups, routers and ``auto``, only what the key may call."""
        key: KeyRecord | None = await request.app.state.keys.client(request)
        listing = admin_routes.model_list(request.app.state.view, {})
        listing["data"].extend(request.app.state.routing.model_entries())
        if key is not None and key.models is not None:
            listing["data"] = [m for m in listing["data"] if key.allows(m["id"])]
        return listing

    @app.get("/v1/models", tags=["openai"], responses=errors(401, 503))
    async def models(request: Request) -> Response:
        return Response(orjson.dumps(await visible_models(request)), media_type="application/json")

    @app.get("/v1/models/{model:path}", tags=["openai"], responses=errors(401, 404, 503))
    async def model(model: str, request: Request) -> Response:
        """One entry of the model list (what the OpenAI SDKs' ``models.retrieve`` asks for)."""
        for entry in (await visible_models(request))["data"]:
            if entry["id"] == model:
                return Response(orjson.dumps(entry), media_type="application/json")
        raise ModelNotFound(f"model '{model}' does not exist, or this API key may not call it; "
                            "GET /v1/models lists those it may", param="model")

    @app.get("/health", tags=["ops"])
    async def health(request: Request) -> Response:
        view: RegistryView = request.app.state.view
        healthy = sum(1 for n in view.experts if view.is_unhealthy(n) is None)
        body = {"status": "ok" if view.store_error is None else "degraded",
                "store": "ok" if view.store_error is None else f"unreachable: {view.store_error}",
                "experts": len(view.experts), "healthy_experts": healthy}
        return Response(orjson.dumps(body), media_type="application/json")

    # HEAD for load-balancer checks (the same answer without its body; one operation in the schema)
    app.add_api_route("/health", health, methods=["HEAD"], include_in_schema=False)

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
    async def prometheus_metrics(request: Request) -> Response:
        """Prometheus metrics (text format); see ``router_gateway.observe``."""
        view, slots = getattr(app.state, "view", None), getattr(app.state, "slots", None)
        if view is not None and slots is not None:
            held = await slots.counts(capped(view.experts.values()))
            metrics.fleet.in_flight = {n: (k, view.experts[n].max_concurrency) for n, k in held.items()}
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def observe(trace: Trace) -> None:
        metrics.finish(trace)
        decisions = getattr(app.state, "decisions", None)
        if trace.endpoint and decisions is not None:
            decisions.append(trace)

    app.include_router(admin_routes.router)
    app.include_router(key_routes.router)
    app.include_router(key_routes.own)
    app.include_router(router_routes.router)
    app.include_router(feedback_routes.router)
    app.include_router(usage_routes.router)
    install_openapi(app)
    # The same handlers as the routes above, as _proxy itself with its arguments bound (one
    # coroutine less per request).
    hot = {"/v1/chat/completions": ("chat/completions", ChatCompletionRequest),
           "/v1/completions": ("completions", CompletionRequest),
           "/v1/embeddings": ("embeddings", EmbeddingRequest), "/v1/responses": ("responses", ResponsesRequest)}
    return FastPath(app, {path: functools.partial(_proxy, endpoint=endpoint, wire=wire)
                          for path, (endpoint, wire) in hot.items()}, observe, cors)


_CACHE_HEADER = {"on": b"miss", "refresh": b"refresh", "off": b"off"}


async def _cached(cache: ResponseCache, mode: str, endpoint: str, body: dict, key_id: str, view: RegistryView
                  ) -> tuple[str | None, Response | None, bool]:
    """The request's cache entry key (None: not to be stored), its answer on a hit, and
    whether it leads a flight of identical requests (``ResponseCache.join``), which the
    caller must settle. A miss that is not streamed waits for an identical request in
    flight in this process, when there is one, and answers with its answer. With Redis
    known to be down the cache is skipped, not waited on."""
    if mode == "off" or view.store_error is not None:
        cache.count("off" if mode == "off" else "error")
        return None, None, False
    entry = cache.key(endpoint, body, key_id)   # before the dispatcher rewrites the body's model
    if entry is None or mode == "refresh":
        cache.count("refresh" if entry is not None else "off")
        return entry, None, False
    hit = await cache.get(entry)
    if hit is None and body.get("stream") is not True:
        flight = cache.join(entry)
        if flight is None:
            return entry, None, True
        hit = await asyncio.shield(flight)   # a client that leaves must not cancel the others' wait
        if hit is None:                      # that one failed: this one asks for itself
            return entry, None, False
        cache.count("coalesced")
    return entry, None if hit is None else hit.response(), False


async def _responses_state(state: Any, target: ModelTarget, body: dict, caller: str
                           ) -> tuple[RouteDecision | None, OnId | None]:
    """For ``POST /v1/responses``: the decision to continue a stored response where it is
    stored (None: decide as usual; see ``router_gateway.responses``), and the hook that
    remembers where this answer is stored (None when it is not to be stored)."""
    pins: ResponsePins = state.pins
    if not pins.enabled:
        return None, None
    decision = None
    previous = body.get("previous_response_id")
    if previous is not None:
        try:
            pin = await pins.find(previous)
        except PinStoreError as exc:
            log.warning("cannot look up response %s, deciding without it: %s", previous, exc)
            pin = None
        else:
            named = target.kind == "expert"
            if pin is not None and pin.caller != caller:   # another key's: not even its expert may be asked
                raise ResponseNotFound(f"previous response '{previous}' not found", param="previous_response_id",
                                       code="previous_response_not_found")
            if pin is not None and (not named or target.name == pin.expert):
                decision = state.dispatcher.at(target, pin.expert, pin.url)
                if decision is None:
                    raise ResponseNotFound(f"previous response '{previous}' was stored by expert '{pin.expert}', "
                                           "which is no longer registered there", param="previous_response_id",
                                           code="previous_response_not_found")
            elif pin is None and not named:
                raise ResponseNotFound(f"previous response '{previous}' not found: this gateway does not know it "
                                       "(never stored, made with another API key, or older than the gateway's "
                                       "responses_ttl_s); name the expert that made it in 'model' to ask it "
                                       "directly", param="previous_response_id", code="previous_response_not_found")
    if body.get("store") is False:
        return decision, None
    asked = body["model"]

    async def on_id(spec: ExpertSpec, response_id: str) -> None:
        await pins.keep(response_id, Pin(spec.name, spec.base_url, caller, asked))

    return decision, on_id


def _timeout(header: str | None, limit: float) -> float | None:
    """``x-switchyard-timeout``: seconds to wait for the expert (to start answering, and
    between streamed chunks) instead of the configured upstream timeout."""
    if header is None:
        return None
    try:
        value = float(header)
    except ValueError:
        value = math.nan
    if not (0 < value <= limit):
        raise InvalidRequest(f"x-switchyard-timeout must be a number of seconds above 0 and at most {limit:g}; "
                             f"got {header[:40]!r}", code="invalid_timeout")
    return value


def _prompt_or_none(body: dict, endpoint: str) -> str | None:
    try:
        return query_text(body, endpoint) or None
    except GatewayError:   # token-id prompts have no text to log
        return None
