"""The fleet's measured specialisation: score per expert per domain, oracle, best single.

Runs ``switchyard fleet eval`` (real vLLM CPU worker, through the gateway, greedy) on
the held-out prompt sets, then writes the table, the goal checks and the heat-map into
the "Fleet" section of ``benchmarks/README.md``; raw report and log rows go to
``benchmarks/results/``. Goals (the fleet issue): every domain expert beats the
generalist on its own domain by a clear margin (we read "clear" as >= 20 points), and the
oracle beats the best single expert by >= 10 points.

    python benchmarks/fleet_quality.py [--data-dir DIR] [--per-domain 60] [--humaneval 20]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

from _common import git_commit, machine_facts, rewrite_section

HERE = Path(__file__).resolve().parent
README, RESULTS = HERE / "README.md", HERE / "results"
BEGIN, END = "<!-- fleet-quality:begin -->", "<!-- fleet-quality:end -->"
GOAL_OWN_DOMAIN_MARGIN = 0.20
GOAL_ORACLE_MARGIN = 0.10
GENERALIST = "smollm2-135m"
OWN = {"smollm2-math": "arithmetic", "smollm2-code": "code", "smollm2-json": "extraction"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--per-domain", type=int, default=60)
    ap.add_argument("--humaneval", type=int, default=20)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--resume", metavar="STAMP", help="continue the run whose rows are results/fleet_eval-STAMP.jsonl")
    ap.add_argument("--no-readme", action="store_true")
    args = ap.parse_args()
    stamp = args.resume or f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}"
    RESULTS.mkdir(exist_ok=True)
    rows, png = RESULTS / f"fleet_eval-{stamp}.jsonl", RESULTS / f"fleet_eval-{stamp}.png"
    env = dict(os.environ)
    if args.data_dir:
        env["SWITCHYARD_DATA_DIR"] = str(args.data_dir)
    cmd = [str(Path(sys.executable).parent / "switchyard"), "fleet", "eval", "--per-domain", str(args.per_domain),
           "--humaneval", str(args.humaneval), "--concurrency", str(args.concurrency), "--out", str(rows),
           "--plot", str(png), "--json", "--no-train-router"]
    machine = machine_facts()
    done = subprocess.run(cmd, env=env, cwd=HERE.parent, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"fleet eval failed ({done.returncode})")
    body = json.loads(done.stdout)
    result = {"date": dt.date.today().isoformat(), "commit": git_commit(), "machine": machine,
              "command": "python benchmarks/fleet_quality.py " + " ".join(sys.argv[1:]), **body}
    (RESULTS / f"fleet_eval-{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
    section = render(result, rows.name, png.name)
    print(section)
    if not args.no_readme:
        rewrite_section(README, BEGIN, END, section, "### Fleet quality: score per expert and domain")


def render(r: dict, rows_name: str, png_name: str) -> str:
    rep, m = r["report"], r["machine"]
    domains = rep["domains"]
    head = "| expert | " + " | ".join(domains) + " | overall | mean cost USD | mean latency s |"
    lines = [f"Measured {r['date']} on {m['cpu']} ({m['cores']} cores), commit {r['commit']}, `{r['command']}`; "
             f"rows: [`results/{rows_name}`](results/{rows_name}).", "", f"![fleet heat-map](results/{png_name})", "",
             head, "|" + " --- |" * (len(domains) + 4)]

    def cells(entry: dict) -> str:
        return " | ".join(f"{entry['domains'][d]['mean']:.2f}" if d in entry["domains"] else "-" for d in domains)

    for name, e in rep["experts"].items():
        lines.append(f"| {name} | {cells(e)} | {e['overall']['mean']:.3f} | {e['mean_cost_usd']:.2e} | "
                     f"{e['mean_latency_s']:.2f} |")
    lines.append(f"| oracle | {cells(rep['oracle'])} | {rep['oracle']['overall']['mean']:.3f} | | |")
    best = rep["best_single"]
    lines += ["", f"Best single expert: {best['expert']} ({rep['experts'][best['expert']]['overall']['mean']:.3f})."]
    lines += ["", "| goal | measured | met |", "| --- | --- | --- |"]
    gen = rep["experts"].get(GENERALIST, {}).get("domains", {})
    for expert, domain in OWN.items():
        if expert in rep["experts"] and domain in gen:
            margin = rep["experts"][expert]["domains"][domain]["mean"] - gen[domain]["mean"]
            lines.append(f"| {expert} beats the generalist on {domain} by >= {GOAL_OWN_DOMAIN_MARGIN:.2f} | "
                         f"{margin:+.2f} | {'yes' if margin >= GOAL_OWN_DOMAIN_MARGIN else 'no'} |")
    gap = rep["oracle"]["overall"]["mean"] - rep["experts"][best["expert"]]["overall"]["mean"]
    lines.append(f"| oracle beats the best single expert by >= {GOAL_ORACLE_MARGIN:.2f} | {gap:+.3f} | "
                 f"{'yes' if gap >= GOAL_ORACLE_MARGIN else 'no'} |")
    if rep.get("notes"):
        lines += ["", "Loader notes: " + "; ".join(rep["notes"])]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
