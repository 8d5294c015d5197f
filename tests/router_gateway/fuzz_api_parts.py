"""The fuzzer of test_fuzz_api.py: the operations read from the app's OpenAPI schema,
the gateways it runs against, and the Hypothesis generator of their requests."""

from __future__ import annotations

import contextlib
import copy
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote

import httpx
from hypothesis import strategies as st

from expert_registry.spec import ExpertSpec
from expert_registry.store import ExpertStore
from router_gateway.app import create_app
from router_gateway.deployments import DeploymentStore, RouterDeployment
from router_gateway.keys import KeyStore
from tests.router_gateway.conftest import ADMIN_KEY, CLIENT_KEY, make_settings, serve_in_thread
from tests.router_gateway.test_routing import EXPERT_MAP, routed_experts


MODES = ("admin", "client", "anon")
EXAMPLES = {"admin": 100, "client": 50, "anon": 15}   # per operation
ADMIN_PREFIXES = ("/v1/experts", "/v1/keys", "/v1/routers", "/v1/usage")   # admin key only, reads included
# The 5xx that are about experts, not the gateway: (status, type, code); None: any code.
UPSTREAM_5XX = {(502, "upstream_error", None), (504, "timeout", None),
                (503, "service_unavailable", "expert_unavailable"), (503, "service_unavailable", "no_healthy_expert"),
                (503, "service_unavailable", "router_unavailable")}


def about_experts(status: int, err: dict, allowed=UPSTREAM_5XX) -> bool:
    return (status, err["type"], None) in allowed or (status, err["type"], err["code"]) in allowed


# --- the operations, from the app's schema ------------------------------------------------

BODILESS = {"POST /v1/responses/{response_id}/cancel"}   # a POST that reads no body (as OpenAI's)


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    tags: tuple[str, ...]
    params: tuple[tuple[str, str, dict, bool], ...]   # (name, in, schema, required)
    body: dict | None                             # JSON schema of the body, None: none declared
    statuses: frozenset[str]                      # the documented answers: "200", "404", "4XX", ...
    root: dict = field(repr=False, compare=False)  # what the body's $refs resolve against

    def documents(self, status: int) -> bool:
        return str(status) in self.statuses or f"{status // 100}XX" in self.statuses

    @property
    def id(self) -> str:
        return f"{self.method} {self.path}"

    @property
    def calls_experts(self) -> bool:
        return self.method == "POST" and "openai" in self.tags

    @property
    def admin_only(self) -> bool:
        return self.path.startswith(ADMIN_PREFIXES)

    @property
    def takes_body(self) -> bool:
        return self.method in ("POST", "PUT", "PATCH") and self.id not in BODILESS


def operations(schema: dict) -> list[Operation]:
    ops = []
    for path, item in schema["paths"].items():
        for method, op in item.items():
            if method not in ("get", "post", "put", "patch", "delete"):
                continue
            params = tuple((p["name"], p["in"], p.get("schema", {}), bool(p.get("required")))
                           for p in op.get("parameters", ()))
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            ops.append(Operation(method.upper(), path, tuple(op.get("tags", ())), params, body,
                                 frozenset(op.get("responses", ())), schema))
    return ops


def app_schema() -> dict:
    """The same schema the served app answers at /openapi.json (checked below), needed
    here to parametrize one test per operation."""
    with tempfile.TemporaryDirectory() as tmp:
        return create_app(make_settings(Path(tmp))).app.openapi()


OPS = operations(app_schema())


# --- the gateways under fuzz -----------------------------------------------------------------

