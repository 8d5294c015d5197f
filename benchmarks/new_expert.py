"""A new expert with few logged calls: the graph router (add_expert, no retraining) against
the classifier router given the same examples.

For each split seed (``--seed``, default 0 1 2) and held-out model: the prompts are split
80/20 by prompt. Both routers are trained on the training prompts with the held-out
model's column removed. Then the held-out model gets N logged calls, drawn (seeded, the
same for both routers) from the training prompts, for N in 0, 10, 50, 200:

- gnn: ``GraphRouter.add_expert(name, prompts, scores, costs)``: the trained network is
  not touched; the expert node and its N edges join the graph (and, from 20 calls, a
  ridge probe fitted on them). Its prediction weighs N / (N + 50), the rest is the
  other experts' mean prediction shifted toward its logged mean (``router_models.sparse``).
- gnn-ft: the same plus ``finetune_steps`` (``--finetune-steps``, default 100; 0 leaves
  this row out): a shift of the new expert's final state and a logit bias fitted to its
  N calls, nothing else trained.
- classifier (MiniLM + logistic regression, no inner CV, for speed): refitted on the
  training logs with the held-out column known only on those N prompts (its head for
  the new expert then weighs N / (N + 200), the rest as for the graph router). With
  N = 0 it has nothing to learn from: its prediction for the new expert is the mean of
  its predictions for the others.

Where the logs come with expert descriptions (LLMRouter's models.json) the graph router
gets them, the held-out expert's included (its node's features at N = 0).

Both price the new expert per question as ``CostModel.add_expert`` does: a price times the
other experts' mean relative cost for the question. The price: with N = 0, its mean logged
cost on the training prompts, as a registry price would say; with N calls, read from their
costs next to the other experts' costs of the same prompts (``price_from_calls`` in the
graph router's ``add_expert``; in the classifier's fit, which prices so any expert logged
on fewer than half of the prompts). Reported on
the test prompts: the held-out expert's prediction error (MAE and Brier against its
logged scores) and the routing AIQ with every expert included, beside each router's AIQ
without the new expert (the row "without it"): adding an expert should not route worse.

    python benchmarks/new_expert.py                         # RouterBench, 3 held-out models
    python benchmarks/new_expert.py --logs ../shared/data/llmrouter --holdout gemma-2-9b-it ...
    python benchmarks/new_expert.py --seed 0 --no-readme     # one split
    python benchmarks/new_expert.py --quick --no-readme     # 1 model, 1 split, N in 0, 10
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from _common import expert_descriptions, git_commit, machine_facts, rewrite_section

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
RESULTS = HERE / "results"
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "routerbench"
DEFAULT_CACHE = Path("~/.cache/switchyard/embeddings.sqlite")
HOLDOUTS = ["gpt-3.5-turbo-1106", "zero-one-ai/Yi-34B-Chat", "meta/code-llama-instruct-34b-chat"]
NS = (0, 10, 50, 200)
SEEDS = (0, 1, 2)
FINETUNE_STEPS = 100
LEFT_OUT = "without it"   # the row of each router trained and routing without the new expert
MARKERS = ("<!-- new-expert:begin -->", "<!-- new-expert:end -->")  # RouterBench's section


def markers(dataset: str) -> tuple[str, str]:
    """README markers of a dataset's section (RouterBench's predate the others)."""
    return MARKERS if dataset == "routerbench" else (f"<!-- new-expert:{dataset}:begin -->",
                                                     f"<!-- new-expert:{dataset}:end -->")


def held_out_logs(logs, name: str, rows: np.ndarray):
    """The training logs with ``name``'s column known only on ``rows``."""
    out = copy.deepcopy(logs)
    j = out.experts.index(name)
    keep = np.zeros(out.n_prompts, dtype=bool)
    keep[rows] = True
    out.scores[~keep, j] = np.nan
    out.costs[~keep, j] = np.nan
    return out


