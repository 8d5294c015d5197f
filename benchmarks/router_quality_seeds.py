"""Router quality over several fold seeds: is a router above another, or is it the draw?

``router_quality.py`` cross-validates on one seed's folds. On RouterBench the AIQs of the
best routers lie within 0.002-0.004 of each other while one fold's AIQ moves by 0.01, so
which of two close routers comes out above can depend on the folds drawn. This script
reads ``router_quality.py``'s results JSON for one dataset, run with different ``--seed``
values (the seed draws the folds and seeds the routers), and pools every fold of every
seed:

- per router, its pooled AIQ under each seed and their mean;
- per pair the goals name (each router against kNN; the symbolic and graph routers
  against the classifiers), the per-fold AIQ difference over all folds: mean ± standard
  deviation, standard error (sd / sqrt(folds): the folds of one seed share training
  prompts and the seeds share prompts, so this understates the error somewhat), folds
  above, seeds whose pooled AIQ is above; and a reading: **above** or **below** when the
  mean is more than two standard errors from 0, else **tie**.

By default it takes, per seed, the newest results file of the dataset in
``benchmarks/results`` with the newest one's folds, inner CV and prompts; ``--files``
names them instead. The commit of each file is shown (a warning when they differ).

    python benchmarks/router_quality.py --datasets routerbench llmrouter            # seed 0
    python benchmarks/router_quality.py --datasets routerbench llmrouter --seed 1 --no-readme
    python benchmarks/router_quality.py --datasets routerbench llmrouter --seed 2 --no-readme
    python benchmarks/router_quality_seeds.py                                      # both datasets
    python benchmarks/router_quality_seeds.py --datasets routerbench --files a.json b.json

Writes ``results/router_quality_seeds-<dataset>-<time>.json``, a plot of the per-fold
differences next to it, and the dataset's ``router-quality-seeds`` section of
benchmarks/README.md (not with ``--no-readme``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
from pathlib import Path

import numpy as np
from _common import rewrite_section

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
RESULTS = HERE / "results"
NEW_ROUTERS = ("symbolic", "gnn")
CLASSIFIERS = ("classifier-minilm", "classifier-tfidf")
SAME = ("folds", "cv", "max_prompts")   # settings that must agree between the seeds' runs
Z = 2.0   # standard errors for "above" / "below"


def marker(dataset: str) -> tuple[str, str]:
    return (f"<!-- router-quality-seeds:{dataset}:begin -->",
            f"<!-- router-quality-seeds:{dataset}:end -->")


def _read(path: Path) -> dict:
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"{path}: not a readable results JSON ({exc})") from exc
    if not isinstance(report, dict) or not {"settings", "rows", "dataset"} <= report.keys():
        raise SystemExit(f"{path}: not a router_quality.py results file (no settings, rows, dataset)")
    report["_path"] = str(path)
    return report


def _settings(report: dict) -> dict:
    return {k: report["settings"].get(k) for k in SAME}


def pick(dataset: str, results: Path, files: list[Path] | None = None) -> list[dict]:
    """One report per seed, ordered by seed: ``files`` as given (one per seed), else the
    newest file per seed in ``results`` whose settings ``SAME`` match the newest file's."""
    if files:
        reports = [_read(f) for f in files]
        wrong = [r["_path"] for r in reports if r["dataset"] != dataset]
        if wrong:
            raise SystemExit(f"not {dataset} results: {', '.join(wrong)}")
        seeds = [r["settings"]["seed"] for r in reports]
        if len(set(seeds)) != len(seeds):
            raise SystemExit(f"two files with the same seed: {seeds}")
    else:
        found = sorted(results.glob(f"router_quality-{dataset}-*.json"), reverse=True)  # newest first
        reports, seeds = [], set()
        for path in found:
            r = _read(path)
            if reports and _settings(r) != _settings(reports[0]):
                continue
            if r["settings"]["seed"] not in seeds:
                seeds.add(r["settings"]["seed"])
                reports.append(r)
    for r in reports[1:]:
        if _settings(r) != _settings(reports[0]):
            raise SystemExit(f"{r['_path']}: settings {_settings(r)} differ from "
                             f"{_settings(reports[0])}: the seeds must share folds, inner CV and prompts")
    if len(reports) < 2:
        raise SystemExit(f"{dataset}: results of at least two seeds are needed, found "
                         f"{len(reports)} (run router_quality.py with --seed N --no-readme)")
    return sorted(reports, key=lambda r: r["settings"]["seed"])


