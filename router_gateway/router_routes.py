"""``/v1/routers``: deploy, list and remove routers (admin key); ``/v1/route``: explain a
routing decision without calling any expert (client key)."""

from __future__ import annotations

from typing import Any

import anyio
import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from router_gateway.app_helpers import read_json, validated
from router_gateway.deployments import (
    DeploymentCheck,
    DeploymentInvalid,
    DeploymentMissing,
    RouterDeployment,
    absolute_dir,
    check_deployment,
)
from router_gateway.dispatch import Dispatcher
from router_gateway.errors import InvalidRequest, NotFound
from router_gateway.model_string import parse_model
from router_gateway.openapi import ADMIN, BODY, errors, json_body
from router_gateway.protocol import ChatCompletionRequest, CompletionRequest, ResponsesRequest, validate_body
from router_gateway.routing import RoutingTable

router = APIRouter(tags=["routers"])


def _json(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    media_type="application/json")


def _deployment_from(body: Any) -> RouterDeployment:
    dep = validated(RouterDeployment, body, " (a router deployment)")
    return dep.model_copy(update={"router_dir": absolute_dir(dep.router_dir)})


async def _admin(request: Request) -> RoutingTable:
    request.app.state.keys.admin(request)
    return request.app.state.routing


def _entry_or_404(routing: RoutingTable, name: str) -> dict:
    entry = routing.entries.get(name)
    if entry is None:
        known = ", ".join(routing.names()) or "none deployed"
        raise NotFound(f"router '{name}' does not exist (routers: {known})")
    return entry.describe()


@router.get("/v1/routers", responses=errors(*ADMIN))
async def list_routers(request: Request) -> Response:
    routing = await _admin(request)
    await routing.refresh()
    return _json({"object": "list", "data": [routing.entries[n].describe() for n in routing.names()]})


@router.post("/v1/routers", openapi_extra=json_body(RouterDeployment),
             responses=errors(*BODY, *ADMIN, ok="Replaced", created="Created"))
async def add_router(request: Request) -> Response:
    """Create or replace a deployment, after loading its router and checking the mapping."""
    routing = await _admin(request)
    dep = _deployment_from(await read_json(request, request.app.state.settings.max_body_bytes))
    store = request.app.state.store

    def check() -> DeploymentCheck:
        return check_deployment(dep, store.list())

    try:
        found = await anyio.to_thread.run_sync(check)
    except DeploymentInvalid as exc:
        raise InvalidRequest(str(exc), param=exc.param) from None
    created = await anyio.to_thread.run_sync(routing.deployments.put, dep)
    await request.app.state.view.refresh()
    await routing.refresh(preloaded={dep.name: found.router})
    out = _entry_or_404(routing, dep.name)
    out["excluded"] = found.report()
    out["replaced"] = not created
    return _json(out, 201 if created else 200)


@router.get("/v1/routers/{name}", responses=errors(*ADMIN, 404))
async def get_router(name: str, request: Request) -> Response:
    routing = await _admin(request)
    await routing.refresh()
    return _json(_entry_or_404(routing, name))


@router.delete("/v1/routers/{name}", responses=errors(*ADMIN, 404))
async def delete_router(name: str, request: Request) -> Response:
    routing = await _admin(request)
    try:
        await anyio.to_thread.run_sync(routing.deployments.remove, name)
    except DeploymentMissing:
        raise NotFound(f"router '{name}' does not exist (routers: {', '.join(routing.names()) or 'none'})") from None
    await routing.refresh()
    return _json({"id": f"router:{name}", "object": "router", "deleted": True})


@router.post("/v1/route", tags=["openai"],
             openapi_extra=json_body(ChatCompletionRequest, CompletionRequest, ResponsesRequest),
             responses=errors(*BODY, 401, 403, 404, 503))
async def explain_route(request: Request) -> Response:
    """The routing decision for a chat, completions or Responses API body, without calling any expert."""
    key = await request.app.state.keys.client(request)
    body = await read_json(request, request.app.state.settings.max_body_bytes)
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    if "messages" in body:
        endpoint, wire = "chat/completions", ChatCompletionRequest
    elif "prompt" in body:
        endpoint, wire = "completions", CompletionRequest
    elif "input" in body:
        endpoint, wire = "responses", ResponsesRequest
    else:
        raise InvalidRequest("the body needs 'messages' (a chat completion), 'prompt' (a completion) or 'input' "
                             "(a Responses API request)")
    validate_body(wire, body)
    if key is not None:
        key.check_model(body["model"])
    target = parse_model(body["model"])
    if target.kind not in ("router", "auto"):
        raise InvalidRequest("/v1/route explains routers: 'model' must be 'router:NAME' or 'auto'", param="model")
    dispatcher: Dispatcher = request.app.state.dispatcher
    routing: RoutingTable = request.app.state.routing
    entry = routing.lookup(target)
    if entry is None:
        dispatcher.resolve(target)  # raises the 404 naming what is available
    return _json(await routing.explain(entry, target, body, endpoint))
