"""``switchyard train`` and ``switchyard eval``: routers from benchmark logs.

    switchyard train --logs logs/ --router classifier --out routers/clf --holdout 0.2
    switchyard eval --router-dir routers/clf --logs routers/clf/heldout.jsonl --plot curve.png

Heavy imports (numpy, scikit-learn, torch) happen inside the commands, so the rest of
the CLI stays quick.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from router_gateway.cli_common import console
from router_gateway.cli_common import fail as _fail


# rich markup would eat an unescaped "[input, output]"
PRICES_HELP = "JSON {model: \\[input, output] USD per 1M tokens} to derive costs"


def _prices(path: Optional[Path]) -> dict | None:
    """``{"model": [input_per_1m, output_per_1m], ...}`` from a JSON file."""
    if path is None:
        return None
    try:
        raw = json.loads(path.read_text())
        return {str(k): (float(v[0]), float(v[1])) for k, v in raw.items()}
    except (OSError, ValueError, TypeError, IndexError, AttributeError) as exc:
        _fail(f"--prices-file {path}: expected {{\"model\": [input_per_1m, output_per_1m]}}: {exc}")


DROPPED_WARN = 0.1   # share of the source's rows dropped above which loading warns


def _load(logs: Path, fmt: Optional[str], prices: Optional[Path]):
    from router_models.logs import LogFormatError, load_logs

    try:
        data = load_logs(logs, fmt, progress=True, prices=_prices(prices))
    except FileNotFoundError as exc:
        _fail(f"no such logs: {exc}")
    except (LogFormatError, ValueError) as exc:
        _fail(str(exc))
    rep = data.report
    console.print(f"[bold]{logs}[/bold] ({rep.format}): {rep.rows_read} rows read -> "
                  f"{data.n_prompts} prompts x {data.n_experts} experts, "
                  f"{rep.dropped_rows} dropped")
    for note in rep.notes:
        console.print(f"  - {note}")
    if rep.rows_read and rep.dropped_rows > DROPPED_WARN * rep.rows_read:
        console.print(f"[yellow]warning: {rep.dropped_rows} of {rep.rows_read} rows "
                      f"({rep.dropped_rows / rep.rows_read:.0%}) were dropped; the notes above say why[/yellow]")
    return data


def _router_params(router: str, featurizer: str, model: str, k: int, cv: int, seed: int) -> dict:
    if router == "classifier":
        return {"featurizer": featurizer, "model": model, "cv": cv, "seed": seed}
    if router == "knn":
        return {"k": k}
    return {}


def _cut_params(router: str, featurizer: str, pieces: Optional[int], keep: Optional[str]) -> dict:
    """``--query-pieces`` / ``--query-keep`` as the router's hyper-parameters (every
    router reads MiniLM features but the TF-IDF classifier)."""
    given = {k: v for k, v in (("query_pieces", pieces), ("query_keep", keep)) if v is not None}
    if given and router == "classifier" and featurizer != "minilm":
        _fail(f"--query-pieces and --query-keep cut MiniLM's input; --featurizer {featurizer} "
              "reads the whole query (its last 1,000 characters)")
    return given


def _extra_params(cls: type, pairs: list[str]) -> dict:
    """``--param NAME=VALUE`` pairs (VALUE read as JSON, else as a string), checked
    against the router's hyper-parameters."""
    import inspect

    known = [n for n in inspect.signature(cls.__init__).parameters if n != "self"]
    out: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or not name:
            _fail(f"--param '{pair}' must be NAME=VALUE")
        if name not in known:
            _fail(f"--param {name}: the {cls.name} router has no such hyper-parameter; it has: "
                  f"{', '.join(known) or 'none'}")
        try:
            out[name] = json.loads(raw)
        except ValueError:
            out[name] = raw
    return out


