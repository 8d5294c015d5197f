"""``/v1/keys``: create, list, show, change and revoke API keys (admin key required);
``GET /v1/key``: the calling key's own record, limits and spend (any key).

``POST /v1/keys`` answers the new secret once, in ``key``; nothing else ever shows it.
``DELETE`` revokes: the record and its spend stay, listed with ``revoked_at``.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import orjson
import redis
from fastapi import APIRouter, Request
from pydantic import Field, ValidationError
from starlette.responses import Response

from router_gateway.app_helpers import read_json
from router_gateway.errors import AuthError, InvalidRequest, NotFound, StoreUnavailable
from router_gateway.keys import KeyMissing, KeyPolicy, KeyRecord, KeyStore, period_end
from router_gateway.openapi import ADMIN, BODY, errors, json_body
from router_gateway.protocol import invalid_from_validation

router = APIRouter(prefix="/v1/keys", tags=["keys"])
own = APIRouter(tags=["keys"])


class NewKey(KeyPolicy):
    """The body of ``POST /v1/keys``: whom the key is for, and its policy."""

    name: str = Field(min_length=1, description="Who the key is for (a person, team or service)")


def _json(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj), status_code=status, media_type="application/json")


async def _admin(request: Request) -> KeyStore:
    request.app.state.keys.admin(request)
    return request.app.state.key_store


async def _body(request: Request) -> dict:
    body = await read_json(request, request.app.state.settings.max_body_bytes)
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    return body


def _entry(store: KeyStore, rec: KeyRecord) -> dict:
    return {"object": "api_key", **rec.public(), "usage": store.usage(rec)}


async def _changed(request: Request) -> None:
    await request.app.state.keys.managed.refresh()   # this process sees the change at once


@router.get("", responses=errors(*ADMIN))
async def list_keys(request: Request) -> Response:
    store = await _admin(request)
    entries = await anyio.to_thread.run_sync(lambda: [_entry(store, r) for r in store.list()])
    return _json({"object": "list", "data": entries})


@router.post("", status_code=201, openapi_extra=json_body(NewKey), responses=errors(*BODY, *ADMIN))
async def create_key(request: Request) -> Response:
    store = await _admin(request)
    body = await _body(request)
    name = body.pop("name", None)
    if not isinstance(name, str) or not name.strip():
        raise InvalidRequest("'name' is required: a non-empty string naming the key's owner", param="name")
    try:
        policy = KeyPolicy.model_validate(body)
    except ValidationError as exc:
        raise invalid_from_validation(exc) from None
    secret, rec = await anyio.to_thread.run_sync(store.create, name, policy)
    await _changed(request)
    return _json({**_entry(store, rec), "key": secret}, 201)


async def _get(store: KeyStore, key_id: str) -> KeyRecord:
    try:
        return await anyio.to_thread.run_sync(store.get, key_id)
    except KeyMissing:
        raise NotFound(f"API key '{key_id}' does not exist") from None


@router.get("/{key_id}", responses=errors(*ADMIN, 404))
async def get_key(key_id: str, request: Request) -> Response:
    store = await _admin(request)
    rec = await _get(store, key_id)
    return _json(await anyio.to_thread.run_sync(_entry, store, rec))


@router.patch("/{key_id}", openapi_extra=json_body(KeyPolicy), responses=errors(*BODY, *ADMIN, 404))
async def update_key(key_id: str, request: Request) -> Response:
    store = await _admin(request)
    body = await _body(request)
    await _get(store, key_id)
    try:
        rec = await anyio.to_thread.run_sync(store.update, key_id, body)
    except ValidationError as exc:
        raise invalid_from_validation(exc) from None
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    await _changed(request)
    return _json(await anyio.to_thread.run_sync(_entry, store, rec))


@router.delete("/{key_id}", responses=errors(*ADMIN, 404))
async def revoke_key(key_id: str, request: Request) -> Response:
    store = await _admin(request)
    await _get(store, key_id)
    rec = await anyio.to_thread.run_sync(store.revoke, key_id)
    await _changed(request)
    return _json({"id": rec.id, "object": "api_key", "revoked": True, "revoked_at": rec.revoked_at})


_UNLIMITED = {"admin": "the admin key", "static": "a key from SWITCHYARD_API_KEYS", "": "no key: the gateway is open"}


@own.get("/v1/key", responses=errors(401, 503))
async def calling_key(request: Request) -> Response:
    """The key that calls: its record (never the secret), allowed models, limits, this
    budget period's spend, what is left of the budget and when the period resets; for
    the admin key, a SWITCHYARD_API_KEYS key or an open gateway, that it has no limits."""
    rec, who = await request.app.state.keys.caller(request)
    if rec is None:
        return _json({"object": "api_key", "id": who or None, "kind": who or "open", "unlimited": True,
                      "description": _UNLIMITED.get(who, who)})
    store: KeyStore = request.app.state.key_store

    def read() -> dict:
        now = time.time()
        fresh = store.get(rec.id)
        entry = {**_entry(store, fresh), "kind": "managed", "unlimited": not fresh.limited}
        spent = entry["usage"]["period_spend_usd"]
        entry["budget_left_usd"] = None if fresh.budget_usd is None else max(0.0, fresh.budget_usd - spent)
        entry["period_resets_at"] = period_end(fresh.budget_period, now)
        return entry

    try:
        return _json(await anyio.to_thread.run_sync(read))
    except KeyMissing:   # removed from the store since this process cached it
        raise AuthError("invalid API key") from None
    except redis.RedisError as exc:
        raise StoreUnavailable(f"cannot read the key's usage: the store is unreachable ({exc})") from None
