"""Fuzzing the HTTP API, operation by operation, from the app's own OpenAPI schema.

Every operation in ``GET /openapi.json`` gets requests from Hypothesis, sent over real
loopback HTTP to the real app under uvicorn (the conftest fixtures), in three modes:

  admin   the admin key (now and then a key the fuzzer created, or a client key), on a
          throwaway gateway whose experts, keys and routers the fuzzer may change
  client  the configured client key or managed keys (limited, model-restricted, out of
          budget), on a "protected" gateway no request of the run is allowed to change
  anon    no key, a wrong key or a malformed Authorization header, on that gateway too

Bodies: valid ones drawn from the request body's JSON schema (the schema's own
``requestBody`` where the operation declares one; else the pydantic model the handler
validates with, since most handlers read the raw request), the same with one mutation
(a field dropped, retyped, made huge, unicode junk, deeply nested, wrapped), arbitrary
JSON, and bytes that are not JSON at all (truncated, NaN, BOM, invalid UTF-8, lone
surrogates, nesting past any parser's limit, over the body limit). Path parameters mix
names that exist with junk; a few request headers the gateway reads get junk too.

What must hold, for every answer:

* no 5xx, except a 502 ``upstream_error``, 503 ``service_unavailable`` or 504
  ``timeout`` from an operation that calls experts (POST, tagged ``openai``) on the admin
  gateway, where the fuzzer may have registered experts at a refused port or at scripted
  upstreams that fail on purpose. On the protected gateway every expert is the scripted
  upstream's echo (or its 400 pass-through) and cooldown is off, so nothing there may
  fail upstream: only a 504 when the request itself asked for a tiny
  ``x-switchyard-timeout``. A 500 or a 503 ``store_unavailable`` is never allowed;
* every 4xx/5xx is OpenAI-shaped, ``{"error": {"message", "type", "param", "code"}}``,
  and a 429 carries Retry-After; no redirects; no dropped connections;
* no key but the admin key gets a 2xx from the admin routes, and no request without a
  key gets a 2xx from a POST;
* afterwards: both gateways answer /health and a normal chat completion; the protected
  gateway's experts, keys and routers are exactly as before; the throwaway gateway holds
  exactly what its starting data plus the fuzzer's own successful writes (tracked from
  the answers) say it should, and every record the fuzzer did not write is unchanged.

Every body-taking operation also gets each of ``NASTY_BYTES`` once, outright.

Bugs the fuzzer found (each fixed) have their own regression test at the end of this file.
The operations, the gateways and the request generator are in ``fuzz_api_parts.py``.

Deterministic (``derandomize``), no example database; about 35 s on 2 cores.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from expert_registry.spec import MAX_PRICE_PER_MTOK
from expert_registry.store import ExpertStore, open_redis
from tests.router_gateway.conftest import ADMIN_KEY, CLIENT_KEY
from tests.router_gateway.fuzz_api_parts import (EXAMPLES, MODES, NASTY_BYTES, OPS, UPSTREAM_5XX, Gen, Operation, Req,
                                                 Target, app_schema, about_experts, fuzz_gateway,
                                                 operations, param_kind)
from tests.router_gateway.test_routing import EXPERT_MAP, POEM_Q, train_router


@pytest.fixture(scope="module")
def fuzz_router_dir(tmp_path_factory) -> Path:
    return train_router(tmp_path_factory.mktemp("fuzz-router"))


@pytest.fixture(scope="module")
def targets(tmp_path_factory, scripted_upstream: str, fuzz_router_dir: Path) -> Iterator[dict[str, Target]]:
    dirs = [tmp_path_factory.mktemp(name) / "data" for name in ("fuzz-admin", "fuzz-protected")]
    stores = [ExpertStore(open_redis(None, d)) for d in dirs]
    try:
        with fuzz_gateway(dirs[0], stores[0], scripted_upstream, fuzz_router_dir) as throwaway, \
                fuzz_gateway(dirs[1], stores[1], scripted_upstream, fuzz_router_dir) as protected:
            yield {"admin": throwaway, "client": protected, "anon": protected}
    finally:   # an embedded Redis takes seconds to stop: both at once
        stoppers = [threading.Thread(target=s.client.shutdown, kwargs={"nosave": True}) for s in stores]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join()


# --- strategies ----------------------------------------------------------------------------

def assert_openai_error(r: httpx.Response, req: Req) -> dict:
    where = f"{r.status_code} {r.text[:500]!r}\nfor {req}"
    assert r.headers.get("content-type", "").startswith("application/json"), where
    try:
        body = r.json()
    except ValueError:
        raise AssertionError(f"error body is not JSON: {where}") from None
    assert isinstance(body, dict) and set(body) == {"error"}, where
    err = body["error"]
    assert isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}, where
    assert isinstance(err["message"], str) and err["message"], where
    assert isinstance(err["type"], str) and err["type"], where
    assert err["param"] is None or isinstance(err["param"], str), where
    assert err["code"] is None or isinstance(err["code"], (str, int)), where
    return err


def check(op: Operation, target: Target, mode: str, req: Req, r: httpx.Response) -> None:
    where = f"{r.status_code} {r.text[:500]!r}\nfor {req}"
    assert not 300 <= r.status_code < 400, where
    if r.status_code >= 400:
        err = assert_openai_error(r, req)
        # A path parameter no route takes (a newline in a name) is the router's plain 404.
        unrouted = r.status_code == 404 and err["message"] == "Not Found"
        assert unrouted or op.documents(r.status_code), f"{op.id} does not document {r.status_code}: {where}"
        if r.status_code >= 500:
            asked_timeout = any(name == "x-switchyard-timeout" for name, _ in req.headers)
            allowed = UPSTREAM_5XX if mode == "admin" else {(504, "timeout", None)} if asked_timeout else set()
            # ?check=... on /v1/experts asks the expert's server what it serves
            checks = op.path.startswith("/v1/experts") and "check=" in req.path
            assert (op.calls_experts or checks) and about_experts(r.status_code, err, allowed), \
                f"server error not about an upstream: {where}"
        if r.status_code == 429:
            assert "retry-after" in r.headers, where
        return
    assert 200 <= r.status_code < 300, where
    assert op.documents(r.status_code), f"{op.id} does not document {r.status_code}: {where}"
    if op.admin_only and not req.as_admin:
        raise AssertionError(f"an admin route answered a request without the admin key: {where}")
    if mode == "anon" and op.method != "GET":
        raise AssertionError(f"answered without a key: {where}")
    ctype = r.headers.get("content-type", "")
    if ctype.startswith("application/json"):
        r.json()
    elif ctype.startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]"), where


def record(op: Operation, target: Target, mode: str, req: Req, r: httpx.Response) -> None:
    """Follow the fuzzer's own successful writes on the throwaway gateway."""
    target.seen.setdefault(op.id, []).append(r.status_code)
    if mode != "admin" or not 200 <= r.status_code < 300 or op.method == "GET" or not op.admin_only:
        return
    body = r.json()
    names = target.names
    if op.path.startswith("/v1/experts"):
        if op.method in ("POST", "PUT"):
            names["expert"].add(body["name"])
            target.touched.add(("expert", body["name"]))
        elif op.method == "DELETE":
            names["expert"].discard(body["id"])
            target.touched.add(("expert", body["id"]))
    elif op.path.startswith("/v1/keys"):
        if op.method == "POST":
            names["key"].add(body["id"])
            target.secrets[body["id"]] = body["key"]
        elif op.method == "PATCH":
            target.touched.add(("key", body["id"]))
        elif op.method == "DELETE":
            target.revoked.add(body["id"])
            target.touched.add(("key", body["id"]))
    elif op.path.startswith("/v1/routers"):
        if op.method == "POST":
            names["router"].add(body["name"])
            target.touched.add(("router", body["name"]))
            if body.get("default"):   # a new default clears the old one
                target.touched.update(("router", n) for n in names["router"])
        elif op.method == "DELETE":
            name = body["id"].removeprefix("router:")
            names["router"].discard(name)
            target.touched.add(("router", name))


