"""Who is calling: bearer keys for client and admin endpoints.

Client endpoints are open until a client key exists: one configured in
``SWITCHYARD_API_KEYS``, or any key ever created with ``switchyard keys create`` /
``POST /v1/keys`` (revoking them all does not reopen the gateway). From then on every
call needs a key: the admin key or a configured key (no limits), or a managed key, whose
policy (allowed models, budget, rate limits; ``router_gateway.keys``) applies.

Managed keys are cached per process and reloaded when the store's key version moves
(polled every ``registry_refresh_s``); a key created in another process is found on its
first use, a revocation reaches every process within one refresh (at once in the
process that revoked it).
"""

from __future__ import annotations

import asyncio
import hmac
import logging

import anyio
from starlette.requests import Request

from router_gateway.errors import AuthError, PermissionDenied, StoreUnavailable
from router_gateway.keys import KeyRecord, KeyStore, hash_secret

log = logging.getLogger(__name__)


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return request.headers.get("api-key")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("Authorization header must be 'Bearer <key>'")
    return token.strip()


class KeyCache:
    """The managed keys by secret hash, as of the store's last key version."""

    def __init__(self, store: KeyStore, refresh_s: float = 1.0):
        self.store = store
        self.refresh_s = refresh_s
        self.by_hash: dict[str, KeyRecord] = {}
        self.version = -1

    @property
    def any_created(self) -> bool:
        return self.version > 0

    def _load(self) -> None:
        version = self.store.version()
        if version != self.version:
            self.by_hash = {r.hash: r for r in self.store.list()}
            self.version = version

    async def refresh(self) -> None:
        try:
            await anyio.to_thread.run_sync(self._load)
        except Exception as exc:  # keep the last good keys while Redis hiccups
            log.warning("key refresh failed, keeping the last keys: %s", exc)

    async def run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.refresh_s)

    async def lookup(self, token: str) -> KeyRecord | None:
        digest = hash_secret(token)
        rec = self.by_hash.get(digest)
        if rec is None:  # maybe created elsewhere since the last refresh
            try:
                rec = await anyio.to_thread.run_sync(self.store.by_hash, digest)
            except Exception as exc:  # redis raises many types; all mean the store is away
                raise StoreUnavailable("cannot check this API key now: the key store is unreachable "
                                       "(keys seen before keep working)") from exc
            if rec is not None:
                self.by_hash[digest] = rec
                self.version = max(self.version, 1)
        return rec


class KeyChecker:
    def __init__(self, admin_key: str, client_keys: list[str], managed: KeyCache | None = None):
        self.admin_key = admin_key
        self.client_keys = frozenset(client_keys)
        self.managed = managed

    def _is_admin(self, token: str) -> bool:
        return hmac.compare_digest(token.encode(), self.admin_key.encode())

    @property
    def open(self) -> bool:
        return not self.client_keys and (self.managed is None or not self.managed.any_created)

    async def client(self, request: Request) -> KeyRecord | None:
        """Client endpoints: the managed key's record when one is used (its policy applies),
        None for an open gateway, the admin key or a configured key; else 401."""
        return (await self.caller(request))[0]

    async def caller(self, request: Request) -> tuple[KeyRecord | None, str]:
        """``client`` plus who called, as metrics and the decision log name it: the key's
        id, ``admin``, ``static`` (a key from SWITCHYARD_API_KEYS), or ``""`` (open)."""
        if self.open:
            return None, ""
        token = bearer(request)
        if token is None:
            raise AuthError("missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key")
        if token in self.client_keys:
            return None, "static"
        if self._is_admin(token):
            return None, "admin"
        rec = await self.managed.lookup(token) if self.managed is not None else None
        if rec is None:
            raise AuthError("invalid API key")
        if rec.revoked_at is not None:
            raise AuthError(f"API key '{rec.name}' has been revoked", code="revoked_api_key")
        return rec, rec.id

    def admin(self, request: Request) -> None:
        token = bearer(request)
        if token is None:
            raise AuthError("this endpoint needs the admin key: send 'Authorization: Bearer <admin key>'",
                            code="missing_api_key")
        if self._is_admin(token):
            return
        if token in self.client_keys or (self.managed is not None and hash_secret(token) in self.managed.by_hash):
            raise PermissionDenied("this endpoint needs the admin key, not a client key")
        raise AuthError("invalid admin key")
