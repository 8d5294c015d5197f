"""`switchyard train` / `switchyard eval` as a user runs them, on hand-made logs."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from router_models.logs import write_logs
from tests.router_gateway.test_cli import sy

EXPERTS = {"cheap-math": 0.0001, "dear-all": 0.002, "mid-poet": 0.0004}


def _rows(n: int, seed: int) -> list[dict]:
    """Arithmetic prompts: cheap-math and dear-all right, mid-poet wrong. Poems: mid-poet and
    dear-all right. A little noise so no expert is perfect everywhere."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        math = i % 2 == 0
        prompt = (f"compute {rng.randint(2, 99)} plus {rng.randint(2, 99)} and give the sum"
                  if math else f"write a short poem about the {rng.choice(['sea', 'moon', 'rain', 'city'])} and the number {i}")
        truth = {"cheap-math": math, "dear-all": rng.random() < 0.9, "mid-poet": not math}
        for model, cost in EXPERTS.items():
            right = truth[model] if rng.random() > 0.05 else not truth[model]
            rows.append({"prompt_id": f"p{seed}-{i}", "prompt": prompt, "task": "math" if math else "poem",
                         "model": model, "score": float(right), "cost_usd": cost})
    return rows


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("logs")
    train, test = d / "train.jsonl", d / "test.csv"
    write_logs(_rows(80, 1), train)
    write_logs(_rows(40, 2), test)
    return train, test


def test_train_then_eval_json_layout_and_plot(tmp_path: Path, logs):
    train, test = logs
    out = tmp_path / "clf"
    proc = sy(tmp_path / "data", "train", "--logs", str(train), "--router", "classifier", "--featurizer", "tfidf",
              "--cv", "3", "--out", str(out))
    assert "trained ClassifierRouter" in proc.stdout and "model selection by cross-validation" in proc.stdout
    assert "kind=logreg" in proc.stdout and "chosen" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["arrays.safetensors", "router.json"]
    plot = tmp_path / "curve.png"
    res = json.loads(sy(tmp_path / "data", "eval", "--router-dir", str(out), "--logs", str(test), "--json",
                        "--plot", str(plot)).stdout)
    assert set(res) == {"router", "baselines", "data"}
    keys = {"name", "aiq", "apgr", "cpt50", "cpt80", "cost_to_best_single", "points"}
    assert keys <= set(res["router"]) and res["router"]["name"] == "classifier"
    assert set(res["baselines"]) == {"random", "best_single", "oracle"}
    assert all(keys <= set(b) for b in res["baselines"].values())
    assert res["data"] == {"prompts": 40, "experts": sorted(EXPERTS), "dropped_rows": 0}
    # The signal is learnable: the router beats random, stays under the oracle, and
    # matches the best single expert's quality for less than its cost.
    r, b = res["router"], res["baselines"]
    assert b["random"]["aiq"] < r["aiq"] <= b["oracle"]["aiq"] + 1e-9
    assert r["cost_to_best_single"] is not None and r["cost_to_best_single"] < 0.8
    costs = [c for c, _ in r["points"]]
    assert costs == sorted(costs) and len(costs) >= 2
    assert plot.stat().st_size > 10_000


def test_train_holdout_and_eval_table(tmp_path: Path, logs):
    train, _ = logs
    out = tmp_path / "knn"
    sy(tmp_path / "data", "train", "--logs", str(train), "--router", "knn", "--param", "k=5", "--holdout", "0.25",
       "--query-pieces", "64", "--query-keep", "head", "--out", str(out))
    meta = json.loads((out / "router.json").read_text())
    assert meta["params"] == {"k": 5, "query_pieces": 64, "query_keep": "head"}  # --param and the cut reached it
    assert meta["state"]["featurizer"] == {"name": "minilm", "max_pieces": 64, "keep": "head"}
    held = out / "heldout.jsonl"
    assert held.is_file()
    table = sy(tmp_path / "data", "eval", "--router-dir", str(out), "--logs", str(held)).stdout
    for word in ("knn", "random", "best_single", "oracle", "AIQ", "APGR", "20 prompts"):
        assert word in table
    # The whole training file: the 60 prompts it trained on are left out.
    both = sy(tmp_path / "data", "eval", "--router-dir", str(out), "--logs", str(train)).stdout
    assert "60 prompts were in the router's training logs" in both and "20 prompts" in both
    # Logs it was trained on only: nothing left to evaluate, and the error says why.
    seen = tmp_path / "seen.jsonl"
    held_ids = {json.loads(line)["prompt_id"] for line in held.read_text().splitlines()}
    write_logs([r for r in _rows(80, 1) if r["prompt_id"] not in held_ids], seen)
    proc = sy(tmp_path / "data", "eval", "--router-dir", str(out), "--logs", str(seen), check=False)
    assert proc.returncode == 1 and "in the router's training logs" in proc.stderr and "--holdout" in proc.stderr