def _param(op: Operation, mode: str):
    return pytest.param(op, mode, id=f"{mode}-{op.method}-{op.path}")


# --- the tests -----------------------------------------------------------------------------

def test_the_served_schema_is_what_is_fuzzed(targets: dict[str, Target]):
    for target in {id(t): t for t in targets.values()}.values():
        r = target.client.get("/openapi.json")
        assert r.status_code == 200
        assert {op.id for op in operations(r.json())} == {op.id for op in OPS}
    assert len(OPS) >= 19


def test_the_schema_documents_every_body_and_error():
    """Every operation that takes a body declares it (the handlers read the raw request,
    so FastAPI alone would document none), every $ref resolves, no operation documents
    FastAPI's 422 (the gateway answers 400), and the documented errors are OpenAI's shape."""
    schema = app_schema()
    for op in OPS:
        assert (op.body is not None) == op.takes_body, op.id
        assert "422" not in op.statuses and op.statuses & {"200", "201"}, (op.id, op.statuses)
        responses = schema["paths"][op.path][op.method.lower()]["responses"]
        for status, answer in responses.items():
            if status[0] in "45":
                ref = answer["content"]["application/json"]["schema"]["$ref"]
                assert ref == "#/components/schemas/ErrorResponse", (op.id, status)
    text = json.dumps(schema)
    for ref in set(re.findall(r'"\$ref": "([^"]+)"', text)):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schema["components"]["schemas"], ref
    error = schema["components"]["schemas"]["ErrorDetail"]
    assert set(error["properties"]) == {"message", "type", "param", "code"} == set(error["required"])
    assert schema["components"]["schemas"]["NewKey"]["required"] == ["name"]
    chat = schema["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert set(chat) == {"application/json", "text/event-stream"}


def test_a_wrong_method_is_a_405_naming_every_method_of_the_path(targets: dict[str, Target]):
    client = targets["admin"].client
    headers = {"authorization": f"Bearer {ADMIN_KEY}"}
    for path, methods in {"/v1/experts": "GET, POST", "/v1/experts/up-echo": "DELETE, GET, PUT",
                          "/v1/keys/k": "DELETE, GET, PATCH", "/v1/chat/completions": "POST"}.items():
        r = client.request("OPTIONS", path, headers=headers)
        assert r.status_code == 405 and r.headers.get_list("allow") == [methods], (path, r.headers)
        assert r.json()["error"]["type"] == "invalid_request_error"


def _order(op: Operation) -> int:
    """Admin writes first (so the chat routes then call the experts and routers the fuzzer
    registered), deletes last (so every other operation meets the starting data too)."""
    return 2 if op.method == "DELETE" else 0 if op.admin_only and op.takes_body else 1


def send(target: Target, req: Req) -> httpx.Response:
    try:
        return target.client.request(req.method, req.path, headers=req.headers, content=req.body)
    except httpx.HTTPError as exc:
        raise AssertionError(f"the gateway dropped the connection ({exc!r}) for {req}") from None


@pytest.mark.parametrize("op, mode", [_param(op, mode) for mode in MODES for op in sorted(OPS, key=_order)])
def test_fuzz_operation(op: Operation, mode: str, targets: dict[str, Target]):
    target = targets[mode]

    @settings(max_examples=EXAMPLES[mode], deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def fuzz(data: st.DataObject) -> None:
        req = Gen(data, op, target, mode).request()
        note(str(req))
        r = send(target, req)
        check(op, target, mode, req, r)
        record(op, target, mode, req, r)

    fuzz()


@pytest.mark.parametrize("op", [op for op in OPS if op.takes_body], ids=lambda op: op.id)
def test_every_nasty_body_on_every_operation(op: Operation, targets: dict[str, Target]):
    """Each byte string in NASTY_BYTES, as the body of every operation that takes one, with
    the admin key and with the client key: an OpenAI-shaped 4xx every time."""
    for mode in ("admin", "client"):
        target = targets[mode]
        key = ADMIN_KEY if mode == "admin" else CLIENT_KEY
        path = op.path
        for name, where, *_ in op.params:
            if where == "path":
                path = path.replace("{" + name + "}", "nasty")
        for body in NASTY_BYTES:
            req = Req(op.method, path, [("authorization", f"Bearer {key}".encode()),
                                        ("content-type", b"application/json")], body)
            r = send(target, req)
            assert 400 <= r.status_code < 500, f"{r.status_code} {r.text[:300]!r}\nfor {req}"
            assert_openai_error(r, req)


def _chat_works(target: Target, key: str, model: str = "up-echo") -> None:
    r = target.client.post("/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                           json={"model": model, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "hello there"


def test_protected_gateway_is_healthy_and_unchanged(targets: dict[str, Target]):
    target = targets["client"]
    r = target.client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok", r.text
    _chat_works(target, CLIENT_KEY)
    _chat_works(target, CLIENT_KEY, "auto")
    experts, keys, routers = target.snapshot()
    assert experts == target.experts
    assert keys == target.keys
    assert routers == target.routers


def test_throwaway_gateway_holds_exactly_what_the_fuzzer_wrote(targets: dict[str, Target]):
    target = targets["admin"]
    experts, keys, routers = target.snapshot()
    assert set(experts) == target.names["expert"]
    assert set(keys) == target.names["key"]
    assert set(routers) == target.names["router"]
    for kind, now, before in (("expert", experts, target.experts), ("key", keys, target.keys),
                              ("router", routers, target.routers)):
        for name, rec in before.items():
            if (kind, name) not in target.touched:
                assert now[name] == rec, f"{kind} '{name}' changed though no request of the fuzzer wrote it"
    assert {i for i, r in keys.items() if r.revoked_at is not None} == target.revoked


def test_throwaway_gateway_is_healthy_and_serves(targets: dict[str, Target]):
    target = targets["admin"]
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    r = target.client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok", r.text
    r = target.client.put("/v1/experts/after-fuzz", headers=admin, json={
        "name": "after-fuzz", "backend": "openai", "base_url": target.upstream, "served_model": "echo"})
    assert r.status_code in (200, 201), r.text
    _chat_works(target, ADMIN_KEY, "after-fuzz")
    _chat_works(target, CLIENT_KEY, "after-fuzz")


def test_the_fuzzer_got_past_validation(targets: dict[str, Target]):
    """Every operation the fuzzer can build valid requests for (its body's schema known,
    its path parameters naming records it knows) answered at least one admin-mode request
    with a 2xx: the requests are not all bounced at the door."""
    seen = targets["admin"].seen
    buildable = [op for op in OPS if op.id in seen and (op.body is not None or not op.takes_body)
                 and all(param_kind(op, name) for name, where, *_ in op.params if where == "path")]
    missing = [op.id for op in buildable if not any(200 <= s < 300 for s in seen[op.id])]
    assert not missing, {m: sorted(set(seen[m])) for m in missing}


@pytest.mark.parametrize("backend, model, endpoint, body", [
    ("openai", "launch-only", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ("openai", "launch-only", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                       "stream": True}),
    ("openai", "launch-only", "/v1/completions", {"prompt": "hi"}),
    ("collab", "collab:launch-only", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
])
def test_an_expert_without_base_url_is_not_a_500(targets: dict[str, Target], backend: str, model: str,
                                                 endpoint: str, body: dict):
    target = targets["admin"]
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    r = target.client.put("/v1/experts/launch-only", headers=admin, json={
        "name": "launch-only", "backend": backend, "served_model": "m",
        "launch": {"engine": "vllm" if backend == "openai" else "collab", "model_path": "/models/m"}})
    assert r.status_code in (200, 201), r.text
    try:
        req = Req("POST", endpoint, [("authorization", f"Bearer {CLIENT_KEY}".encode())],
                  json.dumps({"model": model, **body}).encode())
        r = send(target, req)
        err = assert_openai_error(r, req)
        assert about_experts(r.status_code, err), f"{r.status_code} {r.text}"
    finally:
        target.client.delete("/v1/experts/launch-only", headers=admin).raise_for_status()


@pytest.mark.parametrize("endpoint, body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/completions", {"prompt": "hi"}),
])
def test_a_stream_of_garbage_is_a_502_or_ends_in_an_error_frame(targets: dict[str, Target], endpoint: str,
                                                                body: dict):
    target = targets["admin"]
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    r = target.client.put("/v1/experts/stream-garbage", headers=admin, json={
        "name": "stream-garbage", "backend": "openai", "base_url": target.upstream, "served_model": "garbage"})
    assert r.status_code in (200, 201), r.text
    try:
        req = Req("POST", endpoint, [("authorization", f"Bearer {CLIENT_KEY}".encode())],
                  json.dumps({"model": "stream-garbage", "stream": True, **body}).encode())
        r = send(target, req)
        if r.status_code == 200:   # README: an upstream failing mid-stream ends in an error frame, then [DONE]
            frames = [ln for ln in r.text.splitlines() if ln]
            assert frames[-1] == "data: [DONE]" and '"error"' in frames[-2], r.text
        else:                      # README: garbage from the upstream is a 502
            assert r.status_code == 502, r.text
            assert assert_openai_error(r, req)["type"] == "upstream_error"
    finally:
        target.client.delete("/v1/experts/stream-garbage", headers=admin).raise_for_status()


def test_absurd_prices_are_refused_and_the_largest_allowed_still_routes_on_quality(targets: dict[str, Target]):
    """1e308 USD per 1M tokens made costs inf and every utility NaN (an arbitrary choice)."""
    target = targets["admin"]
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    names = {log: f"pricey-{expert}" for log, expert in EXPERT_MAP.items()}

    def put(name: str, price: float) -> httpx.Response:
        return target.client.put(f"/v1/experts/{name}", headers=admin, json={
            "name": name, "backend": "openai", "base_url": target.upstream, "served_model": "echo",
            "input_price_per_mtok": price, "output_price_per_mtok": price})

    try:
        for name in names.values():
            r = put(name, 1e308)
            assert r.status_code == 400 and assert_openai_error(r, None)["param"], r.text
            assert put(name, MAX_PRICE_PER_MTOK).status_code in (200, 201)
        r = target.client.post("/v1/routers", headers=admin, json={
            "name": "pricey", "router_dir": str(target.router_dir), "expert_map": names})
        assert r.status_code in (200, 201), r.text
        r = target.client.post("/v1/route", headers=admin, json={
            "model": "router:pricey?lambda=0", "messages": [{"role": "user", "content": POEM_Q}]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert all(c["utility"] is not None for c in body["candidates"].values()), body["candidates"]
        assert body["chosen"] == names["log-poet"], body["chosen"]
    finally:
        target.client.delete("/v1/routers/pricey", headers=admin)
        for name in names.values():
            target.client.delete(f"/v1/experts/{name}", headers=admin)


def test_paths_and_launch_values_a_process_cannot_take_are_400s(targets: dict[str, Target]):
    """A NUL in router_dir made resolving the path raise ValueError: a 500 (found by
    schemathesis, 2026-12-04). A NUL in an expert's launch block, or an environment name
    with '=', was stored and failed only at `switchyard workers up`."""
    target = targets["admin"]
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    r = target.client.post("/v1/routers", headers=admin, json={
        "name": "nul", "router_dir": str(target.router_dir) + "\x00", "expert_map": EXPERT_MAP})
    assert r.status_code == 400 and "router_dir" in assert_openai_error(r, None)["message"], r.text
    expert = {"name": "launchy", "backend": "vllm", "base_url": target.upstream, "served_model": "echo"}
    for launch in ({"model_path": "/m\x00"}, {"model_path": "/m", "args": ["--a\x00"]},
                   {"model_path": "/m", "env": {"A=B": "1"}}, {"model_path": "/m", "env": {"A": "\x00"}}):
        r = target.client.put("/v1/experts/launchy", headers=admin, json={**expert, "launch": launch})
        assert r.status_code == 400 and "launch" in assert_openai_error(r, None)["message"], (launch, r.text)
    assert target.client.get("/v1/experts/launchy", headers=admin).status_code == 404
    assert target.client.get("/v1/routers/nul", headers=admin).status_code == 404