def compare(reports: list[dict], a: str, b: str) -> dict:
    """``a`` against ``b`` over every fold of every seed (see the module doc)."""
    diff = np.concatenate([np.subtract(r["rows"][a]["aiq_folds"], r["rows"][b]["aiq_folds"])
                           for r in reports])
    sd = float(diff.std(ddof=1)) if diff.size > 1 else 0.0
    se = sd / np.sqrt(diff.size)
    mean = float(diff.mean())
    reading = "above" if mean > Z * se else "below" if mean < -Z * se else "tie"
    return {"a": a, "b": b, "mean": mean, "sd": sd, "se": float(se), "folds": int(diff.size),
            "folds_above": int((diff > 0).sum()), "diffs": diff.tolist(),
            "seeds_above": int(sum(r["rows"][a]["aiq"] > r["rows"][b]["aiq"] for r in reports)),
            "seeds": len(reports), "reading": reading}


def summarize(dataset: str, reports: list[dict]) -> dict:
    routers = [r for r in reports[0]["settings"]["routers"]
               if all(r in rep["rows"] for rep in reports)]
    aiq = {r: [rep["rows"][r]["aiq"] for rep in reports] for r in routers}
    pairs = [(r, "knn") for r in routers if r != "knn" and "knn" in routers]
    pairs += [(n, c) for n in NEW_ROUTERS for c in CLASSIFIERS if n in routers and c in routers]
    comparisons = [compare(reports, a, b) for a, b in pairs]
    new = [n for n in NEW_ROUTERS if n in routers]
    clfs = [c for c in CLASSIFIERS if c in routers]
    goal = None
    if new and clfs:
        winners = [n for n in new if all(c["reading"] == "above" for c in comparisons
                                          if c["a"] == n and c["b"] in clfs)]
        top = max(new, key=lambda n: np.mean(aiq[n]))
        goal = {"goal": "symbolic or graph router's AIQ above the classifier's, over the seeds",
                "met": bool(winners), "by": winners,
                "mean_above": all(np.mean(aiq[top]) > np.mean(aiq[c]) for c in clfs), "top": top}
    commits = sorted({str(r.get("commit")) for r in reports})
    return {"dataset": dataset, "seeds": [r["settings"]["seed"] for r in reports],
            "files": [_rel(r["_path"]) for r in reports], "commits": commits,
            "dates": [r.get("date") for r in reports], "machines": [r.get("machine", {}).get("cpu") for r in reports],
            "settings": _settings(reports[0]),
            "routers": routers, "aiq": aiq, "comparisons": comparisons, "goal": goal}


