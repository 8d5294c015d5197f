"""Smoke tests of the router benchmarks: each script's ``main`` on a tiny hand-made log.

The logs are written with ``write_logs`` in ``tmp_path`` (no ``/work/shared/data``): two
topics, three experts priced apart, where the cheap expert is right on one topic only.
Both scripts run with ``--no-readme`` and write into ``tmp_path``; the tests read the JSON
they wrote and check its keys and that its numbers are sane.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from router_models import featurize
from router_models.logs import write_logs

ROOT = Path(__file__).resolve().parents[2]
CITIES = ["Paris", "Rome", "Lima", "Oslo", "Cairo", "Delhi", "Tokyo", "Quito", "Accra", "Hanoi", "Bern", "Riga"]
# expert -> (cost per call, P(correct) on geography, P(correct) on arithmetic)
EXPERTS = {"small": (1e-4, 0.9, 0.1), "medium": (5e-4, 0.6, 0.8), "large": (2e-3, 0.95, 0.95)}


def _load(name: str):
    if str(ROOT / "benchmarks") not in sys.path:  # where the scripts find _common, as when run
        sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look the module up by name
    spec.loader.exec_module(module)
    return module


def _rows(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        if i % 2:
            task, prompt = "geo", f"Which country has {CITIES[i % len(CITIES)]} as its capital city? ({i})"
        else:
            task, prompt = "math", f"Compute {i * 7 % 97} plus {i * 13 % 89}, then multiply the sum by {i % 9 + 2}."
        for model, (cost, p_geo, p_math) in EXPERTS.items():
            p = p_geo if task == "geo" else p_math
            rows.append({"prompt_id": f"p{i}", "prompt": prompt, "task": task, "model": model,
                         "score": float(rng.random() < p), "cost_usd": cost * (1 + 0.1 * rng.random())})
    return rows


@pytest.fixture
def tiny_logs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    # the scripts swap the process-wide embedding cache for their own file: undo it after
    monkeypatch.setattr(featurize, "_DEFAULT_CACHE", featurize._DEFAULT_CACHE)
    return {"routerbench": write_logs(_rows(60, 0), tmp_path / "rb.jsonl"),
            "llmrouter": write_logs(_rows(48, 1), tmp_path / "lr.jsonl")}


def test_router_quality_smoke(tiny_logs: dict[str, Path], tmp_path: Path) -> None:
    bench = _load("router_quality")
    readme = bench.README.read_text()
    out = tmp_path / "results"
    argv = ["--quick", "--no-readme", "--cv", "1", "--results", str(out), "--cache", str(tmp_path / "emb.sqlite"),
            "--datasets", *(f"{k}={v}" for k, v in tiny_logs.items())]
    assert bench.main(argv) == 0
    assert bench.README.read_text() == readme  # --no-readme leaves it alone
    for name, n in (("routerbench", 60), ("llmrouter", 48)):
        (path,) = out.glob(f"router_quality-{name}-*.json")
        report = json.loads(path.read_text())
        assert {"dataset", "machine", "command", "settings", "reference", "rows", "goals", "timing",
                "plot", "single_experts"} <= report.keys()
        assert report["n_prompts"] == report["n_eval_prompts"] == n
        assert report["settings"]["folds"] == 2
        assert report["reference"]["strong_name"] == "large" and report["reference"]["weak_name"] == "small"
        rows = report["rows"]
        assert set(rows) == {"knn", "classifier-minilm", "classifier-tfidf", "symbolic", "gnn", "random",
                             "best_single", "task_oracle", "oracle"}
        assert rows["task_oracle"]["aiq"] > rows["random"]["aiq"]   # geo -> small, math -> large
        for key, row in rows.items():
            assert {"aiq", "apgr", "cpt50", "cpt80", "cost_to_best_single", "points", "best_quality",
                    "quality_at_half_best_cost", "aiq_folds"} <= row.keys()
            assert 0.0 <= row["aiq"] <= 1.0 and len(row["aiq_folds"]) == 2
            assert row["aiq"] <= rows["oracle"]["aiq"] + 1e-9, key
            assert row["best_quality"] <= rows["oracle"]["best_quality"] + 1e-9, key
        # the cheap expert is right on geography, so a router beats paying for "large" everywhere
        assert rows["oracle"]["cost_to_best_single"] < 0.5
        assert max(rows[r]["aiq"] for r in ("knn", "classifier-minilm", "classifier-tfidf")) > rows["random"]["aiq"]
        assert rows["symbolic"]["aiq"] > rows["random"]["aiq"] and rows["gnn"]["aiq"] > rows["random"]["aiq"]
        assert report["goals"] and all(isinstance(g["met"], bool) and g["detail"] for g in report["goals"])
        named = [g["goal"] for g in report["goals"]]
        assert "symbolic's AIQ above kNN's" in named and "gnn's AIQ above kNN's" in named
        assert "symbolic or graph router's AIQ above the classifier's" in named
        assert report["timing"]["total_s"] > 0 and report["timing"]["embed"]["texts"] == n
        assert report["cost_mae_length_only"] >= 0 and report["mean_cost"] > 0
        assert all(rows[r]["cost_mae"] >= 0 for r in report["routers"])
        assert "the length-only model" in bench.render(report, report)
        assert Path(report["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_benchmarks_hand_a_query_cut_to_every_minilm_router() -> None:
    quality, latency = _load("router_quality"), _load("routing_latency")
    for name in ("knn", "classifier-minilm", "symbolic", "gnn"):
        assert quality.make_router(name, 5, 0, None, 64).query_pieces == 64
        assert quality.make_router(name, 5, 0).query_pieces == 128   # the routers' own default
    tfidf = quality.make_router("classifier-tfidf", 5, 0, None, 64)
    assert tfidf.featurizer == "tfidf" and tfidf.query_pieces == 128   # TF-IDF has no cut to set
    for argv, pieces in ((["--router", "symbolic", "--query-pieces", "64"], 64),
                         (["--query-pieces", "64"], 64), (["--featurizer", "tfidf", "--query-pieces", "64"], 128),
                         (["--router", "gnn"], 128)):
        assert latency.make_router(latency.parse_args(argv)).query_pieces == pieces, argv


def test_task_oracle_routes_each_task_to_its_best_expert_for_the_price() -> None:
    """Task A (3 prompts): both experts right; task B (1 prompt): only the dear one. Knowing
    the task, A goes to the cheap expert and B to the dear one: full quality at 3.25 of the
    dear expert's 10 per query. Without task labels the best it can do is one expert."""
    bench = _load("router_quality")
    from router_models.metrics import reference_points

    S = np.array([[1.0, 1.0]] * 3 + [[0.0, 1.0]])
    C = np.array([[1.0, 10.0]] * 4)
    ref = reference_points(S, C)
    rep = bench.task_oracle(S, C, ["A", "A", "A", "B"], ref)
    assert rep.cost_to_best_single == pytest.approx(0.325)
    assert max(q for c, q in rep.points if c <= 5.0) == 1.0
    blind = bench.task_oracle(S, C, [""] * 4, ref)
    assert blind.cost_to_best_single == pytest.approx(1.0)
    assert max(q for c, q in blind.points if c <= 5.0) == 0.75