def train(
    logs: Path = typer.Option(..., help="Benchmark logs: one file or a directory of one layout"),
    router: str = typer.Option(..., help="Router to train (knn, classifier, ...)"),
    out: Path = typer.Option(..., help="Directory to write the router into"),
    format: Optional[str] = typer.Option(None, "--format", help="Log layout; guessed when omitted"),
    featurizer: str = typer.Option("minilm", help="classifier: minilm embeddings or tfidf (fast)"),
    model: str = typer.Option("auto", help="classifier: auto (cross-validated), logreg or mlp"),
    k: int = typer.Option(40, help="knn: neighbours"),
    cv: int = typer.Option(5, help="classifier: folds for model selection (0 = no selection)"),
    seed: int = typer.Option(0, help="Seed for splits and cross-validation"),
    query_pieces: Optional[int] = typer.Option(
        None, help="MiniLM features: word pieces read of a long query, 2-256 (default 128)"),
    query_keep: Optional[str] = typer.Option(
        None, help="MiniLM features: read a long query's tail (the question, in few-shot and "
                   "chat prompts) or its head (default tail)"),
    holdout: float = typer.Option(0.0, help="Fraction of prompts held out (written to OUT/heldout.jsonl for eval)"),
    prices_file: Optional[Path] = typer.Option(None, help=PRICES_HELP),
    param: Optional[list[str]] = typer.Option(None, "--param",
                                              help="Any router hyper-parameter, NAME=VALUE (JSON value); repeatable"),
) -> None:
    """Train a router on benchmark logs and save it (JSON + safetensors)."""
    from router_models import ROUTERS
    from router_models.logs import split_by_prompt, write_logs

    if router not in ROUTERS:
        _fail(f"unknown router {router!r}; choose one of {', '.join(sorted(ROUTERS))}")
    if not 0.0 <= holdout < 1.0:
        _fail("--holdout must be in [0, 1)")
    data = _load(logs, format, prices_file)
    if data.n_prompts < 2 or data.n_experts < 2:
        _fail("need at least 2 prompts and 2 experts to train a router")
    if holdout > 0:
        data, held = split_by_prompt(data, test_size=holdout, seed=seed)
        out.mkdir(parents=True, exist_ok=True)
        write_logs(held, out / "heldout.jsonl")
        console.print(f"held out {held.n_prompts} prompts -> {out / 'heldout.jsonl'}")
    try:
        params = (_router_params(router, featurizer, model, k, cv, seed)
                  | _cut_params(router, featurizer, query_pieces, query_keep)
                  | _extra_params(ROUTERS[router], param or []))
        est = ROUTERS[router](**params)
        t0 = time.perf_counter()
        est.fit(data)
        took = time.perf_counter() - t0
    except (ValueError, TypeError) as exc:
        _fail(str(exc))
    est.save(out)
    console.print(f"trained {est!r} on {data.n_prompts} prompts in {took:.1f} s -> {out}")
    _print_cv(getattr(est, "cv_results_", None) or [])
    console.print(f"experts: {', '.join(est.experts_)}")
    shaped = [(e, p) for e, p in zip(est.experts_, est.cost_model_.added.tolist()) if p == p]   # not NaN
    if shaped:
        console.print("priced by the other experts' cost per question (costs logged on under half "
                      "of the prompts): " + ", ".join(f"{e} ${p:.6f}/call on average" for e, p in shaped))


CV_ROWS = 5   # candidates of a router's model selection printed after training, best first


def _print_cv(rows: list[dict]) -> None:
    """A table of the best candidates of the router's inner cross-validation (the
    classifier's rows name a ``model``, the symbolic router's ``params``), best first: the
    first is the one the router chose."""
    from router_models.classifier import cv_rank

    if not rows:
        return
    rows = sorted(rows, key=cv_rank, reverse=True)
    table = Table("candidate", "AIQ", "Brier", "", title="model selection by cross-validation, best first")
    for i, row in enumerate(rows[:CV_ROWS]):
        label = row.get("model", row.get("params"))
        label = " ".join(f"{k}={v}" for k, v in label.items()) if isinstance(label, dict) else str(label)
        table.add_row(label, f"{row['aiq']:.4f}", f"{row['brier']:.4f}", "chosen" if i == 0 else "")
    console.print(table)
    if len(rows) > CV_ROWS:
        console.print(f"{len(rows) - CV_ROWS} more candidates in router.json (cv_results)")


def _fmt(x: Any, money: bool = False) -> str:
    if x is None:
        return "-"
    return f"${x:.6f}" if money else f"{x:.4f}"


