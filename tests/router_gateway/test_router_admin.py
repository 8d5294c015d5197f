"""Deploying routers: /v1/routers over HTTP (admin key) and `switchyard routers` as a user
runs it, against a live gateway on the same embedded Redis."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from expert_registry.spec import ExpertSpec
from tests.router_gateway import test_routing as routing_tests
from tests.router_gateway.conftest import ADMIN_KEY, CLIENT_KEY, Gateway
from tests.router_gateway.test_cli import sy
from tests.router_gateway.test_routing import EXPERT_MAP, POEM_Q

# The trained router and the module's gateway ('classifier' deployed as the default).
router_dir = routing_tests.router_dir
routed = routing_tests.routed


def deployment(router_dir: Path, **kw) -> dict:
    return {"name": "extra", "router_dir": str(router_dir), "expert_map": EXPERT_MAP, **kw}


def test_crud_round_trip(routed: Gateway, router_dir: Path):
    with routed.client(ADMIN_KEY) as c:
        r = c.post("/v1/routers", json=deployment(router_dir, lam=0.2))
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["id"] == "router:extra" and body["loaded"] is True and body["router"] == "classifier"
        assert body["excluded"] == {"log-unmapped": "no mapping to a registered expert: excluded from routing"}
        assert body["replaced"] is False and body["lam"] == 0.2
        r = c.post("/v1/routers", json=deployment(router_dir, **{"lambda": 0.7}))  # same name: replaces
        assert r.status_code == 200 and r.json()["replaced"] is True and r.json()["lam"] == 0.7
        listed = {d["name"]: d for d in c.get("/v1/routers").json()["data"]}
        assert set(listed) == {"classifier", "extra"}
        assert listed["classifier"]["default"] is True and listed["extra"]["default"] is False
        got = c.get("/v1/routers/extra").json()
        assert got["expert_map"] == EXPERT_MAP and got["log_models"] == sorted(routing_tests.SCORES)
        assert c.delete("/v1/routers/extra").json()["deleted"] is True
        assert c.get("/v1/routers/extra").status_code == 404
        r = c.delete("/v1/routers/extra")
        assert r.status_code == 404 and "router 'extra' does not exist" in r.json()["error"]["message"]
    with routed.client() as c:
        r = c.post("/v1/chat/completions", json={"model": "router:extra",
                                                 "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_a_new_default_clears_the_old_one(routed: Gateway, router_dir: Path):
    with routed.client(ADMIN_KEY) as c:
        r = c.post("/v1/routers", json=deployment(router_dir, name="cheap", default=True, lam=1000))
        assert r.status_code == 201, r.text
        try:
            listed = {d["name"]: d["default"] for d in c.get("/v1/routers").json()["data"]}
            assert listed == {"classifier": False, "cheap": True}
            with routed.client() as client:
                r = client.post("/v1/chat/completions",
                                json={"model": "auto", "messages": [{"role": "user", "content": POEM_Q}]})
                assert r.headers["x-switchyard-router"] == "cheap"
                assert r.headers["x-switchyard-expert"] == "math-expert"
        finally:
            c.post("/v1/routers", json=deployment(router_dir, name="classifier", default=True)).raise_for_status()
            c.delete("/v1/routers/cheap").raise_for_status()
        assert {d["name"]: d["default"] for d in c.get("/v1/routers").json()["data"]} == {"classifier": True}


@pytest.mark.parametrize("change, needle", [
    ({"expert_map": {"gpt-9": "poet"}}, "log models the router does not know: gpt-9; the router's log models are: "),
    ({"expert_map": {"log-poet": "nobody"}}, "experts that are not registered: nobody; registered experts: "),
    ({"expert_map": {}}, "expert_map needs at least one"),
    ({"expert_map": {"log-poet": "poet", "log-math": "poet"}}, "mapped more than once: poet"),
    ({"router_dir": "/no/such/dir"}, "router_dir '/no/such/dir' does not hold a loadable router"),
    ({"name": "Bad Name!"}, "router name must be a slug"),
    ({"lam": -1}, "'lam'"),
    ({"min_quality": 2}, "'min_quality'"),
    ({"surprise": 1}, "'surprise'"),
])
def test_invalid_deployments_are_400_and_change_nothing(routed: Gateway, router_dir: Path, change, needle):
    with routed.client(ADMIN_KEY) as c:
        r = c.post("/v1/routers", json={**deployment(router_dir), **change})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert needle in err["message"] and err["type"] == "invalid_request_error"
        assert [d["name"] for d in c.get("/v1/routers").json()["data"]] == ["classifier"]
        assert c.get("/health").json()["status"] == "ok"
    with routed.client() as c:  # and routing still works
        r = c.post("/v1/chat/completions", json={"model": "auto", "messages": [{"role": "user", "content": POEM_Q}]})
        assert r.status_code == 200 and r.headers["x-switchyard-expert"] == "poet"


def test_a_folder_that_is_not_a_router_and_bodies_that_are_not_objects(routed: Gateway, tmp_path: Path):
    (tmp_path / "router.json").write_text(json.dumps({"version": 1, "router": "telepathy"}))
    with routed.client(ADMIN_KEY) as c:
        r = c.post("/v1/routers", json=deployment(tmp_path))
        assert r.status_code == 400 and "unknown router 'telepathy'" in r.json()["error"]["message"]
        assert r.json()["error"]["param"] == "router_dir"
        r = c.post("/v1/routers", json=[1, 2])
        assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
        r = c.post("/v1/routers", content=b"{nope", headers={"content-type": "application/json"})
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_collaboration_groups_cannot_be_router_targets(routed: Gateway, router_dir: Path):
    routed.store.put(ExpertSpec(name="duo", backend="collab", base_url="http://127.0.0.1:9/v1", served_model="duo"))
    try:
        with routed.client(ADMIN_KEY) as c:
            r = c.post("/v1/routers", json=deployment(router_dir, expert_map={"log-poet": "duo"}))
            assert r.status_code == 400 and "collaboration groups" in r.json()["error"]["message"]
    finally:
        routed.store.remove("duo")


@pytest.mark.parametrize("key, status", [(None, 401), ("sy-wrong", 401), (CLIENT_KEY, 403)])
def test_admin_key_required(routed: Gateway, router_dir: Path, key, status):
    with routed.client(key) as c:
        for r in (c.get("/v1/routers"), c.post("/v1/routers", json=deployment(router_dir)),
                  c.get("/v1/routers/classifier"), c.delete("/v1/routers/classifier")):
            assert r.status_code == status, r.text
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    with routed.client(ADMIN_KEY) as c:
        assert [d["name"] for d in c.get("/v1/routers").json()["data"]] == ["classifier"]


def test_cli_deploys_lists_and_removes_routers_a_live_gateway_follows(routed: Gateway, router_dir: Path,
                                                                      tmp_path: Path):
    d = routed.data_dir  # the gateway's embedded Redis: the CLI joins it
    map_file = tmp_path / "map.json"
    map_file.write_text(json.dumps({"log-math": "math-expert", "log-general": "generalist"}))
    out = sy(d, "routers", "add", "via-cli", "--router-dir", str(router_dir), "--map-file", str(map_file),
             "--map", "log-poet=poet", "--lambda", "1000", "--max-cost", "0.5").stdout
    assert "deployed router via-cli" in out and "log-poet -> poet" in out
    assert "excluded from routing (no mapping): log-unmapped" in out
    listed = {d["name"]: d for d in json.loads(sy(d, "routers", "list", "--json").stdout)}
    assert listed["via-cli"]["expert_map"] == EXPERT_MAP
    assert listed["via-cli"]["lam"] == 1000 and listed["via-cli"]["max_cost"] == 0.5
    assert "via-cli" in sy(d, "routers", "list").stdout
    with routed.client() as c:
        deadline = time.monotonic() + 10
        while (r := c.post("/v1/chat/completions", json={"model": "router:via-cli", "messages": [
                {"role": "user", "content": POEM_Q}]})).status_code == 404:
            assert time.monotonic() < deadline, "the gateway never loaded the router the CLI deployed"
            time.sleep(0.1)
        assert r.status_code == 200 and r.headers["x-switchyard-expert"] == "math-expert"
    sy(d, "routers", "remove", "via-cli")
    missing = sy(d, "routers", "remove", "via-cli", check=False)
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    assert [x["name"] for x in json.loads(sy(d, "routers", "list", "--json").stdout)] == ["classifier"]


@pytest.mark.parametrize("args, needle", [
    (["--map", "log-poet=nobody"], "not registered: nobody"),
    (["--map", "gpt-9=poet"], "does not know: gpt-9"),
    (["--map", "no-equals-sign"], "must be LOGMODEL=EXPERT"),
    ([], "expert_map needs at least one"),
])
def test_cli_rejects_bad_deployments_clearly(routed: Gateway, router_dir: Path, args, needle):
    proc = sy(routed.data_dir, "routers", "add", "bad", "--router-dir", str(router_dir), *args, check=False)
    assert proc.returncode == 1
    assert needle in proc.stderr and "Traceback" not in proc.stderr
