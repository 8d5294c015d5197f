"""Collaboration quality: logit addition and latent fusion against single experts and the router.

On mixed-domain prompts from the fleet's *held-out* sets (arithmetic, code, extraction,
drawn with a seed other than the one ``fleet eval`` and the shipped fleet logs used, and
with every prompt the fleet router was trained on removed), greedy answers of:

- each fleet member alone (the generalist and the three domain experts),
- ``logit``: the group with the trained logit-addition router (``collab train logit``),
- ``latent``: the group with the trained latent-fusion head (``collab train latent``),
- ``logit-contrastive-B`` for each ``--contrastive-beta B``: the logit router's contrastive
  variant (after SCMoE), ``z_strong - B * z_weak``, the weak expert being the one the
  router scores lowest (no training of its own),

scored by each domain's checker (``expert_registry.fleet.domains.score``). Derived from
the single experts' answers on the same prompts:

- ``router:fleet``: the answer of the expert the gateway's fleet router picks (its
  classifier's highest predicted quality) - what routing gets;
- ``domain expert``: the answer of the prompt's own domain expert (a perfect domain router);
- ``oracle``: the best single answer per prompt.

Everything decodes in this process through ``router_models.collab`` (the collaboration
worker's code path, the same numerics for every system), so the comparison is of the
methods, not of two engines. Goals (the collaboration issue): both modes beat the best
single expert; at least one beats routing. Each collaboration system is also compared with
routing and with the best single expert prompt by prompt (higher / lower / same, the mean
difference with a bootstrap 95% interval, a sign test), since a few prompts either way
decide the goal on a set this size.

    python benchmarks/collab_quality.py --data-dir DIR [--per-domain 30] [--contrastive-beta 0.5]
                                        [--resume STAMP]

Rows go to ``results/collab_quality-STAMP.jsonl`` as they are scored (``--resume``
continues a run); the report, the table and a bar chart to ``results/`` and the
"Collaboration quality" section of ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import json
import sys
import time
from pathlib import Path

from _common import git_commit, machine_facts, rewrite_section

HERE = Path(__file__).resolve().parent
README, RESULTS = HERE / "README.md", HERE / "results"
BEGIN, END = "<!-- collab-quality:begin -->", "<!-- collab-quality:end -->"
MAX_TOKENS = {"arithmetic": 96, "extraction": 96, "code": 256}  # as `fleet eval`
OWN = {"arithmetic": "smollm2-math", "code": "smollm2-code", "extraction": "smollm2-json"}
SEED = 1


def tasks(per_domain: int, seed: int) -> list:
    from expert_registry.fleet import domains
    from router_gateway.fleet_router import SHIPPED_LOGS

    with gzip.open(SHIPPED_LOGS, "rt") as fh:
        seen = [json.loads(line) for line in fh]
    seen_ids, seen_prompts = {r["prompt_id"] for r in seen}, {r["prompt"] for r in seen}
    out = []
    for d in domains.DOMAINS:
        pool = domains.tasks(d, "heldout", per_domain * 3, seed=seed)
        fresh = [t for t in pool if t.task_id not in seen_ids and t.prompt not in seen_prompts]
        out += fresh[:per_domain]
    return out


def contrastive_name(beta: float) -> str:
    return f"logit-contrastive-{beta:g}"


def systems(data_dir: Path, group, quick: bool, betas: tuple[float, ...] = ()) -> dict:
    """name -> function(prompt_ids, params) -> iterator of decode steps. Each beta in
    ``betas`` adds the logit router's contrastive variant (``z_strong - beta * z_weak``)."""
    from expert_registry.fleet.collab_groups import HEAD_SUBDIR, collab_dir
    from router_models.collab.decode import generate

    out = {name: (lambda e: lambda ids, p: generate(group, ids, p, expert=e))(i) for i, name in enumerate(group.names)}
    root = collab_dir(data_dir, quick)
    logit_dir, latent_dir = root / "logit" / HEAD_SUBDIR["logit"], root / "latent" / HEAD_SUBDIR["latent"]
    if logit_dir.exists():
        from router_models.collab.logit import LogitRouter

        router = LogitRouter.load(logit_dir, group)
        out["logit"] = lambda ids, p: generate(group, ids, p, router)
        for beta in betas:
            variant = LogitRouter.load(logit_dir, group)
            variant.contrastive_beta = beta
            out[contrastive_name(beta)] = (lambda r: lambda ids, p: generate(group, ids, p, r))(variant)
    else:
        print(f"no logit-addition router at {logit_dir}; run `switchyard collab train logit`", file=sys.stderr)
    if latent_dir.exists():
        from router_models.collab.latent import LatentFusion

        fusion = LatentFusion.load(latent_dir, group)
        out["latent"] = lambda ids, p: fusion.generate(group, ids, p)
    else:
        print(f"no latent-fusion model at {latent_dir}; run `switchyard collab train latent`", file=sys.stderr)
    return out