def test_train_symbolic_prints_its_model_selection(tmp_path: Path, logs):
    # The symbolic router's cross-validation rows name "params", the classifier's "model":
    # the summary after training prints either, best first, the chosen one marked.
    train, _ = logs
    out = tmp_path / "sym"
    proc = sy(tmp_path / "data", "train", "--logs", str(train), "--router", "symbolic", "--cv", "3",
              "--out", str(out))
    meta = json.loads((out / "router.json").read_text())
    rows = meta["state"]["cv_results"]
    assert len(rows) > 5 and "trained SymbolicRouter" in proc.stdout
    text = proc.stdout
    assert "model selection by cross-validation" in text and f"{len(rows) - 5} more candidates" in text
    first = text[text.index("candidate"):text.index("chosen")]   # the chosen row, maybe wrapped
    assert all(f"{k}={v}" in first for k, v in meta["state"]["params"].items())
    shown = [float(a) for a in re.findall(r"│ (\d\.\d{4}) │ \d\.\d{4} │", text)]
    assert len(shown) == 5 and shown == sorted(shown, reverse=True)
    assert shown[0] == round(max(r["aiq"] for r in rows), 4)


def test_loading_warns_when_many_rows_are_dropped(tmp_path: Path):
    rows = _rows(20, 4)
    for r in rows[::2]:
        r["score"] = 100.0 * r["score"] + 50.0   # half of them on a 0-100 scale: dropped
    logs = write_logs(rows, tmp_path / "half.jsonl")
    proc = sy(tmp_path / "data", "train", "--logs", str(logs), "--router", "knn", "--out", str(tmp_path / "k"))
    assert "warning: 30 of 60 rows (50%) were dropped" in proc.stdout and "divide them by 100" in proc.stdout
    clean = sy(tmp_path / "data", "train", "--logs", str(write_logs(_rows(20, 4), tmp_path / "ok.jsonl")),
               "--router", "knn", "--out", str(tmp_path / "k2"))
    assert "warning" not in clean.stdout


