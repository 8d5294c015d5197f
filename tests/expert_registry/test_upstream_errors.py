"""``HTTPUpstream``'s errors for an expert it cannot call at all, on every way of calling."""

from __future__ import annotations

import asyncio

import pytest

from expert_registry.http1 import HTTP1Client
from expert_registry.spec import ExpertSpec, LaunchSpec
from expert_registry.upstream import HTTPUpstream, UpstreamUnreachable


def test_an_expert_whose_worker_never_started_is_unreachable_with_the_reason():
    spec = ExpertSpec(name="w", backend="vllm", served_model="m", launch=LaunchSpec(model_path="/models/m"))
    assert spec.base_url is None

    async def main() -> None:
        client = HTTP1Client()
        up = HTTPUpstream(client)
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        try:
            for call in (lambda: up.answer(spec, "chat/completions", body),
                         lambda: up.open_stream(spec, "chat/completions", {**body, "stream": True}),
                         lambda: up.open(spec, "GET", "responses/r1")):
                with pytest.raises(UpstreamUnreachable, match="expert 'w' has no usable base URL.*start its worker"):
                    await call()
        finally:
            await client.aclose()

    asyncio.run(main())
