"""CORS, so that code in a browser on another origin (a web app using the OpenAI JS SDK)
can call the gateway: ``SWITCHYARD_CORS_ORIGINS``, off when empty.

Preflight requests (``OPTIONS``) and every route served through ASGI are answered by
Starlette's ``CORSMiddleware`` on the FastAPI app; the hot proxy routes skip that
stack (``FastPath``, ``GatewayProtocol``), so :meth:`Cors.headers` gives their answers the
same headers. The gateway's own response headers (request id, routing decision,
Retry-After) are exposed to the page. No credentials mode: a browser client sends its API
key in the Authorization header, which CORS allows without it.
"""

from __future__ import annotations

from typing import Any

from starlette.middleware.cors import CORSMiddleware

EXPOSED = ("x-request-id", "retry-after", "x-switchyard-expert", "x-switchyard-router", "x-switchyard-overhead-ms",
           "x-switchyard-route-ms", "x-switchyard-scores", "x-switchyard-fallback-from", "x-switchyard-recruited",
           "x-switchyard-recruited-tokens", "x-switchyard-recruited-failed", "x-switchyard-collab-experts",
           "x-switchyard-replica", "x-switchyard-cache", "x-switchyard-cache-age")


def check_origins(origins: list[str]) -> list[str]:
    """The configured origins, each ``*`` or ``scheme://host[:port]`` (what a browser sends
    as ``Origin``: no path, no trailing slash); raises ``ValueError`` naming a bad one."""
    for origin in origins:
        scheme, sep, rest = origin.partition("://")
        if origin != "*" and (not sep or scheme not in ("http", "https") or not rest or "/" in rest):
            raise ValueError(f"{origin!r} is not an origin; write '*' or "
                             "scheme://host[:port], e.g. https://app.example.com (no path, no trailing slash)")
    return origins


class Cors:
    def __init__(self, origins: list[str]):
        self.origins = frozenset(origins)
        self.any = "*" in self.origins
        self.exposed = ", ".join(EXPOSED).encode()

    def install(self, app: Any) -> None:
        """The middleware that answers preflights and the routes served through ASGI."""
        app.add_middleware(CORSMiddleware, allow_origins=sorted(self.origins), allow_methods=["*"],
                           allow_headers=["*"], expose_headers=list(EXPOSED), max_age=600)

    def headers(self, request_headers: Any) -> list[tuple[bytes, bytes]]:
        """What to add to a hot route's answer to a request with these (ASGI) headers."""
        for name, value in request_headers:
            if name == b"origin":
                if self.any:
                    return [(b"access-control-allow-origin", b"*"), (b"access-control-expose-headers", self.exposed)]
                if value.decode("latin-1") in self.origins:
                    return [(b"access-control-allow-origin", value), (b"vary", b"Origin"),
                            (b"access-control-expose-headers", self.exposed)]
                return []
        return []