def route_with_fleet_router(data_dir: Path, prompts: list[str], experts: list[str]) -> tuple[list[str], str]:
    from router_gateway.fleet_router import ensure_fleet_router, router_dir
    from router_models.base import load_router

    origin = ensure_fleet_router(data_dir)
    router = load_router(router_dir(data_dir))
    q = router.predict_quality(prompts)
    cols = [i for i, e in enumerate(router.experts_) if e in experts]
    picks = [router.experts_[cols[int(row[cols].argmax())]] for row in q]
    return picks, origin


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, required=True, help="the data dir the fleet and groups were built in")
    ap.add_argument("--quick", action="store_true", help="the quick fleet and its groups")
    ap.add_argument("--per-domain", type=int, default=30)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--contrastive-beta", type=float, nargs="+", default=[], metavar="B",
                    help="also decode the logit router's contrastive variant with these betas")
    ap.add_argument("--resume", metavar="STAMP", help="continue results/collab_quality-STAMP.jsonl")
    ap.add_argument("--no-readme", action="store_true")
    args = ap.parse_args()
    if any(b < 0 for b in args.contrastive_beta):
        ap.error("--contrastive-beta: betas must be >= 0")
    import torch
    from tqdm.auto import tqdm

    from expert_registry.fleet import domains
    from expert_registry.fleet.collab_groups import fleet_members
    from router_models.collab.decode import SamplingParams
    from router_models.collab.group import ExpertGroup

    stamp = args.resume or f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}"
    RESULTS.mkdir(exist_ok=True)
    rows_path = RESULTS / f"collab_quality-{stamp}.jsonl"
    machine = machine_facts()
    group = ExpertGroup.load(fleet_members(args.data_dir, quick=args.quick))
    run = systems(args.data_dir, group, args.quick, tuple(args.contrastive_beta))
    todo = tasks(args.per_domain, args.seed)
    done = {}
    if rows_path.exists():
        for line in rows_path.read_text().splitlines():
            r = json.loads(line)
            done[(r["task_id"], r["system"])] = r
    stops = frozenset(group.stop_ids())
    bar = tqdm(total=len(todo) * len(run), initial=sum(1 for k in done if k[1] in run), desc="answering",
               unit="answer")
    with rows_path.open("a") as out, bar:
        for task in todo:
            ids = group.encode_chat([{"role": "user", "content": task.prompt}])
            params = SamplingParams(max_tokens=MAX_TOKENS[task.domain], temperature=0.0, stop_ids=stops)
            for name, fn in run.items():
                if (task.task_id, name) in done:
                    continue
                t0 = time.perf_counter()
                with torch.inference_mode():
                    steps = list(fn(ids, params))
                tokens = [s.token for s in steps if s.token not in stops]
                text = group.tokenizer.decode(tokens, skip_special_tokens=True)
                used = {}
                for s in steps:
                    used[group.names[s.expert]] = used.get(group.names[s.expert], 0) + 1
                row = {"task_id": task.task_id, "domain": task.domain, "system": name,
                       "score": domains.score(task, text), "tokens": len(steps), "experts": used,
                       "seconds": round(time.perf_counter() - t0, 3), "response": text}
                done[(task.task_id, name)] = row
                out.write(json.dumps(row) + "\n")
                out.flush()
                bar.update()
    picks, origin = route_with_fleet_router(args.data_dir, [t.prompt for t in todo], group.names)
    report = summarise(todo, done, group.names, list(run), picks)
    report["router_origin"] = origin
    result = {"date": dt.date.today().isoformat(), "commit": git_commit(), "machine": machine,
              "command": "python benchmarks/collab_quality.py " + " ".join(sys.argv[1:]),
              "prompts": len(todo), "seed": args.seed, "trunk_layers": group.trunk_layers,
              "layers": group.n_layers, **report}
    (RESULTS / f"collab_quality-{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
    png = RESULTS / f"collab_quality-{stamp}.png"
    plot(result, png)
    section = render(result, rows_path.name, png.name)
    print(section)
    if not args.no_readme:
        rewrite_section(README, BEGIN, END, section, "### Collaboration quality")


def summarise(todo, done, members: list[str], ran: list[str], picks: list[str]) -> dict:
    from expert_registry.fleet import domains

    def score(task, system):
        return done[(task.task_id, system)]["score"]

    per = {}  # system -> [(domain, score)]
    for task, pick in zip(todo, picks):
        for name in ran:
            per.setdefault(name, []).append((task.domain, score(task, name)))
        per.setdefault("router:fleet", []).append((task.domain, score(task, pick)))
        per.setdefault("domain expert", []).append((task.domain, score(task, OWN[task.domain])))
        per.setdefault("oracle", []).append((task.domain, max(score(task, m) for m in members)))
    table = {}
    for name, pairs in per.items():
        table[name] = {"overall": sum(s for _, s in pairs) / len(pairs),
                       "domains": {d: _mean([s for dd, s in pairs if dd == d]) for d in domains.DOMAINS}}
    seconds = {name: _mean([done[(t.task_id, name)]["seconds"] for t in todo]) for name in ran}
    tokens = {name: _mean([done[(t.task_id, name)]["tokens"] for t in todo]) for name in ran}
    best_single = max(members, key=lambda m: table[m]["overall"])
    shares = {}
    modes = [name for name in ran if name not in members]
    for mode in modes:
        used = {}
        for t in todo:
            for e, n in done[(t.task_id, mode)]["experts"].items():
                used.setdefault(t.domain, {}).setdefault(e, 0)
                used[t.domain][e] += n
        shares[mode] = {d: {e: round(n / sum(u.values()), 3) for e, n in u.items()} for d, u in used.items()}
    router_agree = _mean([float(p == OWN[t.domain]) for t, p in zip(todo, picks)])
    versus = {mode: {other: paired([s for _, s in per[mode]], [s for _, s in per[other]])
                     for other in ("router:fleet", best_single)} for mode in modes}
    return {"systems": table, "seconds_per_answer": seconds, "tokens_per_answer": tokens,
            "best_single": best_single, "expert_token_shares": shares, "router_picks_domain_expert": router_agree,
            "paired": versus}


def paired(a: list[float], b: list[float], rounds: int = 10_000, seed: int = 0) -> dict:
    """System A against system B on the same prompts: prompts where A scored higher, lower,
    the same; the mean difference A - B with a 95% interval from a seeded bootstrap over
    prompts; and the two-sided sign-test p-value over the prompts that differ."""
    import numpy as np
    from scipy.stats import binomtest

    if len(a) != len(b) or not a:
        raise ValueError("paired: two score lists of one non-zero length expected")
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(rounds, len(d)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    p = binomtest(wins, wins + losses).pvalue if wins + losses else 1.0
    return {"wins": wins, "losses": losses, "ties": int((d == 0).sum()), "mean": float(d.mean()),
            "ci95": [float(lo), float(hi)], "sign_p": float(p)}


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["systems"])
    doms = list(next(iter(result["systems"].values()))["domains"]) + ["overall"]
    fig, ax = plt.subplots(figsize=(11, 4.2))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        e = result["systems"][name]
        vals = [e["domains"][d] for d in doms[:-1]] + [e["overall"]]
        ax.bar([j + i * width for j in range(len(doms))], vals, width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(doms))], doms)
    ax.set_ylabel("score (checker, 0..1)")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"Collaboration vs single experts vs routing ({result['prompts']} held-out prompts, greedy)")
    ax.legend(ncol=5, fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def render(r: dict, rows_name: str, png_name: str) -> str:
    m, table = r["machine"], r["systems"]
    doms = list(next(iter(table.values()))["domains"])
    lines = [f"Measured {r['date']} on {m['cpu']} ({m['cores']} cores), commit {r['commit']}, `{r['command']}`; "
             f"{r['prompts']} prompts; rows: [`results/{rows_name}`](results/{rows_name}).", "",
             f"![collaboration quality](results/{png_name})", "",
             "| system | " + " | ".join(doms) + " | overall | s / answer | tokens / answer |",
             "|" + " --- |" * (len(doms) + 4)]
    for name, e in table.items():
        sec = r["seconds_per_answer"].get(name)
        tok = r["tokens_per_answer"].get(name)
        lines.append(f"| {name} | " + " | ".join(f"{e['domains'][d]:.2f}" for d in doms) + f" | {e['overall']:.3f} | "
                     + (f"{sec:.2f} | {tok:.0f} |" if sec is not None else " | |"))
    best = r["best_single"]
    b = table[best]["overall"]
    lines += ["", f"Best single expert: {best} ({b:.3f}). The fleet router (trained on "
              f"{'this machine' if r['router_origin'] == 'own' else 'the shipped'} fleet logs) picked the prompt's "
              f"domain expert for {r['router_picks_domain_expert']:.0%} of prompts.", "",
              "| goal | measured | met |", "| --- | --- | --- |"]
    routing = table["router:fleet"]["overall"]
    modes = [name for name in table if name in r.get("paired", {})]
    beats_routing = []
    for mode in modes:
        s = table[mode]["overall"]
        lines.append(f"| {mode} beats the best single expert | {s:.3f} vs {b:.3f} ({s - b:+.3f}) | "
                     f"{'yes' if s > b else 'no'} |")
        beats_routing.append((mode, s - routing))
    if beats_routing:
        mode, gap = max(beats_routing, key=lambda x: x[1])
        lines.append(f"| at least one mode beats routing (router:fleet {routing:.3f}) | best: {mode} {gap:+.3f} | "
                     f"{'yes' if gap > 0 else 'no'} |")
    if modes:
        lines += ["", "Paired, prompt by prompt (the same prompts; a bootstrap over prompts for the interval, a "
                  "sign test over the prompts that differ):", "",
                  "| system | against | higher / lower / same | mean difference [95% interval] | sign-test p |",
                  "| --- | --- | --- | --- | --- |"]
        for mode in modes:
            for other, c in r["paired"][mode].items():
                lo, hi = c["ci95"]
                lines.append(f"| {mode} | {other} | {c['wins']} / {c['losses']} / {c['ties']} | "
                             f"{c['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}] | {c['sign_p']:.2g} |")
    for mode, shares in r["expert_token_shares"].items():
        parts = "; ".join(f"{d}: " + ", ".join(f"{e} {v:.0%}" for e, v in sorted(s.items(), key=lambda x: -x[1]))
                          for d, s in shares.items())
        lines.append("")
        lines.append(f"{mode}: share of answer tokens drawn from each expert, by domain: {parts}.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