def _print_eval(result: dict) -> None:
    table = Table("router", "AIQ", "APGR", "CPT(50%)", "CPT(80%)", "cost to best single")
    rows = [result["router"]] + [result["baselines"][b] for b in ("random", "best_single", "oracle")]
    for r in rows:
        table.add_row(r["name"], _fmt(r["aiq"]), _fmt(r["apgr"]), _fmt(r["cpt50"], True),
                      _fmt(r["cpt80"], True), _fmt(r["cost_to_best_single"]))
    console.print(table)
    pts = result["router"]["points"]
    console.print("router quality-cost points (USD/query, quality): " +
                  ", ".join(f"({c:.6f}, {q:.3f})" for c, q in pts[:: max(1, len(pts) // 12)]))
    d = result["data"]
    console.print(f"{d['prompts']} prompts, {len(d['experts'])} experts, {d['dropped_rows']} rows dropped")


def evaluate(router_dir: Path, logs: Path, fmt: Optional[str] = None,
             prices: Optional[Path] = None, plot: Optional[Path] = None) -> dict:
    """Evaluate a saved router on logs; returns the fixed ``--json`` layout."""
    from router_models import load_router
    from router_models.base import ArtifactError
    from router_models.metrics import (baselines, evaluate_router, plot_curves,
                                       reference_points, single_expert_points)

    try:
        est = load_router(router_dir)
    except ArtifactError as exc:
        _fail(str(exc))
    data = _load(logs, fmt, prices)
    common = [e for e in est.experts_ if e in set(data.experts)]
    missing = [e for e in est.experts_ if e not in set(data.experts)]
    if len(common) < 2:
        _fail(f"the logs share {len(common)} expert(s) with the router; need 2. Router: "
              f"{', '.join(est.experts_)}; logs: {', '.join(data.experts)}")
    if missing:
        console.print(f"[yellow]router experts not in the logs, left out:[/yellow] {', '.join(missing)}")
    seen = set(getattr(est, "train_prompt_ids_", ()))
    if seen:
        import numpy as np

        fresh = np.array([pid not in seen for pid in data.prompt_ids])
        if not fresh.any():
            _fail(f"all {data.n_prompts} prompts of {logs} were in the router's training logs; evaluate "
                  "on prompts it has not seen (`switchyard train --holdout 0.2` keeps some aside)")
        if not fresh.all():
            console.print(f"[yellow]{int((~fresh).sum())} prompts were in the router's training "
                          "logs; evaluating on the other prompts only[/yellow]")
            data = data.subset(np.flatnonzero(fresh))
    data = data.select_experts(common).complete()
    if data.n_prompts == 0:
        _fail("no prompt has every expert's score logged")
    cols = [est.experts_.index(e) for e in data.experts]
    q = est.predict_quality(data.prompts)[:, cols]
    c = est.predict_cost(data.prompts)[:, cols]
    ref = reference_points(data.scores, data.costs)
    report = evaluate_router(est.name, data.scores, data.costs, q, c, ref=ref)
    base = baselines(data.scores, data.costs)
    result = {
        "router": report.to_dict(),
        "baselines": {k: base[k].to_dict() for k in ("random", "best_single", "oracle")},
        "data": {"prompts": data.n_prompts, "experts": list(data.experts),
                 "dropped_rows": int(data.report.dropped_rows)},
    }
    if plot is not None:
        plot_curves([report, *base.values()],
                    single_expert_points(data.scores, data.costs, data.experts), plot,
                    title=f"{est.name} on {logs.name}")
    return result


def eval_cmd(
    router_dir: Path = typer.Option(..., help="A directory written by `switchyard train`"),
    logs: Path = typer.Option(..., help="Benchmark logs the router has not seen"),
    format: Optional[str] = typer.Option(None, "--format", help="Log layout; guessed when omitted"),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON (fixed layout)"),
    plot: Optional[Path] = typer.Option(None, help="Draw the quality-cost curves into this PNG"),
    prices_file: Optional[Path] = typer.Option(None, help=PRICES_HELP),
) -> None:
    """Evaluate a router: AIQ, APGR, CPT(50%/80%), quality-cost points, and baselines."""
    if as_json:
        console.quiet = True  # only the JSON on stdout
    result = evaluate(router_dir, logs, format, prices_file, plot)
    if as_json:
        console.quiet = False
        print(json.dumps(result))
        return
    _print_eval(result)
    if plot is not None:
        console.print(f"plot -> {plot}")


def calibrate_cmd(
    router_dir: Path = typer.Option(..., help="A directory written by `switchyard train`"),
    logs: Path = typer.Option(..., help="Logged prompts that look like your traffic (scores not needed)"),
    format: Optional[str] = typer.Option(None, "--format", help="Log layout; guessed when omitted"),
    target_spend: Optional[float] = typer.Option(None, help="Average USD per query to spend at most"),
    strong_share: Optional[float] = typer.Option(None, help="Share of calls (0..1) to the strongest expert at most"),
    threshold: bool = typer.Option(False, "--threshold", help="Calibrate min_quality (cheapest expert above a bar) instead of lambda"),
) -> None:
    """Find the cost knob (lambda, or min_quality) that hits a target spend or strong-expert share."""
    import numpy as np

    from router_models import load_router
    from router_models.base import ArtifactError
    from router_models.policy import calibrate

    if (target_spend is None) == (strong_share is None):
        _fail("give exactly one of --target-spend and --strong-share")
    value = target_spend if target_spend is not None else strong_share
    if value is None or value < 0 or (strong_share is not None and value > 1):
        _fail("--target-spend must be >= 0 and --strong-share within [0, 1]")
    try:
        est = load_router(router_dir)
    except ArtifactError as exc:
        _fail(str(exc))
    data = _load(logs, format, None)
    q, c = est.predict_quality(data.prompts), est.predict_cost(data.prompts)
    policy = calibrate(q, c, est.cost_scale_, target="spend" if target_spend is not None else "strong_share",
                       value=float(value), mode="threshold" if threshold else "wtp")
    chosen = policy.choose(q, c, est.cost_scale_)
    rows = np.arange(len(chosen))
    strong = int(np.argmax(q.mean(axis=0)))
    knob = (f"min_quality={policy.min_quality:.4f}" if threshold else f"lambda={policy.lam:.6g}")
    console.print(f"{knob}: predicted spend ${c[rows, chosen].mean():.6f}/query, "
                  f"{(chosen == strong).mean():.1%} of calls to {est.experts_[strong]}, "
                  f"predicted quality {q[rows, chosen].mean():.4f} on {len(chosen)} prompts")
    share = np.bincount(chosen, minlength=len(est.experts_)) / len(chosen)
    console.print("calls per expert: " + ", ".join(f"{e} {s:.1%}" for e, s in zip(est.experts_, share) if s > 0))
    flag = f"--min-quality {policy.min_quality:.4f}" if threshold else f"--lambda {policy.lam:.6g}"
    console.print(f"use it: switchyard routers add NAME --router-dir {router_dir} {flag} --map ...")


def add_expert_cmd(
    router_dir: Path = typer.Option(..., help="A saved router that can take new experts (gnn)"),
    logs: Path = typer.Option(..., help="Logged calls of the new expert (any layout `train` reads)"),
    expert: str = typer.Option(..., help="The new expert's model name in the logs"),
    format: Optional[str] = typer.Option(None, "--format", help="Log layout; guessed when omitted"),
    description: Optional[str] = typer.Option(None, help="What the model is (its node feature); default its name"),
    price_per_call: Optional[float] = typer.Option(None, help="USD per call, when the logs have no cost"),
    finetune_steps: int = typer.Option(0, help="Steps fitting the new expert's node to its examples (0: none)"),
    out: Optional[Path] = typer.Option(None, help="Write the extended router here (default: in place)"),
) -> None:
    """Add a new expert to a trained graph router from a few logged calls, without retraining."""
    import numpy as np

    from router_models import load_router, sparse
    from router_models.base import ArtifactError

    try:
        est = load_router(router_dir)
    except ArtifactError as exc:
        _fail(str(exc))
    if not hasattr(est, "add_expert"):
        _fail(f"a {est.name} router cannot take a new expert without retraining; the gnn router can "
              "(or retrain with `switchyard train`)")
    data = _load(logs, format, None)
    if expert not in data.experts:
        _fail(f"no logged calls of {expert!r} in {logs}; models there: {', '.join(data.experts)}")
    j = data.experts.index(expert)
    have = ~np.isnan(data.scores[:, j])
    if not have.any():
        _fail(f"{expert!r} has no logged score in {logs}")
    try:
        est.add_expert(expert, [p for p, h in zip(data.prompts, have) if h], data.scores[have, j],
                       data.costs[have, j], description=description, price_per_call=price_per_call,
                       finetune_steps=finetune_steps)
    except ValueError as exc:
        _fail(str(exc))
    est.save(out or router_dir)
    console.print(f"added {expert} from {int(have.sum())} logged calls -> {out or router_dir}; "
                  f"experts: {', '.join(est.experts_)}")
    console.print(f"{expert} is priced at ${float(est.cost_model_.added[-1]):.6f}/call on average over the "
                  "training prompts, per question like the others")
    own = sparse.own_weights(est.experts_, getattr(est, "lean_", None)).get(expert)
    if own is not None:
        console.print(f"with {int(have.sum())} calls its own predicted scores weigh {own:.0%}, the rest is the other "
                      "experts' mean shifted toward its logged mean; more calls, more weight")


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("add-expert")(add_expert_cmd)
    app.command("eval")(eval_cmd)
    app.command("calibrate")(calibrate_cmd)