def test_routing_latency_smoke(tiny_logs: dict[str, Path], tmp_path: Path) -> None:
    bench = _load("routing_latency")
    readme = bench.README.read_text()
    out = tmp_path / "results"
    argv = ["--no-readme", "--logs", str(tiny_logs["routerbench"]), "--train-prompts", "40", "--cv", "1",
            "-c", "1", "4", "-d", "1", "--warmup", "0.2", "--results", str(out),
            "--cache", str(tmp_path / "emb.sqlite")]
    assert bench.main(argv) == 0
    assert bench.README.read_text() == readme
    (path,) = out.glob("routing_latency-*.json")
    report = json.loads(path.read_text())
    assert {"machine", "command", "settings", "cells", "goal", "router"} <= report.keys()
    assert report["settings"]["queries_from"].startswith("held-out")
    cells = {(c["mode"], c["concurrency"]): c for c in report["cells"]}
    assert set(cells) == {(m, c) for m in ("batched", "unbatched") for c in (1, 4)}
    for cell in cells.values():
        assert cell["decisions"] > 0 and cell["decisions_per_s"] > 0
        assert 0 < cell["p50_ms"] <= cell["p90_ms"] <= cell["p99_ms"] <= cell["max_ms"]
        assert cell["cache_hits"] == 0  # repeat ratio 0: every query is new to the scorer
    assert cells[("unbatched", 4)]["mean_batch"] == 1.0
    assert 2 < report["router"]["query_tokens"]["p50"] <= report["router"]["query_tokens"]["p99"] <= 256
    if Path("/proc/stat").exists():
        assert all(c["other_cores_busy"] >= 0 for c in cells.values())
    assert isinstance(report["goal"]["met"], bool)