def one_holdout(logs, name: str, args, seed: int) -> list[dict]:
    from router_models import ROUTERS
    from router_models.logs import split_by_prompt
    from router_models.metrics import evaluate_router, reference_points

    train, test = split_by_prompt(logs, test_size=0.2, seed=seed)
    test = test.complete()
    j = logs.experts.index(name)
    others = [e for e in logs.experts if e != name]
    truth = test.scores[:, j]
    ref = reference_points(test.scores, test.costs)
    have = np.flatnonzero(~np.isnan(train.scores[:, j]))
    order = np.random.default_rng(seed).permutation(have)
    full_price = float(np.nanmean(train.costs[:, j]))
    t0 = time.perf_counter()
    gnn = ROUTERS["gnn"](seed=seed, progress=False, descriptions=args.descriptions
                         ).fit(train.select_experts(others))
    gnn_fit = time.perf_counter() - t0
    state = gnn.save(args.tmp / "gnn")
    out = []
    # each router without the new expert: what adding it should not make worse
    oi = [k for k in range(logs.n_experts) if k != j]
    gcols = [gnn.experts_.index(e) for e in others]
    without = {"gnn": (gnn.predict_quality(test.prompts)[:, gcols], gnn.predict_cost(test.prompts)[:, gcols])}
    t1 = time.perf_counter()
    clf_without = ROUTERS["classifier"](featurizer="minilm", model="logreg", cv=0, seed=seed
                                        ).fit(train.select_experts(others))
    clf_without_s = time.perf_counter() - t1
    without["classifier"] = (clf_without.predict_quality(test.prompts), clf_without.predict_cost(test.prompts))
    for router, (q_o, c_o) in without.items():
        aiq = float(evaluate_router(router, test.scores[:, oi], test.costs[:, oi], q_o, c_o, ref=ref).aiq)
        out.append({"holdout": name, "seed": seed, "n": None, "router": router, "aiq": aiq})
        print(f"seed {seed} {name} without it, {router}: AIQ {aiq:.4f}", file=sys.stderr, flush=True)
    for n in args.ns:
        rows = order[:n]
        price = float(np.nanmean(train.costs[rows, j])) if n else full_price
        results = {}
        # the graph router: the trained one, plus the new expert (reloaded so each N starts clean)
        from router_models import load_router

        for router, steps in (("gnn", 0), ("gnn-ft", args.finetune_steps)):
            if router == "gnn-ft" and not (steps and n):
                continue
            g = load_router(state)
            t1 = time.perf_counter()
            g.add_expert(name, [train.prompts[i] for i in rows], train.scores[rows, j], train.costs[rows, j],
                         price_per_call=price, finetune_steps=steps,
                         description=(args.descriptions or {}).get(name))
            add_s = time.perf_counter() - t1
            cols = [g.experts_.index(e) for e in test.experts]
            results[router] = (g.predict_quality(test.prompts)[:, cols], g.predict_cost(test.prompts)[:, cols],
                               add_s)
        # the classifier, refitted with the N examples
        t1 = time.perf_counter()
        if n:
            clf = ROUTERS["classifier"](featurizer="minilm", model="logreg", cv=0, seed=seed)
            clf.fit(held_out_logs(train, name, rows))
            q, c = clf.predict_quality(test.prompts), clf.predict_cost(test.prompts)
        else:   # the classifier without it, plus its price: the graph router's pricing, its last column
            clf = copy.deepcopy(clf_without)
            clf.cost_model_.add_expert(price)
            q_o, c_all = clf.predict_quality(test.prompts), clf.predict_cost(test.prompts)
            q, c = np.zeros((len(test.prompts), logs.n_experts)), np.zeros((len(test.prompts), logs.n_experts))
            q[:, [k for k in range(logs.n_experts) if k != j]] = q_o
            c[:, [k for k in range(logs.n_experts) if k != j]] = c_all[:, :-1]
            q[:, j], c[:, j] = q_o.mean(axis=1), c_all[:, -1]
        results["classifier"] = (q, c, time.perf_counter() - t1 + (0.0 if n else clf_without_s))
        for router, (q, c, secs) in results.items():
            err = q[:, j] - truth
            out.append({"holdout": name, "seed": seed, "n": int(n), "router": router,
                        "mae": float(np.mean(np.abs(err))), "brier": float(np.mean(err ** 2)),
                        "aiq": float(evaluate_router(router, test.scores, test.costs, q, c, ref=ref).aiq),
                        "seconds": secs, "gnn_fit_s": gnn_fit})
            print(f"seed {seed} {name} N={n} {router}: MAE {out[-1]['mae']:.3f} Brier {out[-1]['brier']:.3f} "
                  f"AIQ {out[-1]['aiq']:.4f} ({secs:.1f} s)", file=sys.stderr, flush=True)
    return out