@dataclass
class Target:
    """One gateway under fuzz, and what the fuzzer knows (and did) there."""

    url: str
    store: ExpertStore
    upstream: str
    router_dir: Path
    client: httpx.Client
    secrets: dict[str, str] = field(default_factory=dict)   # managed key name -> secret
    experts: dict[str, ExpertSpec] = field(default_factory=dict)
    keys: dict[str, Any] = field(default_factory=dict)
    routers: dict[str, RouterDeployment] = field(default_factory=dict)
    touched: set[tuple[str, str]] = field(default_factory=set)   # (kind, name) the fuzzer wrote
    revoked: set[str] = field(default_factory=set)
    names: dict[str, set[str]] = field(default_factory=dict)       # expected, by kind
    seen: dict[str, list[int]] = field(default_factory=dict)       # op id -> statuses

    def snapshot(self) -> tuple[dict, dict, dict]:
        keys = KeyStore(self.store.client, self.store.prefix)
        return ({s.name: s for s in self.store.list()}, {r.id: r for r in keys.list()},
                {d.name: d for d in DeploymentStore(self.store).list()})

    def take_initial(self) -> None:
        self.experts, self.keys, self.routers = self.snapshot()
        self.names = {"expert": set(self.experts), "key": set(self.keys), "router": set(self.routers)}
        self.revoked = {i for i, r in self.keys.items() if r.revoked_at is not None}

    def routed_models(self) -> list[str]:
        routers = sorted(self.names["router"]) or ["classifier"]
        return ["auto", *(f"router:{r}" for r in routers), f"router:{routers[0]}?lambda=0.5",
                f"router:{routers[0]}?k=2", f"router:{routers[0]}?min_quality=0.5&max_cost=0.01", "auto?lambda=1e9"]

    def model_names(self) -> list[str]:
        return sorted(self.names["expert"]) + self.routed_models() + list(ODD_MODELS)


ODD_MODELS = ("router:nope", "collab:nope", "up-echo?lambda=1", " up-echo", "router:classifier?lambda=-1",
              "auto?k=999", "router:classifier?k=2&k=3", "nope", "router:classifier?k=", "auto?", "router:?k=1")


FUZZ_SCRIPTED = ("echo", "bad400")   # scripted upstream behaviours that never fail or stall


def fuzz_experts(upstream: str) -> list[ExpertSpec]:
    return routed_experts(upstream) + [
        ExpertSpec(name=f"up-{n}", backend="openai", base_url=upstream, served_model=n,
                   input_price_per_mtok=1.0, output_price_per_mtok=2.0) for n in FUZZ_SCRIPTED]


@contextlib.contextmanager
def fuzz_gateway(data_dir: Path, store: ExpertStore, upstream: str, router_dir: Path) -> Iterator[Target]:
    """A gateway of its own on its own embedded Redis: the scripted experts, the test
    router deployed as the default, three managed keys. Cooldown is off (a fuzzer's
    upstream failures must not take experts out of rotation for the checks after it)."""
    for spec in fuzz_experts(upstream):
        store.put(spec)
    app = create_app(make_settings(data_dir, cooldown_failures=10**9, upstream_timeout_s=30.0), store)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60, follow_redirects=False) as client:
        target = Target(url, store, upstream, router_dir, client)
        admin = {"authorization": f"Bearer {ADMIN_KEY}"}
        r = client.post("/v1/routers", headers=admin, json={
            "name": "classifier", "router_dir": str(router_dir), "expert_map": EXPERT_MAP, "default": True})
        assert r.status_code == 201, r.text
        for key_name, policy in (("limited", {"rpm": 3, "tpm": 200}), ("restricted", {"models": ["up-echo"]}),
                                 ("broke", {"budget_usd": 1e-9, "budget_period": "total"})):
            r = client.post("/v1/keys", headers=admin, json={"name": key_name, **policy})
            assert r.status_code == 201, r.text
            target.secrets[key_name] = r.json()["key"]
        target.take_initial()
        yield target


TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=24)
WEIRD_TEXT = st.sampled_from([
    "", " ", "\x00", "\t\n", "\u202e\u200b\ufeff", "\U0001f600" * 40, "ℌ𝔢𝔩𝔩𝔬", "e\u0301" * 30, "\ud800",
    "\udfff\ud800", "a" * 5000, "../../etc/passwd", "%00%2F", "router:", "collab:", "auto", "null", "[DONE]",
    "data: [DONE]\n\n", "'\"\\", "${jndi:ldap://x}", "<script>", "Ω" * 300, "\r\nx-injected: 1"])
