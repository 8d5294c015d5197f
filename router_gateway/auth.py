"""Bearer-key checks for client and admin endpoints (per-key policy arrives with the keys issue)."""

from __future__ import annotations

import hmac

from starlette.requests import Request

from router_gateway.errors import AuthError, PermissionDenied


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return request.headers.get("api-key")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("Authorization header must be 'Bearer <key>'")
    return token.strip()


class KeyChecker:
    def __init__(self, admin_key: str, client_keys: list[str]):
        self.admin_key = admin_key
        self.client_keys = frozenset(client_keys)

    def _is_admin(self, token: str) -> bool:
        return hmac.compare_digest(token.encode(), self.admin_key.encode())

    def client(self, request: Request) -> None:
        """Client endpoints: open when no client keys are configured, else a known key (or admin)."""
        if not self.client_keys:
            return
        token = bearer(request)
        if token is None:
            raise AuthError("missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key")
        if token not in self.client_keys and not self._is_admin(token):
            raise AuthError("invalid API key")

    def admin(self, request: Request) -> None:
        token = bearer(request)
        if token is None:
            raise AuthError("this endpoint needs the admin key: send 'Authorization: Bearer <admin key>'",
                            code="missing_api_key")
        if self._is_admin(token):
            return
        if token in self.client_keys:
            raise PermissionDenied("this endpoint needs the admin key, not a client key")
        raise AuthError("invalid admin key")
