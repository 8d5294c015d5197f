"""/v1/experts over HTTP (admin key), and the registry surviving a restart."""

from __future__ import annotations

import os
import time

import pytest

from expert_registry.store import ExpertStore, open_redis
from router_gateway.app import create_app
from tests.router_gateway.conftest import ADMIN_KEY, CLIENT_KEY, Gateway, make_settings, serve_in_thread

SPEC = {"name": "new-expert", "backend": "vllm", "base_url": "http://127.0.0.1:9999/v1",
        "served_model": "smol", "input_price_per_mtok": 0.1, "output_price_per_mtok": 0.2,
        "context_window": 2048, "tokenizer": "smollm2", "tags": ["demo"],
        "launch": {"model_path": "/models/smol", "port": 9999, "args": ["--max-model-len", "2048"]}}


def test_crud_round_trip(gateway: Gateway):
    with gateway.client(ADMIN_KEY) as c:
        r = c.post("/v1/experts", json=SPEC)
        assert r.status_code == 201, r.text
        assert r.json()["launch"]["port"] == 9999
        assert c.post("/v1/experts", json=SPEC).status_code == 409
        got = c.get("/v1/experts/new-expert").json()
        assert got["served_model"] == "smol" and got["tags"] == ["demo"]
        names = [e["name"] for e in c.get("/v1/experts").json()["data"]]
        assert "new-expert" in names
        r = c.put("/v1/experts/new-expert", json={**SPEC, "output_price_per_mtok": 0.5})
        assert r.status_code == 200 and r.json()["output_price_per_mtok"] == 0.5
        assert gateway.store.get("new-expert").output_price_per_mtok == 0.5
        # PUT creates too, and the path may contain a slash
        r = c.put("/v1/experts/org/model", json={k: v for k, v in SPEC.items() if k != "name"})
        assert r.status_code == 201 and r.json()["name"] == "org/model"
        assert c.delete("/v1/experts/new-expert").json()["deleted"] is True
        assert c.get("/v1/experts/new-expert").status_code == 404
        assert c.delete("/v1/experts/new-expert").status_code == 404
    with pytest.raises(KeyError):
        gateway.store.get("new-expert")


def test_new_expert_is_routable_at_once(gateway: Gateway, scripted_upstream: str):
    with gateway.client(ADMIN_KEY) as c:
        c.post("/v1/experts", json={"name": "fresh", "backend": "openai", "base_url": scripted_upstream,
                                    "served_model": "echo"}).raise_for_status()
    with gateway.client() as c:
        r = c.post("/v1/chat/completions", json={"model": "fresh", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 200 and r.json()["model"] == "fresh"


def test_check_asks_the_server_what_it_serves(gateway: Gateway, scripted_upstream: str):
    """?check=true: the scripted upstream lists one model, echo, with max_model_len 2048."""
    spec = {"name": "checked", "backend": "openai", "base_url": scripted_upstream, "served_model": "echo"}
    with gateway.client(ADMIN_KEY) as c:
        r = c.post("/v1/experts?check=true", json={**spec, "served_model": "ecco"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_served"
        assert "it serves echo" in r.json()["error"]["message"] and r.json()["error"]["param"] == "served_model"
        r = c.post("/v1/experts?check=true", json=spec)
        assert r.status_code == 201 and r.json()["context_window"] == 2048
        r = c.put("/v1/experts/checked?check=true", json={**spec, "context_window": 1024})
        assert r.status_code == 200 and r.json()["context_window"] == 1024     # given: kept
        r = c.post("/v1/experts?check=true", json={**spec, "name": "gone", "base_url": "http://127.0.0.1:9/v1"})
        assert r.status_code == 502 and r.json()["error"]["code"] == "expert_check_failed"
        assert c.post("/v1/experts", json={**spec, "name": "unchecked", "served_model": "ecco"}).status_code == 201
    assert "gone" not in {s.name for s in gateway.store.list()}


def test_upstream_keys_are_never_shown(gateway: Gateway):
    with gateway.client(ADMIN_KEY) as c:
        c.post("/v1/experts", json={**SPEC, "api_key": "sk-secret"}).raise_for_status()
        listed = c.get("/v1/experts").text + c.get("/v1/experts/new-expert").text
    assert "sk-secret" not in listed


@pytest.mark.parametrize("key, status", [(None, 401), ("sy-wrong", 401), (CLIENT_KEY, 403)])
def test_admin_key_required(gateway: Gateway, key, status):
    with gateway.client(key) as c:
        for r in (c.get("/v1/experts"), c.post("/v1/experts", json=SPEC), c.delete("/v1/experts/echo")):
            assert r.status_code == status, r.text
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert gateway.store.get("echo")  # nothing was deleted


@pytest.mark.parametrize("body, needle", [
    ({**SPEC, "backend": "tgi"}, "'backend'"),
    ({**SPEC, "name": "auto"}, "'name'"),
    ({**SPEC, "name": "router:x"}, "'name'"),
    ({**SPEC, "base_url": "ftp://x"}, "'base_url'"),
    ({**SPEC, "input_price_per_mtok": -1}, "'input_price_per_mtok'"),
    ({**SPEC, "launch": {"model_path": "/m", "port": 70000}}, "'launch.port'"),
    ({**SPEC, "surprise": 1}, "'surprise'"),
    ({**SPEC, "api_key": "sk-\u20acuro"}, "api_key must be printable ASCII"),        # could not be sent at all
    ({**SPEC, "api_key": "sk-1\r\nx-injected: 1"}, "api_key must be printable ASCII"),   # would split the header
    ({**SPEC, "api_key": ""}, "api_key must be printable ASCII"),
    ({k: v for k, v in SPEC.items() if k not in ("base_url", "launch")}, "needs base_url"),
    ([1, 2], "JSON object"),
])
def test_invalid_specs_are_400(gateway: Gateway, body, needle):
    with gateway.client(ADMIN_KEY) as c:
        r = c.post("/v1/experts", json=body)
        assert r.status_code == 400, r.text
        assert needle in r.json()["error"]["message"]
        assert c.put("/v1/experts/other", json={**SPEC, "name": "different"}).status_code == 400
        assert c.get("/health").json()["status"] == "ok"


def test_registry_survives_gateway_and_redis_restart(tmp_path):
    import httpx

    data_dir = tmp_path / "data"
    auth = {"authorization": f"Bearer {ADMIN_KEY}"}
    with serve_in_thread(create_app(make_settings(data_dir))) as url:
        httpx.post(url + "/v1/experts", json=SPEC, headers=auth).raise_for_status()
    # Stop the embedded Redis server itself, as a machine restart would ...
    client = open_redis(None, data_dir)
    pid = client.pid
    client.shutdown(nosave=True)  # no final save: the append-only file must carry the write
    deadline = time.monotonic() + 10
    while _alive(pid):
        assert time.monotonic() < deadline, "embedded redis did not stop"
        time.sleep(0.05)
    # ... and a fresh gateway on the same data dir (which starts a new server) still has the expert.
    with serve_in_thread(create_app(make_settings(data_dir))) as url:
        r = httpx.get(url + "/v1/experts/new-expert", headers=auth)
        assert r.status_code == 200 and r.json()["served_model"] == "smol"
    fresh = open_redis(None, data_dir)
    try:
        assert fresh.pid != pid
        assert ExpertStore(fresh).get("new-expert").launch.port == 9999
    finally:
        fresh.shutdown(nosave=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is not alive
        return f.read().split()[2] != "Z"