HUGE_NUMBERS = st.sampled_from([2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -2**63 - 1, 10**30, 10**400,
                                -10**400, 1e308, -1e308, 5e-324, -0.0, float("inf"), float("-inf"), float("nan")])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                    TEXT, WEIRD_TEXT, HUGE_NUMBERS)
JUNK = st.recursive(SCALARS, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(TEXT | WEIRD_TEXT, kids,
                                                                                        max_size=4), max_leaves=10)

NASTY_BYTES = [
    b"", b" ", b"{", b"}", b"[", b"{not json", b"NaN", b"Infinity", b"-Infinity", b"null", b"true", b"0", b"-0",
    b'"just a string"', b"[]", b"[1, 2]", b"{}", b"\xef\xbb\xbf{}", b"\x00", b"\xff\xfe{\x00}\x00",
    b'{"model": "up-echo", "messages": [{"role": "user", "content": "\xc3\x28"}]}',   # invalid UTF-8
    b'{"model": "\\ud800", "messages": [{"role": "user", "content": "x"}]}',            # lone surrogate
    b'{"model": "up-echo", "model": 5, "messages": [{"role": "user", "content": "x"}]}',  # duplicate key
    b'{"model": NaN}', b'{"max_tokens": 1e999999}', b'{"n": 123456789012345678901234567890}',
    b'{"model": "up-echo",}', b"{'model': 'up-echo'}", b'{"a":1}{"b":2}', b'{"a":1} trailing',
    b"[" * 5000 + b"]" * 5000, b'{"a":' * 3000 + b"1" + b"}" * 3000, b"[" * 100_000,
    b" " * 70_000 + b"{}",    # over SWITCHYARD_MAX_BODY_BYTES (64 KiB in tests)
]
TIMEOUTS = [b"abc", b"-1", b"0", b"nan", b"inf", b"1e999", b"1e308", b"0.000001", b"0.5", b"30", b"9" * 400, b"0x10"]
ANON_AUTH = [None, ("authorization", b"Bearer"), ("authorization", b"Basic Zm9vOmJhcg=="),
             ("authorization", b"Bearer sy-wrong"), ("authorization", b"bearer " + CLIENT_KEY.encode() + b"x"),
             ("authorization", b"Bearer \xff\xfe\xc3\x28"), ("authorization", b"Token " + ADMIN_KEY.encode()),
             ("api-key", b"sy-wrong"), ("authorization", b"Bearer " + ADMIN_KEY.encode()[:-1])]


@dataclass
class Req:
    method: str
    path: str
    headers: list[tuple[str, bytes]]
    body: bytes | None

    @property
    def as_admin(self) -> bool:
        return ("authorization", b"Bearer " + ADMIN_KEY.encode()) in self.headers

    def __str__(self) -> str:
        body = "(none)" if self.body is None else repr(self.body if len(self.body) <= 600 else
                                                       self.body[:600] + b"...(%d bytes)" % len(self.body))
        return f"{self.method} {self.path}\n  headers: {self.headers}\n  body: {body}"


def pick(values: list, default: Any = "up-echo") -> st.SearchStrategy:
    """One of ``values``, which change as the fuzzer writes: drawn as an index, so that
    what Hypothesis draws has the same shape whatever the gateway holds (it replays and
    shrinks draws, and refuses strategies whose shape depends on outside state)."""
    return st.integers(0, 1023).map(lambda i: values[i * 613 % len(values)] if values else default)


ALWAYS_HINTED = {"backend"}


