"""The fleet's serving cost, both ways: one worker per merged expert vs one LoRA worker.

Starts, one configuration after the other and each through ``WorkerLauncher`` (the path
`serve --demo` takes):

(a) ``plain``   one worker serving only the generalist (the unit cost);
(b) ``merged``  the default fleet: one worker per expert (generalist + merged experts),
                all started together;
(c) ``lora``    one worker serving the generalist plus every adapter (``--enable-lora``).

For each: seconds from spawn until every worker is healthy, resident memory of all the
workers' processes once healthy (sum of RSS over their process groups), and greedy decode
latency of a 64-token answer per served model, one request at a time (median of 2 calls
after a warm-up call). Ratios against (a) go into the "Fleet" section of
``benchmarks/README.md``.

    python benchmarks/fleet_serving.py [--data-dir DIR] [--quick] [--no-readme]
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from _common import git_commit, machine_facts, rewrite_section, save_report

HERE = Path(__file__).resolve().parent
README, RESULTS = HERE / "README.md", HERE / "results"
BEGIN, END = "<!-- fleet-serving:begin -->", "<!-- fleet-serving:end -->"
PROMPT = "Write a Python function `total(xs)` that returns the sum of the numbers in the list xs."


def rss_mb(pgids: list[int]) -> float:
    from expert_registry.procgroup import group_members

    total = 0
    for pgid in pgids:
        for pid in group_members(pgid):
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except OSError:
                continue
    return total / 1024


def measure(specs: list, data_dir: Path) -> dict:
    """Start every launchable expert of ``specs`` at once; time, weigh and query them."""
    from expert_registry.launcher import WorkerLauncher
    from expert_registry.store import ExpertStore, close_redis, open_redis

    store = ExpertStore(open_redis(None, data_dir / "redis"))
    for spec in specs:  # fresh ports, so a running `serve --demo` is not in the way
        if spec.launch is not None:
            spec = spec.model_copy(update={"base_url": None,
                                           "launch": spec.launch.model_copy(update={"port": None})})
        store.put(spec)
    launcher = WorkerLauncher(store, data_dir)
    try:
        started = time.perf_counter()
        hosts = [s.name for s in specs if s.launch is not None]  # LoRA: one host serves every adapter
        infos = launcher.up(hosts, timeout_s=900, progress=True)
        startup = time.perf_counter() - started
        time.sleep(3)  # let the engines settle before reading memory
        memory = rss_mb([i.pid for i in infos])
        url = {i.name: i.base_url for i in infos}
        latency = {}
        with httpx.Client(timeout=300) as client:
            for s in specs:
                base_url = url[s.name if s.launch is not None else hosts[0]]
                runs = []
                for _ in range(3):
                    t = time.perf_counter()
                    r = client.post(f"{base_url}/chat/completions", json={
                        "model": s.served_model, "messages": [{"role": "user", "content": PROMPT}],
                        "max_tokens": 64, "min_tokens": 64, "temperature": 0})
                    r.raise_for_status()
                    runs.append(time.perf_counter() - t)
                latency[s.name] = round(statistics.median(runs[1:]), 2)  # first call warms up
        return {"workers": len(infos), "experts": len(specs), "startup_s": round(startup, 1),
                "rss_mb": round(memory), "latency_64tok_s": latency}
    finally:
        launcher.down()
        close_redis(store.client)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=None, help="where the fleet is (built if missing)")
    ap.add_argument("--quick", action="store_true", help="the quick fleet build")
    ap.add_argument("--no-readme", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE.parent))
    from expert_registry.fleet.build import fleet_expert_specs
    from expert_registry.local_models import BASE_NAME
    from router_gateway.settings import Settings

    data_dir = args.data_dir or Settings().data_dir
    facts = machine_facts()  # the load average before our own workers add to it
    merged = fleet_expert_specs(data_dir, quick=args.quick, serving="merged")
    lora = fleet_expert_specs(data_dir, quick=args.quick, serving="lora")
    plain = [s for s in merged if s.name == BASE_NAME]
    with tempfile.TemporaryDirectory() as tmp:
        rows = {name: measure(specs, Path(tmp) / name)
                for name, specs in (("plain", plain), ("merged", merged), ("lora", lora))}
    result = {"date": dt.date.today().isoformat(), "commit": git_commit(), "machine": facts,
              "command": "python benchmarks/fleet_serving.py" + (" --quick" if args.quick else ""), **rows}
    path = save_report(result, RESULTS, "fleet_serving")
    table = render(result)
    print(table)
    if not args.no_readme:
        rewrite_section(README, BEGIN, END, table, "### Fleet serving: memory and start-up")
    print(f"wrote {path}")


LABELS = {"plain": "generalist only", "merged": "fleet, merged (default): one worker per expert",
          "lora": "fleet, LoRA: one worker, adapters"}


def render(r: dict) -> str:
    m, a = r["machine"], r["plain"]
    lines = [f"Measured {r['date']} on {m['cpu']} ({m['cores']} cores; load average at start "
             f"{m['loadavg_at_start'][0]:.1f}), commit {r['commit']}, `{r['command']}`.", "",
             "| configuration | workers | experts | start-up s | RSS MB | 64-token answer s, one at a time |",
             "| --- | --- | --- | --- | --- | --- |"]
    for key in ("plain", "merged", "lora"):
        x = r[key]
        lat = ", ".join(f"{n} {s}" for n, s in x["latency_64tok_s"].items())
        lines.append(f"| {LABELS[key]} | {x['workers']} | {x['experts']} | {x['startup_s']} | {x['rss_mb']} | {lat} |")
    lines.append("")
    for key in ("merged", "lora"):
        x = r[key]
        lines.append(f"- {LABELS[key]}: start-up {x['startup_s'] / a['startup_s']:.2f}x and memory "
                     f"{x['rss_mb'] / a['rss_mb']:.2f}x the generalist-only worker, for {x['experts']} experts.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