def test_new_expert_smoke(tiny_logs: dict[str, Path], tmp_path: Path) -> None:
    bench = _load("new_expert")
    readme = bench.README.read_text()
    out = tmp_path / "results"
    argv = ["--logs", str(tiny_logs["routerbench"]), "--holdout", "medium", "--ns", "0", "10", "--seed", "0", "1",
            "--no-readme",
            "--results", str(out), "--cache", str(tmp_path / "emb.sqlite")]
    assert bench.main(argv) == 0
    assert bench.README.read_text() == readme
    (path,) = out.glob("new_expert-*.json")
    report = json.loads(path.read_text())
    assert report["holdouts"] == ["medium"] and report["ns"] == [0, 10] and report["seeds"] == [0, 1]
    assert {r["seed"] for r in report["rows"]} == {0, 1}   # one split per seed
    without = {(r["router"], r["seed"]): r["aiq"] for r in report["rows"] if r["n"] is None}  # each router without it
    assert sorted(without) == [("classifier", 0), ("classifier", 1), ("gnn", 0), ("gnn", 1)]
    assert all(0.0 < a <= 1.0 for a in without.values())
    rows = [r for r in report["rows"] if r["n"] is not None and r["seed"] == 0]
    # no fine-tuning without examples: gnn-ft only at N=10
    assert sorted((r["n"], r["router"]) for r in rows) == [(0, "classifier"), (0, "gnn"), (10, "classifier"),
                                                            (10, "gnn"), (10, "gnn-ft")]
    table = bench.render(report["rows"], report, "r.json", "r.png", [0, 10])
    g, c = (np.mean([without[(r, s)] for s in (0, 1)]) for r in ("gnn", "classifier"))
    assert f"| without it | - | - | - | - | - | - | {g:.4f} | - | {c:.4f} |" in table
    assert f"| medium | without it | - | - | - | {g:.4f} |" in table
    # what adding it does: with minus without, per split, for each router (gnn-ft against gnn's without)
    ten = {(r["router"], r["seed"]): r["aiq"] for r in report["rows"] if r["n"] == 10}
    gains = [ten[("gnn-ft", s)] - without[("gnn", s)] for s in (0, 1)]
    assert bench.gains_over_without(report["rows"], "gnn-ft", 10) == pytest.approx(gains)
    assert f"{np.mean(gains):+.4f} ({min(gains):+.4f})" in table.split("What adding")[1]
    rows = [r for r in report["rows"] if r["n"] is not None]
    ten = {r["router"]: r for r in rows if r["n"] == 10}
    assert ten["gnn-ft"]["mae"] != ten["gnn"]["mae"]        # the fine-tuning moved the new expert
    for r in rows:
        assert 0.0 <= r["mae"] <= 1.0 and 0.0 <= r["brier"] <= r["mae"] + 1e-9 and 0.0 < r["aiq"] <= 1.0
    assert (out / path.name.replace(".json", ".png")).read_bytes()[:4] == b"\x89PNG"


def _llmrouter_layout(rows: list[dict], d: Path) -> Path:
    """``rows`` written in LLMRouter's layout: queries, per-prompt scores, models.json with
    a description and prices per expert."""
    d.mkdir()
    prompts = {r["prompt_id"]: r for r in rows}
    with (d / "queries_train.jsonl").open("w") as f:
        for r in prompts.values():
            f.write(json.dumps({"task_name": r["task"], "query": r["prompt"], "ground_truth": "x", "metric": "em"}) + "\n")
    scores = [{"question": r["prompt"], "scores": {x["model"]: x["score"] for x in rows if x["prompt_id"] == pid}}
              for pid, r in prompts.items()]
    (d / "scores_train.json").write_text(json.dumps(scores))
    (d / "models.json").write_text(json.dumps({m: {"feature": f"The {m} test model.", "input_price": c * 1e4,
                                                   "output_price": c * 2e4} for m, (c, _, _) in EXPERTS.items()}))
    return d


def test_new_expert_gives_the_graph_router_the_logs_expert_descriptions(tmp_path: Path, monkeypatch) -> None:
    from router_models.graph import GraphRouter

    monkeypatch.setattr(featurize, "_DEFAULT_CACHE", featurize._DEFAULT_CACHE)
    bench = _load("new_expert")
    logs = _llmrouter_layout(_rows(60, 2), tmp_path / "llmrouter")
    seen: dict[str, object] = {}
    add_expert = GraphRouter.add_expert

    def spy(self, name, *a, **k):
        seen["fitted_with"], seen["added"] = dict(self.descriptions or {}), k.get("description")
        return add_expert(self, name, *a, **k)
    monkeypatch.setattr(GraphRouter, "add_expert", spy)
    out = tmp_path / "results"
    assert bench.main(["--logs", str(logs), "--holdout", "medium", "--ns", "0", "--no-readme", "--results", str(out),
                       "--cache", str(tmp_path / "emb.sqlite")]) == 0
    assert seen["added"] == "The medium test model."
    assert seen["fitted_with"]["small"] == "The small test model."
    report = json.loads(next(out.glob("new_expert-*.json")).read_text())
    assert report["dataset"] == "llmrouter" and "descriptions" in report["described"]
    assert bench.markers("llmrouter") == ("<!-- new-expert:llmrouter:begin -->", "<!-- new-expert:llmrouter:end -->")
    assert bench.markers("routerbench") == bench.MARKERS