class Gen:
    """Draws one request for one operation on one target."""

    def __init__(self, data: st.DataObject, op: Operation, target: Target, mode: str):
        self.data, self.op, self.target, self.mode = data, op, target, mode
        self.path_values: dict[str, Any] = {}

    def draw(self, strategy, label: str | None = None):
        return self.data.draw(strategy, label=label)

    def sometimes(self, tenths: int) -> bool:
        """True about tenths/10 of the time (away from 0 and 9, which Hypothesis favours)."""
        return 3 <= self.draw(st.integers(0, 9)) < 3 + tenths

    # values for properties the gateway looks up by name, so that bodies reach past validation
    def hint(self, prop: str):
        t = self.target
        experts = sorted(t.names["expert"]) or ["up-echo"]
        name_like = st.from_regex(r"[a-z0-9][a-z0-9._\-]{0,15}", fullmatch=True)
        hints = {
            "model": st.one_of(pick(t.routed_models()), pick(experts), st.sampled_from(ODD_MODELS)),
            "name": pick(experts + sorted(t.names["router"]) + ["auto", "router:x"]) | name_like,
            # never litellm: importing it takes seconds and it reaches for the network
            "backend": st.sampled_from(["openai", "vllm", "collab"]),
            "base_url": st.sampled_from([t.upstream, t.upstream + "/", "http://127.0.0.1:1/v1", "ftp://x"]),
            "fallbacks": st.lists(pick(experts + ["no-such-expert"]), max_size=2),
            "replicas": st.lists(st.sampled_from([t.upstream + "/", "http://127.0.0.1:1/v1", "ftp://x"]), max_size=2),
            "served_model": st.sampled_from([*FUZZ_SCRIPTED, "fail500", "busy", "garbage", "served-poet"]),
            "api_key": st.none() | st.from_regex(r"[!-~]{1,24}", fullmatch=True) | st.text(max_size=8),
            "router_dir": st.sampled_from([str(t.router_dir)] * 3 + [str(t.router_dir.parent), "/no/such/dir", ".", "/a\x00b"]),
            "expert_map": st.builds(dict, st.just(EXPERT_MAP)) | st.builds(dict, st.just(EXPERT_MAP)) | st.dictionaries(
                st.sampled_from([*EXPERT_MAP, "log-unmapped", "gpt-9"]), pick(experts), max_size=4),
            "aggregator": pick(experts),
            "skills_expert": st.sampled_from([None, None, "up-echo"]),   # the test router reads no skills
            "models": st.lists(pick(t.model_names() + ["*", "router:*", "up-*"]), max_size=3),
            "role": st.sampled_from(["user", "system", "assistant", "tool"]),
            "content": st.sampled_from(["What is 5 plus 17?", "Write a short poem about the ocean."]),
            "request_id": st.from_regex(r"[A-Za-z0-9_-]{1,40}", fullmatch=True),
        }
        return hints.get(prop)

    # a value meant to satisfy a JSON schema (the subset pydantic and FastAPI write)
    def valid(self, schema: Any, depth: int = 0):
        if not isinstance(schema, dict) or depth > 6:
            return self.draw(JUNK)
        if "$ref" in schema:
            return self.valid(self.resolve(schema["$ref"]), depth + 1)
        if "const" in schema:
            return schema["const"]
        if "enum" in schema:
            return self.draw(st.sampled_from(schema["enum"]))
        for combo in ("anyOf", "oneOf"):
            if combo in schema:
                return self.valid(self.draw(st.sampled_from(schema[combo])), depth + 1)
        if "allOf" in schema:
            return self.valid(schema["allOf"][0], depth + 1)
        kind = schema.get("type")
        if isinstance(kind, list):
            kind = self.draw(st.sampled_from(kind))
        if kind == "object" or "properties" in schema:
            out = {}
            required = set(schema.get("required", ()))
            for prop, sub in schema.get("properties", {}).items():
                hint, from_path = self.hint(prop), self.path_values.get(prop)
                known = hint is not None or from_path is not None
                if prop not in required and (self.sometimes(2) if known else self.draw(st.booleans())):
                    continue
                if from_path is not None and not self.sometimes(2):   # PUT /things/{name} {"name": ...}
                    out[prop] = from_path
                elif hint is not None and (prop in ALWAYS_HINTED or not self.sometimes(3)):
                    out[prop] = self.draw(hint, label=prop)
                else:
                    out[prop] = self.valid(sub, depth + 1)
            extra = schema.get("additionalProperties")
            if isinstance(extra, dict) and not schema.get("properties"):
                for k in self.draw(st.lists(TEXT, max_size=3, unique=True)):
                    out[k] = self.valid(extra, depth + 1)
            return out
        if kind == "array":
            items = schema.get("items", {})
            lo = schema.get("minItems", 0)
            n = self.draw(st.integers(lo, max(lo, min(schema.get("maxItems", 3), 3))))
            return [self.valid(items, depth + 1) if items else self.draw(JUNK) for _ in range(n)]
        if kind == "string":
            lo, hi = schema.get("minLength", 0), min(schema.get("maxLength", 40), 40)
            return self.draw(st.text(st.characters(exclude_categories=("Cs",)), min_size=lo, max_size=max(lo, hi)))
        if kind == "integer":
            lo = schema.get("minimum", schema.get("exclusiveMinimum", -2**31 - 1) + 1)
            hi = schema.get("maximum", schema.get("exclusiveMaximum", 2**31 + 1) - 1)
            return self.draw(st.integers(int(lo), int(hi)))
        if kind == "number":
            lo = schema.get("minimum", schema.get("exclusiveMinimum"))
            hi = schema.get("maximum", schema.get("exclusiveMaximum"))
            return self.draw(st.floats(lo, hi, allow_nan=False, allow_infinity=False,
                                       exclude_min="exclusiveMinimum" in schema,
                                       exclude_max="exclusiveMaximum" in schema))
        if kind == "boolean":
            return self.draw(st.booleans())
        if kind == "null":
            return None
        return self.draw(JUNK)

    def resolve(self, ref: str) -> Any:
        node: Any = self.op.root
        for part in ref.lstrip("#/").split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
        return node

    def mutate(self, value: Any) -> Any:
        value = copy.deepcopy(value)   # hints may hand out shared objects (EXPERT_MAP)
        paths = list(_paths(value))
        how = self.draw(st.sampled_from(["retype", "drop", "huge", "unicode", "nest", "wrap", "add"]), label="mutation")
        if how == "wrap" or not paths:
            return self.draw(st.sampled_from([[value], {"data": value}, [value, value], {"": value}]))
        path = self.draw(st.sampled_from(paths), label="at")
        parent = value
        for step in path[:-1]:
            parent = parent[step]
        last = path[-1]
        if how == "drop":
            if isinstance(parent, dict):
                del parent[last]
            else:
                parent.pop(last)
        elif how == "add" and isinstance(parent, dict):
            parent[self.draw(TEXT | WEIRD_TEXT)] = self.draw(JUNK)
        elif how == "huge":
            parent[last] = self.draw(HUGE_NUMBERS)
        elif how == "unicode":
            parent[last] = self.draw(WEIRD_TEXT)
        elif how == "nest":
            depth = self.draw(st.sampled_from([2, 20, 200]))
            nested: Any = self.draw(SCALARS)
            for _ in range(depth):
                nested = [nested] if self.draw(st.booleans()) else {"a": nested}
            parent[last] = nested
        else:
            parent[last] = self.draw(JUNK)
        return value

    def encode(self, value: Any) -> bytes:
        return json.dumps(value, ensure_ascii=self.draw(st.booleans()), allow_nan=True).encode("utf-8", "surrogatepass")

    def body(self) -> bytes | None:
        op = self.op
        if not op.takes_body:
            return self.encode(self.draw(JUNK)) if self.sometimes(1) else None
        kinds = ["valid"] * 4 + ["mutated"] * 3 + ["junk", "bytes", "truncated"]
        if op.body is None:   # a route whose body nobody described: junk only
            kinds = ["object", "junk", "bytes"]
        kind = self.draw(st.sampled_from(kinds), label="body kind")
        if kind == "object":
            return self.encode(self.draw(st.dictionaries(TEXT, JUNK, max_size=5)))
        if kind == "junk":
            return self.encode(self.draw(JUNK))
        if kind == "bytes":
            return self.draw(st.sampled_from(NASTY_BYTES) | st.binary(max_size=64))
        value = self.valid(op.body)
        if kind == "mutated":
            value = self.mutate(value)
        raw = self.encode(value)
        if kind == "truncated":
            raw = raw[:self.draw(st.integers(0, max(0, len(raw) - 1)))]
        return raw

    def path(self) -> str:
        path = self.op.path
        query = []
        for name, where, schema, required in self.op.params:
            if where == "path":
                kind = param_kind(self.op, name)
                known = sorted(self.target.names.get(kind, ())) if kind else []
                how = self.draw(st.sampled_from(["known", "known", "text", "weird"]), label=f"{name} kind")
                value = self.draw(pick(known, "nope") if how == "known" else
                                  st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=30)
                                  if how == "text" else WEIRD_TEXT.filter(bool), label=name)
                self.path_values[name] = value
                path = path.replace("{" + name + "}", quote(str(value), safe="", errors="surrogatepass"))
            elif where == "query" and (required or self.draw(st.booleans())):
                query.append((name, str(self.valid(schema))))
        if self.sometimes(1):
            query.append((self.draw(TEXT), self.draw(TEXT)))
        if query:
            path += "?" + "&".join(f"{quote(k, safe='', errors='surrogatepass')}="
                                  f"{quote(v, safe='', errors='surrogatepass')}" for k, v in query)
        return path

    def headers(self) -> list[tuple[str, bytes]]:
        t, out = self.target, []
        if self.mode == "anon":
            auth = self.draw(st.sampled_from(ANON_AUTH), label="auth")
        elif self.mode == "client":
            secret = self.draw(pick([CLIENT_KEY, *sorted(t.secrets.values())]), label="key")
            auth = self.draw(st.sampled_from([("authorization", b"Bearer " + secret.encode()),
                                              ("api-key", secret.encode())]))
        else:
            auth = ("authorization", b"Bearer " + ADMIN_KEY.encode())
            other = self.draw(pick([CLIENT_KEY, *sorted(t.secrets.values())]))
            if self.sometimes(1):   # a client or managed key on the admin routes
                auth = ("authorization", b"Bearer " + other.encode())
        if auth is not None:
            out.append(auth)
        ctype = self.draw(st.sampled_from([b"application/json", b"application/json", b"text/plain", None,
                                           b"application/json; charset=latin-1", b"multipart/form-data"]))
        if ctype is not None and self.op.takes_body:
            out.append(("content-type", ctype))
        if self.sometimes(2):
            name = self.draw(st.sampled_from(["x-request-id", "x-switchyard-timeout", "x-switchyard-explain"]))
            value = self.draw(st.sampled_from(TIMEOUTS) if name == "x-switchyard-timeout" else
                              st.binary(min_size=1, max_size=200).map(
                                  lambda b: bytes(c if 0x21 <= c <= 0x7e or c >= 0x80 else 0x41 for c in b)))
            out.append((name, value))
        return out

    def request(self) -> Req:
        return Req(self.op.method, self.path(), self.headers(), self.body())


def param_kind(op: Operation, name: str) -> str | None:
    """Which records a path parameter names (its values are drawn from those), or None."""
    return {"name": "router" if op.path.startswith("/v1/routers") else "expert", "key_id": "key", "model": "expert"}.get(name)


def _paths(value: Any, prefix: tuple = ()) -> Iterator[tuple]:
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return
    for k, v in items:
        yield (*prefix, k)
        if len(prefix) < 3:
            yield from _paths(v, (*prefix, k))


# --- checks --------------------------------------------------------------------------------
