"""Router quality: cross-validated quality-cost curves of every router on real benchmark logs.

For each dataset (RouterBench, LLMRouter, RouteLLM from ``../shared/data``, see its
README) the prompts are split into ``--folds`` seeded folds by prompt id. On each fold
every router is fitted on the other folds and predicts quality and cost for the held-out
prompts (``complete()``: only prompts that every expert answered). The out-of-fold
predictions of all folds are pooled and each router's quality-cost curve is read on the
pooled prompts against one shared ``reference_points`` (weak = cheapest expert, strong =
best single expert), together with the random, best-single, task-oracle and oracle
baselines (:func:`task_oracle`: the best routing that knows only each prompt's task). The
per-fold AIQ (each fold against its own reference points) gives a mean and a spread.

Results: one JSON and one plot per dataset in ``benchmarks/results/`` and one marked
section per dataset in ``benchmarks/README.md`` (table + goals), see there for details.

    python benchmarks/router_quality.py                              # all datasets, 5 folds
    python benchmarks/router_quality.py --datasets routerbench --routers knn classifier-tfidf
    python benchmarks/router_quality.py --quick --no-readme          # 2 folds, 300 prompts each
    python benchmarks/router_quality.py --datasets mine=path/to/logs.jsonl   # any load_logs layout

RouteLLM's logs have no cost; it is derived from these list prices (USD per 1M input /
output tokens), RouteLLM's own pair: gpt-4-1106-preview $10 / $30 (OpenAI),
Mixtral-8x7B-Instruct $0.6 / $0.6 (Together). MiniLM embeddings are cached in SQLite
(``--cache``, default ``~/.cache/switchyard/embeddings.sqlite``) so re-runs skip them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from _common import expert_descriptions, git_commit, machine_facts, rewrite_section

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
RESULTS = HERE / "results"
DEFAULT_DATA = HERE.parent.parent / "shared" / "data"
DEFAULT_CACHE = Path("~/.cache/switchyard/embeddings.sqlite")
DATASETS = ("routerbench", "llmrouter", "routellm")
# USD per 1M (input, output) tokens: RouteLLM's strong/weak pair at list prices.
ROUTELLM_PRICES = {"gpt-4-1106-preview": (10.0, 30.0), "mistralai/Mixtral-8x7B-Instruct-v0.1": (0.6, 0.6)}
# name -> (ROUTERS key, hyper-parameters); classifiers also get --cv and --seed. The TF-IDF
# classifier chooses among its logistic-regression candidates only: the MLP candidate over
# 50,000 sparse TF-IDF features takes ~90 s per fit on 9,000 RouteLLM prompts on a quiet
# 2-core machine (a logistic regression: 0.3 s), and model="auto" fits it 2 x cv times per
# fold: over an hour for RouteLLM alone.
ROUTER_SPECS = {
    "knn": ("knn", {}),
    "classifier-minilm": ("classifier", {"featurizer": "minilm", "model": "auto"}),
    "classifier-tfidf": ("classifier", {"featurizer": "tfidf", "model": "logreg"}),
    "symbolic": ("symbolic", {}),
    "gnn": ("gnn", {}),
}
NEW_ROUTERS = ("symbolic", "gnn")  # their goals: AIQ above kNN's, and one of them above the classifier's
BASELINES = ("random", "best_single", "task_oracle", "oracle")
QUICK_PROMPTS = 300
TOL = 1e-9  # quality comparisons forgive float noise, as metrics.QUALITY_TOL does


def marker(dataset: str) -> tuple[str, str]:
    return f"<!-- router-quality:{dataset}:begin -->", f"<!-- router-quality:{dataset}:end -->"


def make_router(name: str, cv: int, seed: int, descriptions: dict[str, str] | None = None,
                query_pieces: int | None = None):
    from router_models import ROUTERS

    kind, params = ROUTER_SPECS[name]
    if query_pieces is not None and params.get("featurizer", "minilm") == "minilm":
        params = params | {"query_pieces": query_pieces}
    if kind in ("classifier", "symbolic"):
        params = params | {"cv": cv, "seed": seed}
    if kind == "gnn":
        params = params | {"seed": seed, "descriptions": descriptions, "progress": False}
    return ROUTERS[kind](**params)


def load_dataset(name: str, path: Path, max_prompts: int | None, seed: int):
    from router_models.logs import load_logs

    logs = load_logs(path, prices=ROUTELLM_PRICES if name == "routellm" else None)
    if max_prompts and logs.n_prompts > max_prompts:
        keep = np.random.default_rng(seed).choice(logs.n_prompts, max_prompts, replace=False)
        logs = logs.subset(np.sort(keep))
    return logs


def embed_all(prompts: list[str], query_pieces: int | None = None) -> dict:
    """MiniLM-embed every prompt once (into the cache): routers then only read it back."""
    from router_models.featurize import QUERY_PIECES, MiniLMFeaturizer, default_cache, query_text

    featurizer = MiniLMFeaturizer(progress=True, max_pieces=query_pieces or QUERY_PIECES)   # the routers' cut
    keys = list(dict.fromkeys(featurizer.cache_key(query_text(p)) for p in prompts))
    new = len(keys) - len(default_cache().get_many(keys))
    t0 = time.perf_counter()
    featurizer.transform(prompts)
    return {"texts": len(keys), "new": new, "seconds": time.perf_counter() - t0}


def extra_metrics(points: list[list[float]], ref: dict) -> dict:
    """Numbers for the table that CurveReport does not carry, from raw operating points."""
    p = np.asarray(points, dtype=float)
    top = float(p[:, 1].max())
    at_top = float(p[p[:, 1] >= top - TOL, 0].min())

    def best_within(budget: float) -> tuple[float | None, float | None]:
        ok = p[:, 0] <= budget * (1 + 1e-12)
        if not ok.any():
            return None, None
        i = np.flatnonzero(ok)[np.argmax(p[ok, 1])]
        return float(p[i, 1]), float(p[i, 0])

    q_half, c_half = best_within(0.5 * ref["c_strong"])
    q_full, c_full = best_within(ref["c_strong"])
    return {"best_quality": top, "best_quality_cost": at_top, "quality_at_half_best_cost": q_half,
            "cost_at_half_best_cost": c_half, "quality_at_best_cost": q_full, "cost_at_best_cost": c_full}


def task_oracle(scores: np.ndarray, costs: np.ndarray, tasks: list[str], ref: dict):
    """The best a router can do knowing only each prompt's task: it is handed every
    expert's mean score and cost on that task *in these very prompts* and routes through
    the policy at every knob value. A router above it reads more than the task from the
    prompt (its difficulty, its kind within the task); logs without task labels make one
    task, where this is the best fixed expert per knob value."""
    from router_models.metrics import evaluate_router

    t = np.asarray(tasks, dtype=object)
    q, c = np.empty_like(scores), np.empty_like(costs)
    for task in dict.fromkeys(t):
        rows = t == task
        q[rows], c[rows] = scores[rows].mean(axis=0), costs[rows].mean(axis=0)
    return evaluate_router("task_oracle", scores, costs, q, c, ref=ref)


def cross_validate(name: str, logs, routers: list[str], args: argparse.Namespace,
                   descriptions: dict[str, str] | None = None) -> dict:
    """Fit and predict every router on every fold; pooled and per-fold curve reports."""
    from tqdm import tqdm

    from router_models.base import CostModel
    from router_models.logs import kfold_by_prompt
    from router_models.metrics import baselines, evaluate_router, reference_points

    pooled: dict[str, list] = {"scores": [], "costs": [], "tasks": [], "c:length only": [],
                               **{f"q:{r}": [] for r in routers},
                               **{f"c:{r}": [] for r in routers}}
    per_fold: dict[str, list[float]] = {r: [] for r in (*routers, *BASELINES)}
    chosen: dict[str, list[dict]] = {r: [] for r in routers}  # the head each classifier fit picked
    fit_s = dict.fromkeys(routers, 0.0)
    predict_s = dict.fromkeys(routers, 0.0)
    bar = tqdm(total=args.folds * len(routers), desc=name, unit="fit", file=sys.stderr)
    for train, test in kfold_by_prompt(logs, args.folds, args.seed):
        test = test.complete()
        ref = reference_points(test.scores, test.costs)
        pooled["scores"].append(test.scores)
        pooled["costs"].append(test.costs)
        pooled["tasks"] += test.tasks
        pooled["c:length only"].append(CostModel.fit(train.prompts, train.costs).predict(test.prompts))
        for r in routers:
            bar.set_postfix_str(r)
            t0 = time.perf_counter()
            router = make_router(r, args.cv, args.seed, descriptions, args.query_pieces).fit(train)
            t1 = time.perf_counter()
            q, c = router.predict_quality(test.prompts), router.predict_cost(test.prompts)
            fit_s[r] += t1 - t0
            if hasattr(router, "head_"):
                chosen[r].append(router.head_.state()[0])
            predict_s[r] += time.perf_counter() - t1
            pooled[f"q:{r}"].append(q)
            pooled[f"c:{r}"].append(c)
            per_fold[r].append(evaluate_router(r, test.scores, test.costs, q, c, ref=ref).aiq)
            bar.update(1)
        for b, rep in baselines(test.scores, test.costs, seed=args.seed).items():
            per_fold[b].append(rep.aiq)
        per_fold["task_oracle"].append(task_oracle(test.scores, test.costs, test.tasks, ref).aiq)
    bar.close()
    S, C = np.vstack(pooled["scores"]), np.vstack(pooled["costs"])
    ref = reference_points(S, C)
    reports = {r: evaluate_router(r, S, C, np.vstack(pooled[f"q:{r}"]), np.vstack(pooled[f"c:{r}"]), ref=ref)
               for r in routers}
    cost_mae = {r: float(np.abs(np.vstack(pooled[f"c:{r}"]) - C).mean()) for r in ("length only", *routers)}
    reports |= baselines(S, C, seed=args.seed)
    reports["task_oracle"] = task_oracle(S, C, pooled["tasks"], ref)
    return {"S": S, "C": C, "ref": ref, "reports": reports, "per_fold": per_fold, "chosen": chosen,
            "cost_mae": cost_mae,
            "fit_s": fit_s, "predict_s": predict_s}


def goals(dataset: str, rows: dict[str, dict], routers: list[str], ref: dict, experts: list[str]) -> list[dict]:
    """The stated goals for RouterBench and LLMRouter, each with its numbers and a verdict."""
    if not routers:
        return []
    best = max(routers, key=lambda r: rows[r]["aiq"])
    b, strong = rows[best], experts[ref["strong"]]
    out = new_router_goals(dataset, rows, routers)
    if dataset == "routerbench":
        others = [r for r in routers if r != "knn"]
        if "knn" in rows and others:
            top = max(others, key=lambda r: rows[r]["aiq"])
            diff = np.subtract(rows[top]["aiq_folds"], rows["knn"]["aiq_folds"])
            sd = diff.std(ddof=1) if diff.size > 1 else 0.0
            out.append({"goal": "best router's AIQ above kNN's", "met": rows[top]["aiq"] > rows["knn"]["aiq"],
                        "detail": f"{top} {rows[top]['aiq']:.4f} vs knn {rows['knn']['aiq']:.4f} (pooled); "
                                  f"per-fold difference {diff.mean():+.4f} ± {sd:.4f}, "
                                  f"{int((diff > 0).sum())} of {diff.size} folds above"})
        ratio = b["cost_to_best_single"]
        t = rows["task_oracle"]
        task_half = fmt_q(t["quality_at_half_best_cost"], t["cost_at_half_best_cost"])
        reached = ", ".join(f"{r} {rows[r]['cost_to_best_single']:.0%}" for r in routers
                            if rows[r]["cost_to_best_single"] is not None) or "none"
        out.append({"goal": f"best router reaches {strong}'s accuracy at <= half its cost",
                    "met": ratio is not None and ratio <= 0.5,
                    "detail": f"{best} (best AIQ): " + (f"reaches {ref['q_strong']:.3f} at {ratio:.0%} of "
                              f"{strong}'s ${ref['c_strong']:.3g}" if ratio is not None else
                              f"never reaches {ref['q_strong']:.3f} (its best: {b['best_quality']:.3f} at "
                              f"${b['best_quality_cost']:.3g})") + f"; routers that reach it, at share of cost: "
                              f"{reached}; oracle {fmt_pct(rows['oracle']['cost_to_best_single'])}; "
                              f"task oracle {fmt_pct(rows['task_oracle']['cost_to_best_single'])}, its best at "
                              f"<= half the cost {task_half}"})
    elif dataset == "llmrouter":
        q, c = b["quality_at_best_cost"], b["cost_at_best_cost"]
        met = [r for r in routers if rows[r]["quality_at_best_cost"] is not None
               and rows[r]["quality_at_best_cost"] > ref["q_strong"] + TOL]
        out.append({"goal": f"best router's average score above the best single model's ({strong}) "
                            "at equal or lower cost",
                    "met": best in met,
                    "detail": f"{strong}: {ref['q_strong']:.4f} at ${ref['c_strong']:.3g}; {best} (best AIQ): "
                              + (f"{q:.4f} at ${c:.3g}" if q is not None else "no point at that cost")
                              + f"; met by: {', '.join(met) or 'none'}"})
    return out


def _vs(rows: dict[str, dict], a: str, b: str) -> str:
    diff = np.subtract(rows[a]["aiq_folds"], rows[b]["aiq_folds"])
    sd = diff.std(ddof=1) if diff.size > 1 else 0.0
    return (f"{a} {rows[a]['aiq']:.4f} vs {b} {rows[b]['aiq']:.4f} (pooled), per-fold difference "
            f"{diff.mean():+.4f} ± {sd:.4f}, {int((diff > 0).sum())} of {diff.size} folds above")


def new_router_goals(dataset: str, rows: dict[str, dict], routers: list[str]) -> list[dict]:
    """The symbolic and graph routers' goals on RouterBench and LLMRouter: each above kNN,
    at least one above the classifier (the MiniLM one, the default; the TF-IDF one too)."""
    if dataset not in ("routerbench", "llmrouter") or "knn" not in rows:
        return []
    new = [r for r in NEW_ROUTERS if r in routers]
    out = [{"goal": f"{r}'s AIQ above kNN's", "met": rows[r]["aiq"] > rows["knn"]["aiq"], "detail": _vs(rows, r, "knn")}
           for r in new]
    clfs = [c for c in ("classifier-minilm", "classifier-tfidf") if c in rows]
    if new and clfs:
        top = max(new, key=lambda r: rows[r]["aiq"])
        out.append({"goal": "symbolic or graph router's AIQ above the classifier's",
                    "met": all(rows[top]["aiq"] > rows[c]["aiq"] for c in clfs),
                    "detail": "; ".join(_vs(rows, top, c) for c in clfs)})
    return out


def reuse_rows(name: str, args: argparse.Namespace, ref: dict, n_eval: int, routers: list[str]) -> dict:
    """Rows of routers not run now, from earlier results of this dataset with the same folds,
    seed, inner CV and evaluated prompts (so the same out-of-fold protocol and reference)."""
    out: dict[str, dict] = {}
    for path in args.reuse:
        old = json.loads(Path(path).read_text())
        if old.get("dataset") != name:
            continue
        same = ({k: old["settings"].get(k) for k in ("folds", "seed", "cv", "max_prompts")}
                == {"folds": args.folds, "seed": args.seed, "cv": args.cv, "max_prompts": args.max_prompts})
        q_old, q_new = old["reference"]["q_strong"], ref["q_strong"]
        if not same or old["n_eval_prompts"] != n_eval or abs(q_old - q_new) > 1e-12:
            raise SystemExit(f"--reuse {path}: not the same protocol or prompts as this run of {name}")
        for r in old["routers"]:
            if r not in routers and r in ROUTER_SPECS and r not in out:
                out[r] = old["rows"][r] | {"reused_from": f"{link(Path(path))} (commit {old.get('commit')})"}
    return out


def run_dataset(name: str, path: Path, routers: list[str], args: argparse.Namespace) -> dict:
    from router_models.metrics import plot_curves, report_from_points, single_expert_points

    t0 = time.perf_counter()
    logs = load_dataset(name, path, args.max_prompts, args.seed)
    load_s = time.perf_counter() - t0
    print(f"{name}: {logs.n_prompts} prompts x {logs.n_experts} experts from {path} ({load_s:.1f} s)",
          file=sys.stderr, flush=True)
    embed = embed_all(logs.prompts, args.query_pieces) if any(r != "classifier-tfidf" for r in routers) else None
    if embed:
        print(f"{name}: MiniLM embedded {embed['new']} new of {embed['texts']} texts in {embed['seconds']:.1f} s",
              file=sys.stderr, flush=True)
    cv = cross_validate(name, logs, routers, args, expert_descriptions(path))
    ref, S, C = cv["ref"], cv["S"], cv["C"]
    rows = {}
    for r, rep in cv["reports"].items():
        rows[r] = rep.to_dict() | extra_metrics(rep.points, ref) | {"aiq_folds": cv["per_fold"][r]}
        if cv["chosen"].get(r):
            rows[r]["models_chosen"] = cv["chosen"][r]
        if r in cv["cost_mae"]:
            rows[r]["cost_mae"] = cv["cost_mae"][r]
    reused = reuse_rows(name, args, ref, int(S.shape[0]), routers)
    for r, row in reused.items():
        rows[r] = row
        cv["reports"][r] = report_from_points(r, row["points"], ref)
    routers = [r for r in ROUTER_SPECS if r in routers or r in reused]
    stamp = args.started.strftime("%Y%m%dT%H%M%SZ")
    args.results.mkdir(parents=True, exist_ok=True)
    plot = args.results / f"router_quality-{name}-{stamp}.png"
    plot_curves([cv["reports"][r] for r in (*routers, *BASELINES)],
                single_expert_points(S, C, [short(e) for e in logs.experts]), plot,
                f"{name}: {S.shape[0]} prompts, {args.folds}-fold out-of-fold predictions")
    report = {
        "dataset": name, "source": str(path), "n_prompts": logs.n_prompts, "n_eval_prompts": int(S.shape[0]),
        "experts": logs.experts, "load_report": logs.report.to_dict(),
        "reference": ref | {"weak_name": logs.experts[ref["weak"]], "strong_name": logs.experts[ref["strong"]]},
        "single_experts": [{"name": n, "cost": c, "quality": q}
                           for n, c, q in single_expert_points(S, C, logs.experts)],
        "routers": routers, "rows": rows, "reused": {r: row["reused_from"] for r, row in reused.items()},
        "cost_mae_length_only": cv["cost_mae"]["length only"], "mean_cost": float(np.mean(C)),
        "goals": goals(name, rows, routers, ref, logs.experts),
        "timing": {"load_s": load_s, "embed": embed, "fit_s": cv["fit_s"], "predict_s": cv["predict_s"],
                   "total_s": time.perf_counter() - t0},
        "plot": link(plot),
    }
    return report


def short(expert: str) -> str:
    return expert.rsplit("/", 1)[-1]


def fmt_usd(x: float | None) -> str:
    return "-" if x is None else f"${x:.3g}"


def fmt_pct(x: float | None) -> str:
    return "not reached" if x is None else f"{x:.0%}"


def fmt_q(q: float | None, c: float | None) -> str:
    return "-" if q is None else f"{q:.3f} ({fmt_usd(c)})"


def fmt_s(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def link(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(Path(path).resolve().relative_to(HERE))
    return str(path)


def render(report: dict, run: dict) -> str:
    """The markdown that goes between one dataset's README markers."""
    m, ref, rows, t = run["machine"], report["reference"], report["rows"], report["timing"]
    load = m["loadavg_at_start"][0]
    lines = [f"Measured {run['date']} on {m['cpu']}, {m['cores']} cores ({m['os']}, Python {m['python']}, "
             f"torch threads {m['torch_threads']}; 1-min load average at start {load:.2f}"
             + (", **not quiet**" if load > 0.5 * (m["cores"] or 1) else "") + "), with this command:",
             "", f"    {run['command']}", "",
             f"{report['n_prompts']} prompts x {len(report['experts'])} experts; {report['n_eval_prompts']} "
             f"evaluated (scored by every expert), {run['settings']['folds']} folds by prompt (seed "
             f"{run['settings']['seed']}), classifier model selection with {run['settings']['cv']}-fold inner CV. "
             f"Weak (cheapest) expert: {ref['weak_name']} {ref['q_weak']:.3f} at {fmt_usd(ref['c_weak'])}; strong "
             f"(best single): {ref['strong_name']} {ref['q_strong']:.3f} at {fmt_usd(ref['c_strong'])} per query.",
             "", f"Raw results: [`{link(report['json'])}`]({link(report['json'])}); "
             f"plot: [`{link(report['plot'])}`]({link(report['plot'])}).", "",
             f"![{report['dataset']} quality-cost curves]({link(report['plot'])})", "",
             "| router | AIQ | AIQ per fold | APGR | CPT(50%) | CPT(80%) | cost to reach best single | "
             "best quality (its cost) | quality at <= 1/2 best single's cost |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in (*report["routers"], *BASELINES):
        r = rows[name]
        folds = np.asarray(r["aiq_folds"], dtype=float)
        spread = f"{folds.mean():.4f} ± {folds.std(ddof=1):.4f}" if folds.size > 1 else f"{folds.mean():.4f}"
        apgr = "-" if r["apgr"] is None else f"{r['apgr']:.3f}"
        lines.append(f"| {name} | {r['aiq']:.4f} | {spread} | {apgr} | {fmt_usd(r['cpt50'])} | "
                     f"{fmt_usd(r['cpt80'])} | {fmt_pct(r['cost_to_best_single'])} | "
                     f"{fmt_q(r['best_quality'], r['best_quality_cost'])} | "
                     f"{fmt_q(r['quality_at_half_best_cost'], r['cost_at_half_best_cost'])} |")
    maes = [f"{r} {fmt_usd(rows[r]['cost_mae'])}" for r in report["routers"] if "cost_mae" in rows[r]]
    if maes and report.get("cost_mae_length_only") is not None:
        lines += ["", "Cost per call predicted out of fold, mean absolute error over the evaluated (prompt, "
                  f"expert) cells (their mean cost {fmt_usd(report['mean_cost'])}): the length-only model "
                  f"{fmt_usd(report['cost_mae_length_only'])}; each router's cost model (length times a ratio "
                  "read from its features) " + ", ".join(maes) + "."]
    if report["goals"]:
        lines += ["", "Goals:", ""]
        lines += [f"- {g['goal']}: {'**met**' if g['met'] else '**not met**'}. {g['detail']}." for g in report["goals"]]
    picks = []
    for name in report["routers"]:
        if rows[name].get("models_chosen"):
            count: dict[str, int] = {}
            for h in rows[name]["models_chosen"]:
                label = h["kind"] + "(" + ", ".join(f"{k}={v:g}" for k, v in h.items()
                                                    if k in ("C", "alpha")) + ")"
                count[label] = count.get(label, 0) + 1
            picks.append(f"{name} " + ", ".join(f"{k} in {v}" for k, v in count.items()))
    if picks:
        lines += ["", "Heads chosen by the classifiers' inner CV, per fold: " + "; ".join(picks) + "."]
    if report.get("reused"):
        lines += ["", "Not re-run here (same folds, seed and prompts; rows taken from the earlier run): "
                  + "; ".join(f"{r} from {src}" for r, src in report["reused"].items()) + "."]
    emb = t["embed"]
    fits = ", ".join(f"{r} {fmt_s(t['fit_s'][r])} fit + {fmt_s(t['predict_s'][r])} predict" for r in report["routers"]
                     if r in t["fit_s"])
    lines += ["", f"Wall time {fmt_s(t['total_s'])}: load {fmt_s(t['load_s'])}"
              + (f", MiniLM embedding {fmt_s(emb['seconds'])} ({emb['new']} of {emb['texts']} texts not yet "
                 "in the cache)" if emb else "") + f", over all folds {fits}."]
    notes = report["load_report"]["notes"]
    if notes:
        lines += ["", "Loading: " + "; ".join(notes) + "."]
    return "\n".join(lines)


def write_readme(dataset: str, section: str, path: Path = README) -> None:
    """Replace the text between this dataset's markers; append a section if missing."""
    rewrite_section(path, *marker(dataset), section, f"#### {dataset}")


def machine() -> dict:
    import torch

    return {**machine_facts(), "torch_threads": torch.get_num_threads()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="directory of the datasets (../shared/data)")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS),
                   help=f"names among {', '.join(DATASETS)} (read from --data), or NAME=PATH to any logs")
    p.add_argument("--routers", nargs="+", default=list(ROUTER_SPECS), choices=list(ROUTER_SPECS))
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds by prompt (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cv", type=int, default=5, help="inner CV folds of the classifier's model selection")
    p.add_argument("--query-pieces", type=int, default=None,
                   help="word pieces MiniLM reads of a query's end (default: the routers' own, 128)")
    p.add_argument("--max-prompts", type=int, default=None, help="subsample each dataset to this many prompts")
    p.add_argument("--quick", action="store_true", help=f"2 folds, at most {QUICK_PROMPTS} prompts per dataset")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="SQLite file of MiniLM embeddings")
    p.add_argument("--results", type=Path, default=RESULTS, help="where JSON and plots go")
    p.add_argument("--no-readme", action="store_true", help="do not rewrite benchmarks/README.md")
    p.add_argument("--reuse", nargs="+", type=Path, default=[],
                   help="earlier results JSON: routers not run now are taken from them (same folds, seed, prompts)")
    args = p.parse_args(argv)
    if args.quick:
        args.folds = 2
        args.max_prompts = args.max_prompts or QUICK_PROMPTS
    if args.folds < 2 or args.cv < 1:
        p.error("--folds must be >= 2 and --cv >= 1")
    args.sources = []
    for item in args.datasets:
        name, _, path = item.partition("=")
        if not path and name not in DATASETS:
            p.error(f"unknown dataset {name!r}: use one of {', '.join(DATASETS)} or NAME=PATH")
        args.sources.append((name, Path(path) if path else args.data / name))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from router_models.featurize import use_cache_file

    use_cache_file(args.cache.expanduser())
    args.started = dt.datetime.now(dt.timezone.utc)
    argv_shown = sys.argv[1:] if argv is None else argv
    run = {"date": args.started.strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(), "commit": git_commit(),
           "command": shlex.join(["python", "benchmarks/router_quality.py", *argv_shown]),
           "settings": {"folds": args.folds, "seed": args.seed, "cv": args.cv, "max_prompts": args.max_prompts,
                        "query_pieces": args.query_pieces,
                        "routers": args.routers, "routellm_prices_per_1m": ROUTELLM_PRICES}}
    t0, outputs = time.perf_counter(), []
    for name, path in args.sources:
        report = run_dataset(name, path, args.routers, args)
        out = args.results / f"router_quality-{name}-{args.started.strftime('%Y%m%dT%H%M%SZ')}.json"
        report["json"] = link(out)
        out.write_text(json.dumps(run | report, indent=1, default=_json_default) + "\n")
        section = render(report, run)
        print("\n" + section + "\n", flush=True)
        if not args.no_readme:
            write_readme(name, section)
        outputs.append(out)
    total = time.perf_counter() - t0
    print(f"total {fmt_s(total)}; load average now {os.getloadavg()[0]:.2f}; wrote "
          + ", ".join(str(o) for o in outputs) + ("" if args.no_readme else f" and {README}"), flush=True)
    return 0


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, float) and math.isnan(x):
        return None
    raise TypeError(f"not JSON serializable: {type(x)}")


if __name__ == "__main__":
    sys.exit(main())