@pytest.mark.parametrize("args, message", [
    (["train", "--logs", "missing.jsonl", "--router", "knn", "--out", "x"], "no such logs"),
    (["train", "--logs", "{train}", "--router", "nope", "--out", "x"], "unknown router 'nope'"),
    (["train", "--logs", "{train}", "--router", "knn", "--out", "x", "--format", "parquet-ish"], "parquet-ish"),
    (["eval", "--router-dir", "{tmp}", "--logs", "{train}"], "not a router directory"),
    (["train", "--logs", "{train}", "--router", "knn", "--out", "x", "--param", "depth=3"],
     "the knn router has no such hyper-parameter; it has: k, query_pieces, query_keep"),
    (["train", "--logs", "{train}", "--router", "knn", "--out", "x", "--query-pieces", "300"],
     "query_pieces=300: expected a whole number from 2 to 256"),
    (["train", "--logs", "{train}", "--router", "symbolic", "--out", "x", "--query-keep", "middle"],
     "query_keep='middle': expected one of head, tail"),
    (["train", "--logs", "{train}", "--router", "classifier", "--featurizer", "tfidf", "--out", "x",
      "--query-pieces", "64"], "--featurizer tfidf reads the whole query"),
    (["train", "--logs", "{train}", "--router", "knn", "--out", "x", "--param", "k"], "must be NAME=VALUE"),
    (["train", "--logs", "{train}", "--router", "knn", "--out", "x", "--param", "k=0"], "k must be >= 1"),
])
def test_bad_input_is_a_clear_error(tmp_path: Path, logs, args, message):
    train, _ = logs
    args = [a.format(train=train, tmp=tmp_path) for a in args]
    proc = sy(tmp_path / "data", *args, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_calibrate_hits_a_target_spend(tmp_path: Path, logs):
    import re

    train, test = logs
    out = tmp_path / "clf"
    sy(tmp_path / "data", "train", "--logs", str(train), "--router", "classifier", "--featurizer", "tfidf",
       "--model", "logreg", "--cv", "0", "--out", str(out))
    for target in ("0.0003", "0.001"):
        text = sy(tmp_path / "data", "calibrate", "--router-dir", str(out), "--logs", str(test),
                  "--target-spend", target).stdout
        spend = float(re.search(r"predicted spend \$([0-9.]+)/query", text).group(1))
        assert spend <= float(target) and "--lambda" in text
    text = sy(tmp_path / "data", "calibrate", "--router-dir", str(out), "--logs", str(test),
              "--strong-share", "0.2", "--threshold").stdout
    share = float(re.search(r"([0-9.]+)% of calls to", text).group(1))
    assert share <= 20.0 and "--min-quality" in text
    bad = sy(tmp_path / "data", "calibrate", "--router-dir", str(out), "--logs", str(test), check=False)
    assert bad.returncode == 1 and "exactly one of" in bad.stderr


def test_add_expert_to_a_graph_router(tmp_path: Path, logs):
    train, test = logs
    two = tmp_path / "two.jsonl"
    write_logs([r for r in _rows(80, 1) if r["model"] != "mid-poet"], two)
    out = tmp_path / "gnn"
    sy(tmp_path / "data", "train", "--logs", str(two), "--router", "gnn", "--param", "epochs=40",
       "--param", "hidden=16", "--param", "k=5", "--out", str(out), timeout=600)
    assert json.loads((out / "router.json").read_text())["experts"] == ["cheap-math", "dear-all"]
    few = tmp_path / "few.jsonl"
    write_logs([r for r in _rows(30, 3) if r["model"] == "mid-poet"], few)
    proc = sy(tmp_path / "data", "add-expert", "--router-dir", str(out), "--logs", str(few), "--expert", "mid-poet",
              "--out", str(tmp_path / "gnn3"), timeout=300)
    assert "added mid-poet from 30 logged calls" in proc.stdout
    assert "mid-poet is priced at $0.000400/call on average" in proc.stdout   # every call cost that
    assert "with 30 calls its own predicted scores weigh 38%" in " ".join(proc.stdout.split())  # 30 / (30 + 50)
    from router_models import load_router

    router = load_router(tmp_path / "gnn3")
    assert router.experts_ == ["cheap-math", "dear-all", "mid-poet"]
    q = router.predict_quality(["write a short poem about the sea and the number 7",
                                "compute 12 plus 30 and give the sum"])
    # its 30 examples say: right on poems, wrong on sums; against the other experts (whose
    # mean its prediction leans on with so few calls) it is predicted better on the poem
    lead = q[:, 2] - q[:, :2].mean(axis=1)
    assert lead[0] > lead[1] + 0.05, q
    again = sy(tmp_path / "data", "add-expert", "--router-dir", str(tmp_path / "gnn3"), "--logs", str(few),
               "--expert", "mid-poet", check=False)
    assert again.returncode == 1 and "already in the router" in again.stderr
    knn = tmp_path / "knn"
    sy(tmp_path / "data", "train", "--logs", str(two), "--router", "knn", "--out", str(knn))
    refused = sy(tmp_path / "data", "add-expert", "--router-dir", str(knn), "--logs", str(few), "--expert",
                 "mid-poet", check=False)
    assert refused.returncode == 1 and "cannot take a new expert without retraining" in refused.stderr


def test_train_help_shows_its_options_text_whole(tmp_path: Path):
    """Help text goes through rich markup: a bracketed example must be escaped to show."""
    text = " ".join(sy(tmp_path / "data", "train", "--help").stdout.split())
    assert "{model: [input, output] USD per 1M tokens}" in text
    assert "--query-pieces" in text and "2-256 (default 128)" in text


def test_train_names_an_expert_priced_from_few_logged_costs(tmp_path: Path):
    """A model new to the logs (costs for 6 of 80 prompts) is priced like the others per
    question, and `train` says so."""
    rows = _rows(80, 1)
    seen = 0
    for row in rows:
        if row["model"] == "mid-poet":
            seen += 1
            if seen > 6:
                row["cost_usd"] = None
    train = tmp_path / "train.jsonl"
    write_logs(rows, train)
    proc = sy(tmp_path / "data", "train", "--logs", str(train), "--router", "classifier", "--featurizer", "tfidf",
              "--cv", "0", "--out", str(tmp_path / "clf"))
    assert "priced by the other experts' cost per question" in proc.stdout
    line = next(x for x in proc.stdout.splitlines() if "priced by" in x)
    assert "mid-poet $0.000400/call" in line and "dear-all" not in line, line