def plot(summary: dict, path: Path) -> None:
    """Per-fold differences of each compared pair, one dot per fold coloured by seed, with
    the mean and its +-2 standard errors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comps = summary["comparisons"]
    fig, ax = plt.subplots(figsize=(7.5, 0.55 * len(comps) + 1.4))
    folds = summary["settings"]["folds"]
    colors = plt.get_cmap("tab10")
    for y, c in enumerate(comps):
        d = np.asarray(c["diffs"])
        for s in range(len(summary["seeds"])):
            part = d[s * folds:(s + 1) * folds]
            ax.scatter(part, np.full(part.size, y) + np.linspace(-0.15, 0.15, part.size), s=14,
                       color=colors(s), alpha=0.8, label=f"seed {summary['seeds'][s]}" if y == 0 else None)
        ax.errorbar(c["mean"], y, xerr=Z * c["se"], fmt="D", color="black", ms=5, capsize=4)
    ax.axvline(0, color="grey", lw=1)
    ax.set_yticks(range(len(comps)), [f"{c['a']} - {c['b']}" for c in comps])
    ax.invert_yaxis()
    ax.set_xlabel("AIQ difference per fold (black: mean +- 2 standard errors)")
    ax.set_title(f"{summary['dataset']}: router against router over seeds {', '.join(map(str, summary['seeds']))}")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(summary: dict, command: str) -> str:
    seeds = ", ".join(map(str, summary["seeds"]))
    n = summary["settings"]["folds"] * len(summary["seeds"])
    lines = [f"Pooled from router_quality.py's runs with seeds {seeds} ({summary['settings']['folds']} folds "
             f"each, {n} in all), at commit {', '.join(summary['commits'])}"
             + (" (**mixed commits**: check that they ran the same router code)" if len(summary["commits"]) > 1 else "")
             + f", on {', '.join(sorted(set(map(str, summary['machines']))))}; with this command:", "",
             f"    {command}", "",
             "Runs: " + "; ".join(f"seed {s} {d} ([JSON]({f}))" for s, d, f in
                                  zip(summary["seeds"], summary["dates"], summary["files"])) + ".", ""]
    if summary.get("plot"):
        lines += [f"![{summary['dataset']} per-fold differences]({summary['plot']})", ""]
    lines += ["| router | " + " | ".join(f"AIQ seed {s}" for s in summary["seeds"]) + " | mean |",
              "| --- | " + " | ".join("---" for _ in summary["seeds"]) + " | --- |"]
    for r in summary["routers"]:
        v = summary["aiq"][r]
        lines.append(f"| {r} | " + " | ".join(f"{x:.4f}" for x in v) + f" | {np.mean(v):.4f} |")
    lines += ["", "| pair | per-fold difference, mean ± sd | standard error | folds above | seeds above | reading |",
              "| --- | --- | --- | --- | --- | --- |"]
    for c in summary["comparisons"]:
        lines.append(f"| {c['a']} - {c['b']} | {c['mean']:+.4f} ± {c['sd']:.4f} | {c['se']:.4f} | "
                     f"{c['folds_above']} of {c['folds']} | {c['seeds_above']} of {c['seeds']} | "
                     f"**{c['reading']}** |")
    g = summary["goal"]
    if g:
        lines += ["", f"Goal, {g['goal']}: **{'met' if g['met'] else 'not met'}**"
                  + (f" ({', '.join(g['by'])} above both classifiers by more than {Z:g} standard errors)"
                     if g["met"] else f" (no router above every classifier by more than {Z:g} standard errors)")
                  + f"; by the mean of the seeds' pooled AIQs, {g['top']} is "
                  + ("above" if g["mean_above"] else "not above") + " every classifier."]
    return "\n".join(lines)


def _rel(path: str | Path) -> str:
    """``path`` relative to benchmarks/ (where README.md links from), else absolute."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(HERE))
    except ValueError:
        return str(p)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=["routerbench", "llmrouter"])
    p.add_argument("--files", nargs="+", type=Path, default=None,
                   help="results JSON to pool, one per seed (with one dataset only)")
    p.add_argument("--results", type=Path, default=RESULTS, help="where results are read and written")
    p.add_argument("--no-readme", action="store_true", help="do not rewrite benchmarks/README.md")
    args = p.parse_args(argv)
    if args.files and len(args.datasets) != 1:
        p.error("--files goes with exactly one dataset in --datasets")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shown = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "benchmarks/router_quality_seeds.py", *shown])
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    args.results.mkdir(parents=True, exist_ok=True)
    for dataset in args.datasets:
        summary = summarize(dataset, pick(dataset, args.results, args.files))
        out = args.results / f"router_quality_seeds-{dataset}-{stamp}.json"
        summary["plot"] = _rel(out.with_suffix(".png"))   # paths relative to benchmarks/
        plot(summary, out.with_suffix(".png"))
        out.write_text(json.dumps(summary, indent=1) + "\n")
        section = render(summary, command)
        print(section + "\n", flush=True)
        if not args.no_readme:
            rewrite_section(README, *marker(dataset), section, f"#### {dataset}, over seeds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
