"""The fleet's serving cost: one vLLM worker with every domain adapter vs the plain generalist.

Starts, one after the other and each through ``WorkerLauncher`` (the path `serve --demo`
takes), (a) a worker serving only the generalist and (b) the fleet's worker serving the
generalist plus its LoRA experts (``--enable-lora``). For each: seconds from spawn to
healthy, resident memory of the whole process group once healthy (sum of RSS over the
worker's processes), and greedy decode latency of a 64-token answer per served model
(median of the 2 calls after a warm-up call). Ratios (b)/(a) go into the "Fleet" section of ``benchmarks/README.md``;
the serving-cost alternative the adapters replace, one worker per expert, would cost
(a) once per expert.

    python benchmarks/fleet_serving.py [--data-dir DIR] [--quick] [--no-readme]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from _common import git_commit, machine_facts, rewrite_section

HERE = Path(__file__).resolve().parent
README, RESULTS = HERE / "README.md", HERE / "results"
BEGIN, END = "<!-- fleet-serving:begin -->", "<!-- fleet-serving:end -->"
PROMPT = "Write a Python function `total(xs)` that returns the sum of the numbers in the list xs."


def rss_mb(pgid: int) -> float:
    from expert_registry.procgroup import group_members

    total = 0
    for pid in group_members(pgid):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def measure(spec, served: list[str], data_dir: Path) -> dict:
    from expert_registry.launcher import WorkerLauncher
    from expert_registry.store import ExpertStore, close_redis, open_redis

    store = ExpertStore(open_redis(None, data_dir / "redis"))
    spec = spec.model_copy(update={"base_url": None, "launch": spec.launch.model_copy(update={"port": None})})
    store.put(spec)
    launcher = WorkerLauncher(store, data_dir)
    try:
        started = time.perf_counter()
        (info,) = launcher.up([spec.name], timeout_s=900, progress=True)
        startup = time.perf_counter() - started
        time.sleep(3)  # let the engine settle before reading memory
        memory = rss_mb(info.pid)
        latency = {}
        with httpx.Client(timeout=120) as client:
            for model in served:
                runs = []
                for _ in range(3):
                    t = time.perf_counter()
                    r = client.post(f"{info.base_url}/chat/completions", json={
                        "model": model, "messages": [{"role": "user", "content": PROMPT}],
                        "max_tokens": 64, "min_tokens": 64, "temperature": 0})
                    r.raise_for_status()
                    runs.append(time.perf_counter() - t)
                latency[model] = round(statistics.median(runs[1:]), 3)  # first call warms up
        return {"startup_s": round(startup, 1), "rss_mb": round(memory), "latency_64tok_s": latency}
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
    specs = fleet_expert_specs(data_dir, quick=args.quick)
    fleet = next(s for s in specs if s.name == BASE_NAME)
    args_plain = [a for a in fleet.launch.args[:fleet.launch.args.index("--enable-lora")]]
    plain = fleet.model_copy(update={"launch": fleet.launch.model_copy(update={"args": args_plain})})
    adapters = [s.served_model for s in specs if s.launch is None]
    with tempfile.TemporaryDirectory() as tmp:
        a = measure(plain, [BASE_NAME], Path(tmp) / "plain")
        b = measure(fleet, [BASE_NAME, *adapters], Path(tmp) / "fleet")
    result = {"date": dt.date.today().isoformat(), "commit": git_commit(), "machine": machine_facts(),
              "command": "python benchmarks/fleet_serving.py" + (" --quick" if args.quick else ""),
              "plain": a, "fleet": b, "experts_served": 1 + len(adapters)}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"fleet_serving-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    table = render(result)
    print(table)
    if not args.no_readme:
        rewrite_section(README, BEGIN, END, table, "### Fleet serving: memory and start-up")
    print(f"wrote {path}")


def render(r: dict) -> str:
    a, b = r["plain"], r["fleet"]
    base = a["latency_64tok_s"][next(iter(a["latency_64tok_s"]))]
    m = r["machine"]
    lines = [f"Measured {r['date']} on {m['cpu']} ({m['cores']} cores; load average at start "
             f"{m['loadavg_at_start'][0]:.1f}), commit {r['commit']}, `{r['command']}`.", "",
             "| worker | experts served | start-up s | RSS MB | 64-token answer s (per model) |",
             "| --- | --- | --- | --- | --- |",
             f"| generalist only | 1 | {a['startup_s']} | {a['rss_mb']} | {base} |",
             f"| fleet (generalist + LoRA experts) | {r['experts_served']} | {b['startup_s']} | {b['rss_mb']} | "
             + ", ".join(f"{m} {s}" for m, s in b["latency_64tok_s"].items()) + " |", "",
             f"Ratios fleet/plain: start-up {b['startup_s'] / a['startup_s']:.2f}x, memory "
             f"{b['rss_mb'] / a['rss_mb']:.2f}x for {r['experts_served']}x the experts; one worker per expert "
             f"would take about {r['experts_served'] * a['rss_mb']} MB."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
