"""`switchyard fleet eval` end to end: the real gateway app under uvicorn on loopback,
embedded real Redis, the real OpenAI SDK, the real checkers and the real log loader.

The experts' far side is a small scripted OpenAI-compatible server defined here (served
with the conftest's ``serve_in_thread``): it is a transport whose far side is not under
test. It answers by looking up the prompt: served model ``right`` returns the task's
reference ``target``, ``wrong`` returns text that scores 0, ``flaky`` fails with HTTP
500 on the prompts in ``FleetUpstream.fail``. Model quality itself is checked against
real vLLM workers in ``test_vllm_integration.py``.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Iterator

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from typer.testing import CliRunner

from expert_registry.spec import ExpertSpec
from expert_registry.store import ExpertStore
from router_gateway import fleet_eval, fleet_report
from router_gateway.app import create_app
from router_models.logs import ROW_COLUMNS, load_logs
from tests.router_gateway.conftest import CLIENT_KEY, make_settings, serve_in_thread

PER_DOMAIN = 3
DOMAINS = ("arithmetic", "extraction")


class FleetUpstream:
    """An OpenAI-shaped chat server whose answer depends on the served model and the prompt."""

    def __init__(self) -> None:
        self.targets: dict[str, str] = {}
        self.fail: set[str] = set()
        self.calls: list[tuple[str, str]] = []  # (served model, prompt)
        self.app = Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"]),
                                     Route("/v1/models", self.models)])

    def learn(self, items: list[fleet_eval.EvalItem]) -> None:
        self.targets.update({it.task.prompt: it.task.target for it in items})

    async def chat(self, request: Request) -> JSONResponse:
        body = await request.json()
        model, prompt = body["model"], body["messages"][-1]["content"]
        self.calls.append((model, prompt))
        if model == "flaky" and prompt in self.fail:
            return JSONResponse({"error": {"message": "engine crashed", "type": "server_error"}}, status_code=500)
        content = "I cannot help with that." if model == "wrong" else self.targets[prompt]
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(content.split())}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return JSONResponse({"id": "c", "object": "chat.completion", "created": 1, "model": model, "usage": usage,
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": content}}]})

    async def models(self, _: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": m, "object": "model"}
                                                        for m in ("right", "wrong", "flaky")]})


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[FleetUpstream, str]]:
    up = FleetUpstream()
    with serve_in_thread(up.app) as url:
        yield up, url + "/v1"


def fleet_specs(url: str) -> list[ExpertSpec]:
    return [
        ExpertSpec(name="fleet-right", backend="openai", base_url=url, served_model="right", tags=["fleet"],
                   input_price_per_mtok=1.0, output_price_per_mtok=2.0),
        ExpertSpec(name="fleet-wrong", backend="openai", base_url=url, served_model="wrong", tags=["fleet"],
                   input_price_per_mtok=0.5, output_price_per_mtok=0.5),
        ExpertSpec(name="flaky", backend="openai", base_url=url, served_model="flaky"),
    ]


@pytest.fixture
def fleet(store: ExpertStore, data_dir: Path, upstream) -> Iterator[tuple[str, dict[str, ExpertSpec], FleetUpstream]]:
    up, url = upstream
    specs = {s.name: s for s in fleet_specs(url)}
    for s in specs.values():
        store.put(s)
    up.calls.clear()
    up.fail.clear()
    with serve_in_thread(create_app(make_settings(data_dir), store)) as gw:
        yield gw + "/v1", specs, up


def run(gw: str, experts: list[ExpertSpec], items, out: Path) -> fleet_eval.EvalOutcome:
    return asyncio.run(fleet_eval.run_eval(gw, CLIENT_KEY, experts, items, out, concurrency=4, timeout_s=10,
                                           progress=False))


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_rows_are_valid_logs_and_the_report_ranks_the_experts(fleet, tmp_path: Path):
    gw, specs, up = fleet
    items = fleet_eval.build_items(DOMAINS, PER_DOMAIN, seed=0)
    up.learn(items)
    out = tmp_path / "eval" / "heldout.jsonl"
    outcome = run(gw, [specs["fleet-right"], specs["fleet-wrong"]], items, out)
    assert (outcome.written, outcome.skipped, sum(outcome.failed.values())) == (2 * len(items), 0, 0)

    rows = read_rows(out)
    assert len(rows) == 2 * len(items) and all(set(ROW_COLUMNS) | {"response"} == set(r) for r in rows)
    by_id = {it.task.task_id: it for it in items}
    for r in rows:
        spec = specs[r["model"]]
        assert r["task"] == by_id[r["prompt_id"]].task.domain and r["prompt"] == by_id[r["prompt_id"]].task.prompt
        assert r["input_tokens"] == len(r["prompt"].split()) and r["output_tokens"] == len(r["response"].split())
        assert r["cost_usd"] == pytest.approx(spec.cost_usd(r["input_tokens"], r["output_tokens"]))
        assert r["latency_s"] > 0
    logs = load_logs(out, format="rows-jsonl")  # the loader routers are trained with
    assert logs.report.dropped_rows == 0 and not logs.report.counts
    assert (logs.n_prompts, logs.experts) == (len(items), ["fleet-right", "fleet-wrong"])

    report = fleet_report.build_report(out)
    rows_by = {r.name: r for r in report.experts}
    assert report.domains == list(DOMAINS)
    for d in DOMAINS:
        assert rows_by["fleet-right"].domains[d].to_dict() == {"mean": 1.0, "n": PER_DOMAIN}
        assert rows_by["fleet-wrong"].domains[d].to_dict() == {"mean": 0.0, "n": PER_DOMAIN}
        assert report.oracle.domains[d].mean == 1.0
    assert report.best_single == "fleet-right"
    assert rows_by["fleet-right"].mean_cost_usd > 0 and rows_by["fleet-right"].mean_latency_s > 0
    png = fleet_report.plot_heatmap(report, tmp_path / "eval" / "heatmap.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000


def test_a_rerun_asks_only_for_missing_rows(fleet, tmp_path: Path):
    gw, specs, up = fleet
    items = fleet_eval.build_items(("arithmetic",), 4, seed=1)
    assert [it.task.task_id for it in items] == [it.task.task_id for it in fleet_eval.build_items(("arithmetic",), 4, 1)]
    up.learn(items)
    experts = [specs["fleet-right"], specs["fleet-wrong"]]
    out = tmp_path / "rows.jsonl"
    run(gw, experts, items, out)
    assert len(up.calls) == 8

    up.calls.clear()
    again = run(gw, experts, items, out)
    assert up.calls == [] and (again.requested, again.skipped, again.written) == (0, 8, 0)

    rows = read_rows(out)
    dropped, kept = rows[1:4], rows[:1] + rows[4:]
    out.write_text("".join(json.dumps(r) + "\n" for r in kept) + '{"prompt_id": "cut sh')  # and a torn line
    third = run(gw, experts, items, out)
    served = {"right": "fleet-right", "wrong": "fleet-wrong"}
    assert sorted((served[m], p) for m, p in up.calls) == sorted((r["model"], r["prompt"]) for r in dropped)
    assert (third.requested, third.written) == (3, 3)
    pairs = {(r["prompt_id"], r["model"]) for r in read_rows_lenient(out)}
    assert pairs == {(r["prompt_id"], r["model"]) for r in rows}


def read_rows_lenient(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def test_failed_calls_are_counted_not_written_and_retried(fleet, tmp_path: Path):
    gw, specs, up = fleet
    items = fleet_eval.build_items(DOMAINS, 2, seed=0)
    up.learn(items)
    up.fail = {items[0].task.prompt, items[3].task.prompt}
    out = tmp_path / "rows.jsonl"
    outcome = run(gw, [specs["flaky"]], items, out)
    assert dict(outcome.failed) == {"flaky": 2} and outcome.written == len(items) - 2
    assert "502" in outcome.errors[0] or "500" in outcome.errors[0]
    assert {r["prompt_id"] for r in read_rows(out)} == {it.task.task_id for it in items[1:3]}
    up.fail.clear()
    retry = run(gw, [specs["flaky"]], items, out)
    assert (retry.requested, retry.written, sum(retry.failed.values())) == (2, 2, 0)
    assert len(read_rows(out)) == len(items)


def test_code_domain_is_scored_by_the_sandbox(fleet, tmp_path: Path):
    pytest.importorskip("expert_registry.fleet.sandbox")
    gw, specs, up = fleet
    items = fleet_eval.build_items(("code",), 2, seed=0)
    up.learn(items)
    out = tmp_path / "code.jsonl"
    run(gw, [specs["fleet-right"], specs["fleet-wrong"]], items, out)
    report = fleet_report.build_report(out)
    means = {r.name: r.domains["code"].mean for r in report.experts}
    assert means == {"fleet-right": 1.0, "fleet-wrong": 0.0}


def write_handmade(path: Path) -> None:
    """Expert a: 1, 0, 1 on three arithmetic prompts; b: 0, 1, 0.5; c: extraction only."""
    rows = []
    for i, (a, b) in enumerate([(1.0, 0.0), (0.0, 1.0), (1.0, 0.5)]):
        for model, s, cost in (("a", a, 0.02), ("b", b, 0.01)):
            rows.append({"prompt_id": f"p{i}", "prompt": f"prompt {i}", "task": "arithmetic", "model": model,
                         "score": s, "cost_usd": cost, "latency_s": 0.5})
    rows.append({"prompt_id": "e0", "prompt": "extract", "task": "extraction", "model": "a", "score": 0.5})
    rows.append({"prompt_id": "e0", "prompt": "extract", "task": "extraction", "model": "b", "score": 0.0})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_oracle_and_best_single(tmp_path: Path):
    path = tmp_path / "hand.jsonl"
    write_handmade(path)
    report = fleet_report.build_report(path)
    assert report.domains == ["arithmetic", "extraction"]
    assert report.oracle.domains["arithmetic"].to_dict() == {"mean": 1.0, "n": 3}
    assert report.oracle.domains["extraction"].to_dict() == {"mean": 0.5, "n": 1}
    assert report.oracle.overall.mean == pytest.approx(3.5 / 4)
    a, b = report.experts
    assert a.overall.mean == pytest.approx(2.5 / 4) and b.overall.mean == pytest.approx(1.5 / 4)
    assert report.best_single == "a" and a.mean_cost_usd == pytest.approx(0.02)
    only_b = fleet_report.build_report(path, experts=["b"], domains=["arithmetic"])
    assert [r.name for r in only_b.experts] == ["b"] and only_b.oracle.overall.mean == pytest.approx(0.5)


def test_choose_experts_defaults_and_unknown_names():
    specs = fleet_specs("http://127.0.0.1:9/v1")
    assert [s.name for s in fleet_eval.choose_experts(specs, None)] == ["fleet-right", "fleet-wrong"]
    vllm = ExpertSpec(name="v", backend="vllm", base_url="http://127.0.0.1:9/v1", served_model="v")
    assert [s.name for s in fleet_eval.choose_experts([specs[2], vllm], None)] == ["v"]
    with pytest.raises(fleet_eval.UnknownExperts, match="nope.*registered: flaky, fleet-right, fleet-wrong"):
        fleet_eval.choose_experts(specs, ["flaky", "nope"])


# --- the CLI ----------------------------------------------------------------------------
def cli(data_dir: Path, *args: str):
    from router_gateway.cli import app

    env = {"SWITCHYARD_DATA_DIR": str(data_dir), "SWITCHYARD_REDIS_URL": None, "SWITCHYARD_API_KEYS": None,
           "NO_COLOR": "1", "COLUMNS": "200"}
    return CliRunner().invoke(app, ["fleet", "eval", *args], env=env)


def test_cli_report_only_json(tmp_path: Path):
    path = tmp_path / "hand.jsonl"
    write_handmade(path)
    res = cli(tmp_path / "data", "--report-only", "--json", "--out", str(path))
    assert res.exit_code == 0, res.output
    body = json.loads(res.stdout)
    assert set(body) == {"report", "plot"} and Path(body["plot"]) == tmp_path / "heatmap.png"
    assert Path(body["plot"]).stat().st_size > 0
    rep = body["report"]
    assert set(rep) == {"source", "domains", "experts", "oracle", "best_single", "notes"}
    assert rep["domains"] == ["arithmetic", "extraction"] and set(rep["experts"]) == {"a", "b"}
    assert rep["experts"]["a"]["domains"]["arithmetic"] == {"mean": pytest.approx(2 / 3), "n": 3}
    assert rep["best_single"]["expert"] == "a" and rep["oracle"]["overall"]["n"] == 4
    assert {"mean_cost_usd", "mean_latency_s", "overall"} <= set(rep["experts"]["b"])


def test_cli_unknown_expert_is_a_clear_error(store: ExpertStore, data_dir: Path, upstream):
    for s in fleet_specs(upstream[1]):
        store.put(s)
    res = cli(data_dir, "--experts", "fleet-right,ghost", "--domains", "arithmetic", "--per-domain", "1")
    assert res.exit_code == 1
    assert "unknown expert(s): ghost" in res.stderr and "registered: flaky, fleet-right, fleet-wrong" in res.stderr
    assert "Traceback" not in res.output


def test_cli_runs_through_an_in_process_gateway(store: ExpertStore, data_dir: Path, upstream, tmp_path: Path):
    up, url = upstream
    for s in fleet_specs(url):
        store.put(s)
    up.learn(fleet_eval.build_items(("arithmetic",), 2, seed=3))
    out = tmp_path / "cli.jsonl"
    args = ("--domains", "arithmetic", "--per-domain", "2", "--seed", "3", "--no-start-workers",
            "--out", str(out), "--plot", str(tmp_path / "h.png"), "--json")
    res = cli(data_dir, *args)
    assert res.exit_code == 0, res.output
    body = json.loads(res.stdout)
    assert body["run"]["written"] == 4 and body["run"]["failed_total"] == 0
    assert set(body["report"]["experts"]) == {"fleet-right", "fleet-wrong"}  # the 'fleet' tag
    assert body["report"]["best_single"]["expert"] == "fleet-right"
    assert (tmp_path / "h.png").exists() and len(read_rows(out)) == 4
    again = json.loads(cli(data_dir, *args).stdout)
    assert again["run"]["skipped"] == 4 and again["run"]["requested"] == 0


def test_fleet_router_learns_who_wins_where_and_deploys_without_stealing_the_default(store: ExpertStore,
                                                                                      tmp_path: Path):
    from expert_registry.fleet.domains import tasks
    from router_gateway.deployments import DeploymentStore, RouterDeployment
    from router_gateway.fleet_router import NAME, deploy_fleet_router, router_dir, train_fleet_router

    rows = tmp_path / "rows.jsonl"
    with rows.open("w") as fh:
        for domain, winner in (("arithmetic", "math"), ("extraction", "json")):
            for t in tasks(domain, "heldout", 20):
                for model in ("math", "json"):
                    fh.write(json.dumps({"prompt_id": t.task_id, "prompt": t.prompt, "task": domain, "model": model,
                                         "score": float(model == winner), "cost_usd": 1e-6}) + "\n")
    data_dir = tmp_path / "data"
    router = train_fleet_router(rows, router_dir(data_dir))
    fresh = [t.prompt for d in ("arithmetic", "extraction") for t in tasks(d, "heldout", 5, seed=9)]
    q = router.predict_quality(fresh)
    picks = [router.experts_[i] for i in q.argmax(axis=1)]
    assert picks == ["math"] * 5 + ["json"] * 5

    assert deploy_fleet_router(store, data_dir, {"math"}) is None  # one mapped expert is no routing
    assert deploy_fleet_router(store, data_dir, {"math", "json"}) == f"router:{NAME} (also 'auto')"
    deps = DeploymentStore(store)
    assert deps.get(NAME).default and deps.get(NAME).expert_map == {"json": "json", "math": "math"}
    deps.put(RouterDeployment(name="mine", router_dir=str(router_dir(data_dir)), expert_map={"math": "math"},
                              default=True))
    assert deploy_fleet_router(store, data_dir, {"math", "json"}) == f"router:{NAME}"
    assert deps.get("mine").default and not deps.get(NAME).default
    with pytest.raises(ValueError, match="at least 20 prompts"):
        train_fleet_router(_first_rows(rows, tmp_path / "few.jsonl", 8), tmp_path / "r2")


def _first_rows(src: Path, dst: Path, n: int) -> Path:
    dst.write_text("".join(src.read_text().splitlines(keepends=True)[:n]))
    return dst


def test_without_an_evaluation_the_demo_router_is_trained_from_the_shipped_logs(tmp_path: Path):
    """A first `serve --demo` routes among the fleet at once: the router comes from the
    measured rows shipped in the package, and sends each domain to its expert."""
    from expert_registry.fleet.domains import tasks
    from router_gateway.fleet_router import ensure_fleet_router, router_dir, train_fleet_router
    from router_models import load_router

    data_dir = tmp_path / "data"
    assert ensure_fleet_router(data_dir) == "shipped"
    router = load_router(router_dir(data_dir))
    assert set(router.experts_) == {"smollm2-135m", "smollm2-math", "smollm2-code", "smollm2-json"}
    for domain, expert in (("arithmetic", "smollm2-math"), ("code", "smollm2-code"),
                           ("extraction", "smollm2-json")):
        fresh = [t.prompt for t in tasks(domain, "heldout", 10, seed=5)]
        picks = [router.experts_[i] for i in router.predict_quality(fresh).argmax(axis=1)]
        assert picks.count(expert) >= 8, (domain, picks)
    assert ensure_fleet_router(data_dir) == "shipped"  # kept, not retrained

    own = tmp_path / "own.jsonl"  # an evaluation of the user's own replaces it
    own.write_text((data_dir / "fleet" / "shipped_logs.jsonl").read_text())
    train_fleet_router(own, router_dir(data_dir))
    assert ensure_fleet_router(data_dir) == "own"
