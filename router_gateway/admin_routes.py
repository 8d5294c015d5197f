"""``/v1/experts``: register, replace, list and remove experts (admin key), and the model list."""

from __future__ import annotations

from typing import Any

import anyio
import orjson
from fastapi import APIRouter, Query, Request
from pydantic import ValidationError
from starlette.responses import Response

from expert_registry.spec import ExpertSpec
from expert_registry.store import ExpertExists, ExpertMissing, ExpertStore
from router_gateway.app_helpers import read_json
from router_gateway.errors import Conflict, InvalidRequest, NotFound, UpstreamError
from router_gateway.openapi import ADMIN, BODY, errors, json_body
from router_gateway.protocol import invalid_from_validation
from router_gateway.registry_view import RegistryView
from router_gateway.slots import capped

router = APIRouter(prefix="/v1/experts", tags=["experts"])
CHECK = ("Ask the expert's server (GET base_url/models) first: refuse a served_model it does not list (400), "
         "fill context_window from its max_model_len when the body has none; 502 when it cannot be asked")


def _json(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj), status_code=status, media_type="application/json")


def _spec_from(body: Any, name: str | None = None) -> ExpertSpec:
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object (an expert spec)")
    if name is not None:
        if body.setdefault("name", name) != name:
            raise InvalidRequest(f"name in body '{body['name']}' differs from the URL's '{name}'", param="name")
    try:
        return ExpertSpec.model_validate(body)
    except ValidationError as exc:
        raise invalid_from_validation(exc) from None


async def _checked(check: bool, spec: ExpertSpec, body: dict) -> ExpertSpec:
    """With ``?check=true``: ``spec`` as its server says it should be (``expert_registry.
    discover``: its ``served_model`` must be listed; ``context_window``, when the body has
    none, from the server's ``max_model_len``); a 400 when the server does not serve it, a
    502 when it cannot be asked."""
    from expert_registry.discover import NotServed, checked_spec, served_models

    if not check or spec.backend not in ("vllm", "openai") or not spec.base_url:
        return spec
    models = await anyio.to_thread.run_sync(served_models, spec.base_url, spec.api_key)
    if isinstance(models, str):
        raise UpstreamError(f"cannot check expert '{spec.name}': {models} (without ?check=true it is registered "
                            "as given)", code="expert_check_failed")
    try:
        return checked_spec(spec, models, True, "context_window" in body)[0]
    except NotServed as exc:
        raise InvalidRequest(str(exc).replace("--no-check", "without ?check=true"), param="served_model",
                             code="model_not_served") from None


def _entry(view: RegistryView, spec: ExpertSpec, in_flight: dict[str, int] | None = None) -> dict:
    """The expert as the API shows it: its spec (no upstream key), its last health, and
    for an expert with a ``max_concurrency`` the requests holding a place across the
    gateway (``in_flight``), when read."""
    rec = view.health.get(spec.name)
    health = None if rec is None else {"healthy": rec.healthy, "checked_at": rec.checked_at, "error": rec.error}
    entry = {**spec.public(), "health": health}
    if in_flight is not None and spec.name in in_flight:
        entry["in_flight"] = in_flight[spec.name]
    return entry


async def _in_flight(request: Request, specs: list[ExpertSpec]) -> dict[str, int]:
    return await request.app.state.slots.counts(capped(specs))


async def _admin(request: Request) -> tuple[ExpertStore, RegistryView]:
    request.app.state.keys.admin(request)
    return request.app.state.store, request.app.state.view


@router.get("", responses=errors(*ADMIN))
async def list_experts(request: Request) -> Response:
    _, view = await _admin(request)
    await view.refresh()
    specs = list(view.experts.values())
    held = await _in_flight(request, specs)
    return _json({"object": "list", "data": [_entry(view, s, held) for s in specs]})


@router.post("", status_code=201, openapi_extra=json_body(ExpertSpec),
             responses=errors(*BODY, *ADMIN, 409, 502))
async def add_expert(request: Request, check: bool = Query(False, description=CHECK)) -> Response:
    store, view = await _admin(request)
    body = await read_json(request, request.app.state.settings.max_body_bytes)
    spec = await _checked(check, _spec_from(body), body)
    try:
        await anyio.to_thread.run_sync(store.add, spec)
    except ExpertExists:
        raise Conflict(f"expert '{spec.name}' already exists; PUT /v1/experts/{spec.name} replaces it",
                       param="name") from None
    await view.refresh()
    return _json(_entry(view, spec), 201)


@router.get("/{name:path}", responses=errors(*ADMIN, 404))
async def get_expert(name: str, request: Request) -> Response:
    _, view = await _admin(request)
    await view.refresh()
    spec = view.experts.get(name)
    if spec is None:
        raise NotFound(f"expert '{name}' does not exist")
    return _json(_entry(view, spec, await _in_flight(request, [spec])))


@router.put("/{name:path}", openapi_extra=json_body(ExpertSpec),
            responses=errors(*BODY, *ADMIN, 502, ok="Replaced", created="Created"))
async def put_expert(name: str, request: Request, check: bool = Query(False, description=CHECK)) -> Response:
    store, view = await _admin(request)
    body = await read_json(request, request.app.state.settings.max_body_bytes)
    spec = await _checked(check, _spec_from(body, name), body)
    created = await anyio.to_thread.run_sync(store.put, spec)
    await view.refresh()
    return _json(_entry(view, spec), 201 if created else 200)


@router.delete("/{name:path}", responses=errors(*ADMIN, 404))
async def delete_expert(name: str, request: Request) -> Response:
    store, view = await _admin(request)
    try:
        await anyio.to_thread.run_sync(store.remove, name)
    except ExpertMissing:
        raise NotFound(f"expert '{name}' does not exist") from None
    await view.refresh()
    return _json({"id": name, "object": "expert", "deleted": True})


def model_list(view: RegistryView, routers: dict[str, type]) -> dict:
    """OpenAI's list format: experts, then collaboration groups and routers as they exist."""
    data = []
    for spec in view.experts.values():
        mid = f"collab:{spec.name}" if spec.backend == "collab" else spec.name
        bad = view.is_unhealthy(spec.name)
        data.append({"id": mid, "object": "model", "created": 0, "owned_by": "switchyard",
                     "kind": "collab" if spec.backend == "collab" else "expert",
                     "healthy": bad is None, "context_window": spec.context_window,
                     "pricing": {"input_per_mtok": spec.input_price_per_mtok,
                                 "output_per_mtok": spec.output_price_per_mtok}})
    for name in sorted(routers):
        data.append({"id": f"router:{name}", "object": "model", "created": 0, "owned_by": "switchyard",
                     "kind": "router"})
    return {"object": "list", "data": data}