def plot(rows: list[dict], path: Path, ns: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for router, style in (("gnn", "-o"), ("gnn-ft", ":^"), ("classifier", "--s")):
        for metric, ax in (("mae", axes[0]), ("aiq", axes[1])):
            xs = [n for n in ns if any(r["router"] == router and r["n"] == n for r in rows)]
            ys = [np.mean([r[metric] for r in rows if r["router"] == router and r["n"] == n]) for n in xs]
            if xs:
                line, = ax.plot([ns.index(n) for n in xs], ys, style, label=router)
                left_out = [r["aiq"] for r in rows if r["router"] == router and r["n"] is None]
                if metric == "aiq" and left_out:
                    ax.axhline(np.mean(left_out), color=line.get_color(), lw=0.8, ls=":",
                               label=f"{router} without it")
    for ax in axes:
        ax.set_xticks(range(len(ns)), [str(n) for n in ns])
    axes[0].set(title="held-out expert: prediction MAE (lower is better)", xlabel="logged calls N", ylabel="MAE")
    axes[1].set(title="routing AIQ with the new expert", xlabel="logged calls N", ylabel="AIQ")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def gains_over_without(rows: list[dict], router: str, n: int) -> list[float]:
    """AIQ with the new expert minus the router's AIQ without it, per (seed, held-out model);
    gnn-ft is read against the graph router without it."""
    base = "gnn" if router == "gnn-ft" else router
    without = {(r.get("seed"), r["holdout"]): r["aiq"] for r in rows if r["router"] == base and r["n"] is None}
    return [r["aiq"] - without[(r.get("seed"), r["holdout"])] for r in rows
            if r["router"] == router and r["n"] == n and (r.get("seed"), r["holdout"]) in without]


def render(rows: list[dict], run: dict, json_path: str, png_path: str, ns: list[int]) -> str:
    m = run["machine"]
    routers = [r for r in ("gnn", "gnn-ft", "classifier") if any(x["router"] == r for x in rows)]

    def cell(router, n, key, fmt, holdout=None):
        xs = [r[key] for r in rows if r["router"] == router and r["n"] == n and key in r
              and (holdout is None or r["holdout"] == holdout)]
        return format(np.mean(xs), fmt) if xs else "-"

    lines = [f"Measured {run['date']} on {m['cpu']}, {m['cores']} cores ({m['os']}, Python {m['python']}), "
             f"commit {run['commit']}, with this command:", "", f"    {run['command']}", "",
             f"{run['dataset']} logs{run['described']}, 80/20 split by prompt, one split per seed "
             f"({', '.join(map(str, run['seeds']))}); held-out models: "
             f"{', '.join(run['holdouts'])}. Mean over the held-out models and seeds; raw results: "
             f"[`{json_path}`]({json_path}).", "", f"![new expert]({png_path})", ""]
    metrics = (("MAE", "mae", ".3f"), ("Brier", "brier", ".3f"), ("AIQ", "aiq", ".4f"))
    head = [f"{r} {label}" for label, _, _ in metrics for r in routers]
    lines += ["| N logged calls | " + " | ".join(head) + " |", "| --- " * (len(head) + 1) + "|"]
    for n in [None, *ns]:
        lines.append(f"| {LEFT_OUT if n is None else n} | "
                     + " | ".join(cell(r, n, key, fmt) for _, key, fmt in metrics for r in routers) + " |")
    lines += ["", "What adding the new expert does to routing: AIQ with it minus the same router's AIQ "
              "without it, on the same split, mean over the held-out models and seeds (the worst of them):", "",
              "| N logged calls | " + " | ".join(routers) + " |", "| --- " * (len(routers) + 1) + "|"]
    for n in ns:
        cells = []
        for r in routers:
            gains = gains_over_without(rows, r, n)
            cells.append(f"{np.mean(gains):+.4f} ({min(gains):+.4f})" if gains else "-")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    secs = {r: np.mean([x["seconds"] for x in rows if x["router"] == r and "seconds" in x]) for r in routers}
    took = f"Adding the expert to the graph router took {secs['gnn']:.2f} s on average (no training)"
    if "gnn-ft" in secs:
        took += f", {secs['gnn-ft']:.2f} s with {run.get('finetune_steps')} fine-tuning steps"
    lines += ["", f"{took}; refitting the classifier took {secs['classifier']:.1f} s. "
              "Per held-out model (mean over the seeds):", ""]
    head = [f"{r} {label}" for label, key, _ in metrics if key != "brier" for r in routers]
    lines += ["| held-out model | N | " + " | ".join(head) + " |", "| --- " * (len(head) + 2) + "|"]
    for h in run["holdouts"]:
        for n in [None, *ns]:
            lines.append(f"| {h} | {LEFT_OUT if n is None else n} | " + " | ".join(
                cell(r, n, key, fmt, h) for _, key, fmt in metrics if key != "brier" for r in routers) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import tempfile

    from router_models.featurize import use_cache_file
    from router_models.logs import load_logs

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--logs", type=Path, default=DEFAULT_DATA)
    p.add_argument("--holdout", nargs="+", default=HOLDOUTS)
    p.add_argument("--ns", nargs="+", type=int, default=list(NS))
    p.add_argument("--seed", type=int, nargs="+", default=list(SEEDS),
                   help="split seeds: one 80/20 split (and draw of the N calls) per seed")
    p.add_argument("--quick", action="store_true", help="one held-out model, N in 0 and 10")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--finetune-steps", type=int, default=FINETUNE_STEPS,
                   help="steps of GraphRouter.add_expert(finetune_steps=) for the gnn-ft row (0: no such row)")
    p.add_argument("--no-readme", action="store_true")
    args = p.parse_args(argv)
    if args.finetune_steps < 0:
        p.error("--finetune-steps must be >= 0")
    if args.quick:
        args.holdout, args.ns, args.seed = args.holdout[:1], [0, 10], args.seed[:1]
    use_cache_file(args.cache.expanduser())
    started = dt.datetime.now(dt.timezone.utc)
    logs = load_logs(args.logs)
    unknown = [h for h in args.holdout if h not in logs.experts]
    if unknown:
        p.error(f"unknown held-out models {unknown}; the logs have {logs.experts}")
    args.descriptions = expert_descriptions(args.logs)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = Path(tmp)
        for seed in args.seed:
            for h in args.holdout:
                rows += one_holdout(logs, h, args, seed)
    run = {"date": started.strftime("%Y-%m-%d %H:%M UTC"), "machine": machine_facts(), "commit": git_commit(),
           "command": shlex.join(["python", "benchmarks/new_expert.py", *(sys.argv[1:] if argv is None else argv)]),
           "dataset": args.logs.name.split(".")[0],
           "described": " (expert descriptions from models.json)" if args.descriptions else "",
           "seeds": args.seed, "holdouts": args.holdout, "ns": args.ns, "finetune_steps": args.finetune_steps}
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    args.results.mkdir(parents=True, exist_ok=True)
    jpath, ppath = args.results / f"new_expert-{stamp}.json", args.results / f"new_expert-{stamp}.png"
    jpath.write_text(json.dumps(run | {"rows": rows}, indent=1) + "\n")
    plot(rows, ppath, args.ns)
    rel = lambda x: str(x.resolve().relative_to(HERE)) if x.resolve().is_relative_to(HERE) else str(x)  # noqa: E731
    section = render(rows, run, rel(jpath), rel(ppath), args.ns)
    print(section)
    if not args.no_readme:
        rewrite_section(README, *markers(run["dataset"]), section, "## New expert with few examples (graph router)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