def _seed_report(path: Path, seed: int, aiq_folds: dict[str, list[float]], **settings) -> Path:
    """A router_quality.py results file with only what router_quality_seeds.py reads."""
    report = {"dataset": "routerbench", "date": f"2026-12-05 1{seed}:00 UTC", "commit": "abc1234",
              "machine": {"cpu": "test CPU"},
              "settings": {"folds": 3, "seed": seed, "cv": 5, "max_prompts": None, "routers": list(aiq_folds)}
              | settings, "rows": {r: {"aiq": float(np.mean(f)), "aiq_folds": f} for r, f in aiq_folds.items()}}
    path.write_text(json.dumps(report))
    return path


def test_router_quality_seeds_pools_the_folds_of_every_seed(tmp_path: Path) -> None:
    bench = _load("router_quality_seeds")
    readme = bench.README.read_text()
    res = tmp_path / "results"
    res.mkdir()
    for seed in (0, 1):   # symbolic is 0.01 above knn in every fold; gnn and the classifier trade places
        _seed_report(res / f"router_quality-routerbench-2026120{5 + seed}T000000Z.json", seed, {
            "knn": [0.80, 0.81, 0.82], "classifier-minilm": [0.85, 0.84, 0.86],
            "symbolic": [0.81, 0.82, 0.83], "gnn": [0.86, 0.83, 0.86 - 0.02 * seed]})
    old = _seed_report(res / "router_quality-routerbench-20261201T000000Z.json", 1, {"knn": [0.5] * 3})
    other = _seed_report(res / "router_quality-routerbench-20261208T000000Z.json", 2, {"knn": [0.5] * 2}, folds=2)
    with pytest.raises(SystemExit, match="at least two seeds"):   # the newest file sets the settings
        bench.pick("routerbench", res)
    with pytest.raises(SystemExit, match="differ"):
        bench.pick("routerbench", res, [old, other])
    other.unlink()   # now the newest run of each seed is picked, not the older seed-1 one

    assert bench.main(["--datasets", "routerbench", "--results", str(res), "--no-readme"]) == 0
    assert bench.README.read_text() == readme
    (out,) = res.glob("router_quality_seeds-routerbench-*.json")
    s = json.loads(out.read_text())
    assert s["seeds"] == [0, 1] and s["aiq"]["knn"] == pytest.approx([0.81, 0.81])
    comps = {(c["a"], c["b"]): c for c in s["comparisons"]}
    assert set(comps) == {("classifier-minilm", "knn"), ("symbolic", "knn"), ("gnn", "knn"),
                          ("symbolic", "classifier-minilm"), ("gnn", "classifier-minilm")}
    sym = comps["symbolic", "knn"]
    assert sym["mean"] == pytest.approx(0.01) and sym["folds"] == 6 and sym["folds_above"] == 6
    assert sym["reading"] == "above" and sym["seeds_above"] == 2
    assert comps["symbolic", "classifier-minilm"]["reading"] == "below"
    gnn = comps["gnn", "classifier-minilm"]   # +0.01 -0.01 0 +0.01 -0.01 -0.02
    assert gnn["mean"] == pytest.approx(-0.02 / 6) and gnn["reading"] == "tie"
    assert gnn["folds_above"] == 2 and gnn["seeds_above"] == 0   # seed 0: equal, not above
    assert s["goal"]["met"] is False and s["goal"]["top"] == "gnn"
    assert Path(s["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = bench.render(s, "cmd")
    assert "| gnn - classifier-minilm | -0.0033 ± " in text and "**tie**" in text and "mixed" not in text

    with pytest.raises(SystemExit, match="at least two seeds"):
        bench.pick("routerbench", res, [res / "router_quality-routerbench-20261205T000000Z.json"])
    with pytest.raises(SystemExit, match="same seed"):
        bench.pick("routerbench", res, [res / "router_quality-routerbench-20261206T000000Z.json", old])
