"""Routing latency: how long one routing decision takes under concurrent load.

A decision is what the gateway does before it dispatches: embed the query with MiniLM,
predict every expert's quality and cost (``BatchedScorer.score``), and rank the experts
with the cost-aware policy (``CostAwarePolicy().rank`` on that one row). Two loads, each
with micro-batching on (``max_batch=32``) and off (``max_batch=1``) interleaved per level:

- closed loop: C asyncio clients in one process each make decisions back to back for a
  fixed time, for C in 1, 4, 16, 64. Latency ~ C / throughput (Little's law), so at high C
  it measures throughput, not what one request waits;
- open loop (``--rate``): decisions arrive as a Poisson process at R per second, whether
  or not earlier ones are done, as requests reach a gateway; a decision's latency counts
  from its scheduled arrival. The goal under load is p50 < 15 ms: the report gives the
  highest rate measured that meets it with every decision answered.

Reported per cell: p50/p90/p99 latency of a decision, decisions/s, the mean batch size and
process CPU per decision.

The router is a classifier on MiniLM embeddings (``--featurizer tfidf``: on TF-IDF;
``--router knn|symbolic|gnn|...``: another kind, any name in ``router_models.ROUTERS``)
trained on a slice of the LLMRouter logs (or loaded with ``--router-dir``); queries are
the held-out prompts of those logs (made-up text when they are absent). With
``--repeat-ratio 0`` (default) every query is new to the scorer, the hard case; a ratio r
draws each query from the ones already asked with probability r (a scorer cache hit).
The featurizer's own embedding cache is off while measuring, so a new query is always
embedded. The scorer runs torch on ``--threads`` threads (default 1) and ``--workers``
batches at once; ``--baseline`` measures the path before the lean encoder:
``SentenceTransformer.encode``, torch's own thread count, batches not split by length.

    python benchmarks/routing_latency.py                     # c=1 4 16 64, 10 s cells
    python benchmarks/routing_latency.py -c 1 --rate 20 50 100 --no-readme
    python benchmarks/routing_latency.py -c 1 16 -d 20 --repeat-ratio 0.3
    python benchmarks/routing_latency.py --featurizer tfidf          # the TF-IDF classifier
    python benchmarks/routing_latency.py --router knn -c 1 --rate 20 50
    python benchmarks/routing_latency.py --router-dir out/classifier --no-readme

Results go to ``benchmarks/results/routing_latency-*.json`` and to the section of
``benchmarks/README.md`` marked with the router's featurizer (``routing-latency:minilm``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import inspect
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import git_commit, machine_facts, rewrite_section, save_report

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
RESULTS = HERE / "results"
DEFAULT_LOGS = HERE.parent.parent / "shared" / "data" / "llmrouter"
DEFAULT_CACHE = Path("~/.cache/switchyard/embeddings.sqlite")
GOAL_P50_MS, GOAL_P99_MS = 10.0, 25.0
GOAL_LOAD_P50_MS = 15.0   # p50 under load: open loop, the highest rate that meets it
MODES = {"batched": 32, "unbatched": 1}  # mode -> BatchedScorer max_batch
TOPICS = ["the French revolution", "photosynthesis", "binary search trees", "compound interest",
          "the Krebs cycle", "Bayes' theorem", "the Treaty of Westphalia", "TCP congestion control"]
ASKS = ["Explain {t} to a high-school student.", "Write three quiz questions about {t}.",
        "What is the most common misconception about {t}? Answer briefly.",
        "Summarise {t} in two sentences, then give one worked example."]


def generated_queries(n: int, seed: int) -> list[str]:
    """Stand-in queries when no logs are at hand: short, varied, all distinct."""
    rng = np.random.default_rng(seed)
    return [ASKS[rng.integers(len(ASKS))].format(t=TOPICS[rng.integers(len(TOPICS))]) + f" (case {i})"
            for i in range(n)]


def make_router(args: argparse.Namespace) -> object:
    """An unfitted router of kind ``--router``, seeded where its class takes a seed."""
    from router_models import ROUTERS

    if args.router not in ROUTERS:
        raise SystemExit(f"unknown router {args.router!r}; this checkout has {sorted(ROUTERS)}")
    cls = ROUTERS[args.router]
    params = inspect.signature(cls).parameters
    cut = {"query_pieces": args.query_pieces} if args.query_pieces and "query_pieces" in params else {}
    if args.router == "classifier":
        return cls(featurizer=args.featurizer, cv=args.cv, seed=args.seed,
                   **(cut if args.featurizer == "minilm" else {}))
    return cls(**({"seed": args.seed} if "seed" in params else {}), **cut)


def train_router(args: argparse.Namespace) -> tuple[object, list[str], dict]:
    """(router, query pool, what was used): a router dir if given, else a router on a slice."""
    from router_models import load_router
    from router_models.logs import load_logs

    logs = load_logs(args.logs) if args.logs.exists() else None
    if logs is not None:
        perm = np.random.default_rng(args.seed).permutation(logs.n_prompts)
        train_idx, pool_idx = np.sort(perm[: args.train_prompts]), perm[args.train_prompts:]
        pool = [logs.prompts[i] for i in pool_idx]
    if args.router_dir:
        router = load_router(args.router_dir)
        info = {"router": f"loaded from {args.router_dir}", "train_prompts": None}
    elif logs is not None:
        t0 = time.perf_counter()
        router = make_router(args).fit(logs.subset(train_idx))
        info = {"router": repr(router), "train_prompts": int(train_idx.size), "train_s": time.perf_counter() - t0}
    else:
        raise SystemExit(f"no logs at {args.logs} to train a router on: pass --router-dir or --logs")
    if logs is not None and pool:
        info["queries_from"] = f"held-out prompts of {args.logs} ({len(pool)})"
    else:
        pool = generated_queries(5000, args.seed)
        info["queries_from"] = "generated text (no logs)"
    info["experts"] = list(router.experts_)
    info["query_chars_median"] = float(np.median([len(q) for q in pool]))
    cap = getattr(getattr(router, "featurizer_", None), "max_pieces", 256)  # a MiniLM router's cut
    info["query_tokens"] = query_tokens(pool, cap)
    return router, pool, info


def query_tokens(pool: list[str], cap: int = 256) -> dict:
    """Length of the queries in MiniLM word pieces ([CLS] and [SEP] included, cut at ``cap``
    as the model cuts them), and how much a batch pads: one forward pass runs every query of
    a batch at the batch's longest length."""
    from router_models.featurize import query_text
    from router_models.logs import count_tokens

    n = np.minimum(np.asarray(count_tokens([query_text(q) for q in pool])) + 2, cap)
    out = {"p50": float(np.median(n)), "mean": float(n.mean()), "p90": float(np.percentile(n, 90)),
           "p99": float(np.percentile(n, 99)), "share_at_cap": float((n >= cap).mean()), "cap": cap}
    for b in (4, 16, 32):
        chunks = n[: n.size // b * b].reshape(-1, b)
        if chunks.size:
            out[f"padded_work_batch_{b}"] = float(chunks.max(axis=1).mean() / n.mean())
    return out


class QueryStream:
    """New queries from the pool (a numbered variant once it runs out, so none repeats by
    accident), or with probability ``repeat`` one already asked."""

    def __init__(self, pool: list[str], repeat: float, seed: int):
        self.pool, self.repeat = pool, repeat
        self.rng = np.random.default_rng(seed)
        self.asked: list[str] = []
        self.i = 0

    def next(self) -> str:
        if self.asked and self.rng.random() < self.repeat:
            return self.asked[self.rng.integers(len(self.asked))]
        text = self.pool[self.i % len(self.pool)]
        if self.i >= len(self.pool):
            text += f" (variant {self.i // len(self.pool)})"
        self.i += 1
        self.asked.append(text)
        return text


def make_scorer(router, max_batch: int, args: argparse.Namespace) -> object:
    from router_models.serving import BatchedScorer

    return BatchedScorer(router, max_batch=max_batch, threads=args.threads or None, workers=args.workers,
                         by_length=not args.baseline)


async def run_cell(router, pool: list[str], max_batch: int, clients: int, seconds: float,
                   warmup: float, repeat: float, seed: int, args: argparse.Namespace) -> dict:
    """C closed-loop clients for ``warmup + seconds``; latencies of the measured part only."""
    from router_models.policy import CostAwarePolicy

    scorer, policy = make_scorer(router, max_batch, args), CostAwarePolicy()
    stream, scale = QueryStream(pool, repeat, seed), router.cost_scale_
    latencies: list[float] = []
    hits = 0
    loop = asyncio.get_running_loop()
    start = loop.time()
    measure_from, stop = start + warmup, start + warmup + seconds

    async def client() -> None:
        nonlocal hits
        while (now := loop.time()) < stop:
            t0 = time.perf_counter()
            s = await scorer.score(stream.next())
            policy.rank(s.quality[None, :], s.cost[None, :], scale)
            if now >= measure_from:
                latencies.append(time.perf_counter() - t0)
                hits += s.cached

    await asyncio.sleep(0)
    cpu0, batches0, scored0 = None, 0, 0

    async def mark() -> None:
        nonlocal cpu0, batches0, scored0
        await asyncio.sleep(max(0.0, measure_from - loop.time()))
        cpu0, batches0, scored0 = time.process_time(), scorer.batches, scorer.scored

    marker = asyncio.ensure_future(mark())
    await asyncio.gather(*(client() for _ in range(clients)))
    await marker
    cpu = time.process_time() - cpu0
    lat = np.asarray(latencies) * 1e3
    n, batches, scored = lat.size, scorer.batches - batches0, scorer.scored - scored0
    p50, p90, p99 = np.percentile(lat, [50, 90, 99]) if n else (np.nan,) * 3
    return {"concurrency": clients, "max_batch": max_batch, "decisions": int(n), "decisions_per_s": n / seconds,
            "p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99),
            "mean_ms": float(lat.mean()) if n else None, "max_ms": float(lat.max()) if n else None,
            "cache_hits": int(hits), "mean_batch": scored / batches if batches else None,
            "cpu_ms_per_decision": 1e3 * cpu / n if n else None, "cpu_share": cpu / seconds}


async def run_open_cell(router, pool: list[str], max_batch: int, rate: float, seconds: float,
                        warmup: float, repeat: float, seed: int, args: argparse.Namespace) -> dict:
    """Poisson arrivals at ``rate`` per second for ``warmup + seconds``, then up to
    ``max(10, seconds)`` s for the backlog to clear. Latency counts from a decision's
    scheduled arrival (a loop too busy to start it on time is not forgiven); decisions that
    arrive in the measured part count, CPU is per decision finished from its start on."""
    from router_models.policy import CostAwarePolicy

    scorer, policy = make_scorer(router, max_batch, args), CostAwarePolicy()
    stream, scale = QueryStream(pool, repeat, seed), router.cost_scale_
    rng = np.random.default_rng(seed + 7919)
    loop = asyncio.get_running_loop()
    start = loop.time()
    measure_from, stop = start + warmup, start + warmup + seconds
    latencies: list[float] = []
    finished_after_start = hits = 0

    async def decide(at: float, text: str) -> None:
        nonlocal finished_after_start, hits
        s = await scorer.score(text)
        policy.rank(s.quality[None, :], s.cost[None, :], scale)
        done = loop.time()
        finished_after_start += done >= measure_from
        if at >= measure_from:
            latencies.append(done - at)
            hits += s.cached

    tasks, at, mark, arrived = [], start, None, 0
    while (at := at + rng.exponential(1.0 / rate)) < stop:
        await asyncio.sleep(max(0.0, at - loop.time()))
        if mark is None and at >= measure_from:
            mark = (time.process_time(), scorer.batches, scorer.scored)
        arrived += at >= measure_from
        tasks.append(loop.create_task(decide(at, stream.next())))
    pending: set = set()
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=max(10.0, seconds))
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    cpu0, batches0, scored0 = mark or (time.process_time(), scorer.batches, scorer.scored)
    cpu, batches, scored = time.process_time() - cpu0, scorer.batches - batches0, scorer.scored - scored0
    lat = np.asarray(latencies) * 1e3
    n = lat.size
    p50, p90, p99 = np.percentile(lat, [50, 90, 99]) if n else (np.nan,) * 3
    return {"rate": rate, "max_batch": max_batch, "arrived": arrived, "decisions": int(n),
            "unfinished": len(pending), "decisions_per_s": n / seconds,
            "p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99),
            "mean_ms": float(lat.mean()) if n else None, "max_ms": float(lat.max()) if n else None,
            "cache_hits": int(hits), "mean_batch": scored / batches if batches else None,
            "cpu_ms_per_decision": 1e3 * cpu / finished_after_start if finished_after_start else None}


def busy_cpu_seconds() -> float | None:
    """CPU seconds all processes of the machine have spent busy (Linux /proc/stat), or None."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    ticks = [int(x) for x in fields]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait


def forget_token_ids() -> None:
    """Clear the MiniLM encoder's ids of recent texts, if it was built."""
    from router_models import featurize

    if featurize._ENCODER is not None:
        featurize._ENCODER.forget_ids()


def measure(router, pool: list[str], args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """(closed-loop cells, open-loop cells); each records how many cores other processes
    kept busy meanwhile."""
    levels = [("c", c, run_cell) for c in args.concurrency] + [("rate", r, run_open_cell) for r in args.rate]
    closed, opened = [], []
    for kind, level, run in levels:
        for mode, max_batch in MODES.items():
            forget_token_ids()   # both modes ask the same queries: neither finds them tokenized
            busy0, own0, t0 = busy_cpu_seconds(), time.process_time(), time.perf_counter()
            cell = asyncio.run(run(router, pool, max_batch, level, args.duration, args.warmup,
                                   args.repeat_ratio, args.seed + int(level), args))
            if busy0 is not None:
                other = busy_cpu_seconds() - busy0 - (time.process_time() - own0)
                cell["other_cores_busy"] = max(0.0, other) / (time.perf_counter() - t0)
            (closed if kind == "c" else opened).append({"mode": mode, **cell})
            late = f"  unfinished {cell['unfinished']}" if cell.get("unfinished") else ""
            print(f"{mode:9} {kind}={level:<5g} {cell['decisions_per_s']:8.1f} decisions/s  p50 {cell['p50_ms']:7.2f} ms  "
                  f"p90 {cell['p90_ms']:7.2f}  p99 {cell['p99_ms']:7.2f} ms  batch {cell['mean_batch'] or 0:5.1f}  "
                  f"CPU {cell['cpu_ms_per_decision'] or 0:.2f} ms/decision{late}", file=sys.stderr, flush=True)
    return closed, opened


def goal(cells: list[dict]) -> dict:
    """The goal is per query on an unloaded gateway: batched mode at the lowest concurrency."""
    low = min(c["concurrency"] for c in cells)
    cell = next(c for c in cells if c["mode"] == "batched" and c["concurrency"] == low)
    met = cell["p50_ms"] < GOAL_P50_MS and cell["p99_ms"] < GOAL_P99_MS
    levels = [c["concurrency"] for c in cells if c["mode"] == "batched"
              and c["p50_ms"] < GOAL_P50_MS and c["p99_ms"] < GOAL_P99_MS]
    return {"concurrency": low, "p50_ms": cell["p50_ms"], "p99_ms": cell["p99_ms"], "met": bool(met),
            "levels_met_batched": levels}


def sustained(open_cells: list[dict]) -> dict:
    """Per mode, the highest open-loop rate with p50 < 15 ms and every decision answered."""
    out = {}
    for mode in MODES:
        ok = [c["rate"] for c in open_cells if c["mode"] == mode and not c["unfinished"]
              and c["decisions"] and c["p50_ms"] < GOAL_LOAD_P50_MS]
        out[mode] = max(ok) if ok else None
    return out


def render(report: dict) -> str:
    m, s, g, info = report["machine"], report["settings"], report["goal"], report["router"]
    others = [c["other_cores_busy"] for c in report["cells"] + report.get("open_cells", []) if "other_cores_busy" in c]
    # at the end the load average counts this benchmark too: other processes' CPU says more
    quarter = 0.25 * (m["cores"] or 1)
    busy = m["loadavg_at_start"][0] > quarter or max(others, default=0.0) > quarter
    lines = [f"Measured {report['date']} on {m['cpu']}, {m['cores']} cores ({m['os']}, Python {m['python']}, "
             f"torch {m['torch']}, {m['torch_threads']} threads by default; 1-min load average at start "
             f"{m['loadavg_at_start'][0]:.2f}"
             + (": **the machine was not quiet**, other processes competed for the cores" if busy else "")
             + f"; {m['loadavg_at_end'][0]:.2f} at the end, this benchmark included"
             + "), with this command:", "", f"    {report['command']}", "",
             f"Router: {info['router']}" + (f", trained on {info['train_prompts']} prompts in {info['train_s']:.0f} s"
                                            if info.get("train_prompts") else "")
             + f", {len(info['experts'])} experts. Queries: {info['queries_from']}, median "
             f"{info['query_chars_median']:.0f} characters; repeat ratio {s['repeat_ratio']:g}; "
             f"{s['duration_s']:g} s measured per cell after {s['warmup_s']:g} s warm-up. Raw results: "
             f"[`{report['json']}`]({report['json']}).", "",
             "| goal | target | measured | met |", "| --- | --- | --- | --- |",
             f"| decision latency p50, c={g['concurrency']}, batched | < {GOAL_P50_MS:g} ms | {g['p50_ms']:.2f} ms | "
             f"{'yes' if g['p50_ms'] < GOAL_P50_MS else '**no**'} |",
             f"| decision latency p99, c={g['concurrency']}, batched | < {GOAL_P99_MS:g} ms | {g['p99_ms']:.2f} ms | "
             f"{'yes' if g['p99_ms'] < GOAL_P99_MS else '**no**'} |"]
    if report.get("open_cells"):
        best = report["sustained"]["batched"]
        lines.append(f"| decision latency p50 under load (open loop), batched | < {GOAL_LOAD_P50_MS:g} ms | "
                     + (f"met up to {best:g} decisions/s (highest rate measured that meets it) | yes |" if best else
                        f"not met at any rate measured (lowest {min(s['rates']):g}/s) | **no** |"))
    path = ("" if not info.get("reads_minilm") else
            ", **baseline** (SentenceTransformer.encode, batches not split by length)" if s["baseline"] else
            f", lean MiniLM encoder in {info.get('encoder_dtype', 'float32')}, batches split by length")
    lines += ["", f"Scorer: torch on {s['threads'] or 'its own number of'} thread(s), {s['workers']} worker(s)"
              + path + ".", "",
             "| c | batched decisions/s | unbatched decisions/s | batched / unbatched | batched p50 / p90 / p99 ms | "
             "unbatched p50 / p90 / p99 ms | mean batch | CPU ms/decision batched / unbatched |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    cell = {(c["mode"], c["concurrency"]): c for c in report["cells"]}
    for c in sorted({c["concurrency"] for c in report["cells"]}):
        b, u = cell["batched", c], cell["unbatched", c]
        lines.append(f"| {c} | {b['decisions_per_s']:,.0f} | {u['decisions_per_s']:,.0f} | "
                     f"{b['decisions_per_s'] / u['decisions_per_s']:.2f}x | "
                     f"{b['p50_ms']:.1f} / {b['p90_ms']:.1f} / {b['p99_ms']:.1f} | "
                     f"{u['p50_ms']:.1f} / {u['p90_ms']:.1f} / {u['p99_ms']:.1f} | {b['mean_batch'] or 0:.1f} | "
                     f"{b['cpu_ms_per_decision'] or 0:.2f} / {u['cpu_ms_per_decision'] or 0:.2f} |")
    if report.get("open_cells"):
        lines += ["", "Open loop (Poisson arrivals; latency from the scheduled arrival):", "",
                  "| rate /s | mode | answered /s | p50 / p90 / p99 ms | unfinished | mean batch | CPU ms/decision |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for c in report["open_cells"]:
            lines.append(f"| {c['rate']:g} | {c['mode']} | {c['decisions_per_s']:,.1f} | {c['p50_ms']:.1f} / "
                         f"{c['p90_ms']:.1f} / {c['p99_ms']:.1f} | {c['unfinished']} | {c['mean_batch'] or 0:.1f} | "
                         f"{c['cpu_ms_per_decision'] or 0:.2f} |")
    t = info["query_tokens"]
    pads = [(b, t.get(f"padded_work_batch_{b}")) for b in (4, 16, 32)]
    lines += ["", f"Query length in MiniLM word pieces (cut at {t['cap']}): p50 {t['p50']:.0f}, mean {t['mean']:.0f}, "
              f"p90 {t['p90']:.0f}, p99 {t['p99']:.0f}; {t['share_at_cap']:.1%} at the cut. A batch runs every query "
              "at the batch's longest length: batches of " + "/".join(str(b) for b, w in pads if w)
              + " of these queries do " + "/".join(f"{w:.1f}x" for _, w in pads if w)
              + " the transformer work of the same queries one at a time (for the MiniLM featurizer)."]
    if others:
        lines += ["", f"Other processes kept {np.mean(others):.2f} cores busy on average while the cells ran "
                  f"(most in one cell: {max(others):.2f}; from /proc/stat minus this process)."]
    hits = sum(c["cache_hits"] for c in report["cells"] + report.get("open_cells", []))
    lines += ["", f"Scorer cache hits over all cells: {hits}. Closed loop: at c > 1 a decision's latency "
              "includes waiting for the decisions ahead of it (Little's law: latency ~ c / throughput)."]
    return "\n".join(lines)


def write_readme(key: str, section: str, path: Path = README) -> None:
    """Replace the text between the markers of ``key`` (the router's featurizer); append
    a section if they are missing."""
    rewrite_section(path, f"<!-- routing-latency:{key}:begin -->", f"<!-- routing-latency:{key}:end -->",
                    section, f"### Routing latency, {key}")


def machine() -> dict:
    import torch

    return {**machine_facts(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--logs", type=Path, default=DEFAULT_LOGS, help="logs to train on and draw queries from")
    p.add_argument("--router-dir", type=Path, default=None, help="a saved router instead of training one")
    p.add_argument("--router", default="classifier",
                   help="kind of router to train (a name in router_models.ROUTERS: knn, classifier, symbolic, ...)")
    p.add_argument("--featurizer", choices=("minilm", "tfidf"), default="minilm",
                   help="features of the classifier trained here (default minilm)")
    p.add_argument("--query-pieces", type=int, default=None,
                   help="word pieces MiniLM reads of a query's end (default: the router's own, 128)")
    p.add_argument("--train-prompts", type=int, default=1000, help="prompts to train the classifier on")
    p.add_argument("--cv", type=int, default=5, help="inner CV folds of the classifier's model selection")
    p.add_argument("-c", "--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--rate", type=float, nargs="*", default=[],
                   help="open-loop levels: Poisson arrivals per second (e.g. --rate 20 50 100)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="MiniLM encoder dtype (default: bfloat16 on AMX CPUs, else float32)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the scorer (0: torch's own count)")
    p.add_argument("--workers", type=int, default=1, help="batches the scorer runs at once")
    p.add_argument("--baseline", action="store_true",
                   help="the path before the lean encoder: SentenceTransformer.encode, torch's own threads, "
                        "batches not split by length (implies --threads 0)")
    p.add_argument("-d", "--duration", type=float, default=10.0, help="seconds measured per cell")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of discarded load before each cell")
    p.add_argument("--repeat-ratio", type=float, default=0.0, help="share of queries asked before (cache hits)")
    p.add_argument("--embedding-cache", choices=("off", "sqlite"), default="off",
                   help="while measuring: no embedding cache (default), or a fresh SQLite-backed one")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="SQLite embedding cache used for training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--no-readme", action="store_true", help="do not rewrite benchmarks/README.md")
    args = p.parse_args(argv)
    if any(c < 1 for c in args.concurrency) or args.duration <= 0 or args.warmup < 0:
        p.error("concurrency and duration must be positive")
    if not 0.0 <= args.repeat_ratio < 1.0:
        p.error("--repeat-ratio must be in [0, 1)")
    if any(r <= 0 for r in args.rate) or args.threads < 0 or args.workers < 1:
        p.error("rates must be positive, --threads >= 0 and --workers >= 1")
    if args.baseline:
        args.threads = 0
    if args.dtype:
        os.environ["SWITCHYARD_MINILM_DTYPE"] = args.dtype
    args.concurrency, args.rate = sorted(set(args.concurrency)), sorted(set(args.rate))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from router_models.featurize import EmbeddingCache, minilm_encoder, use_cache_file

    started = dt.datetime.now(dt.timezone.utc)
    report: dict = {"date": started.strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(), "commit": git_commit(),
                    "command": shlex.join(["python", "benchmarks/routing_latency.py",
                                           *(sys.argv[1:] if argv is None else argv)])}
    use_cache_file(args.cache.expanduser())  # training reads embeddings from the cache
    router, pool, report["router"] = train_router(args)
    with tempfile.TemporaryDirectory(prefix="switchyard-latency-") as tmp:
        # measuring: a new query must be embedded, as it would be for a new query in the gateway
        featurizer = getattr(router, "featurizer_", None)
        if hasattr(featurizer, "cache"):
            featurizer.cache = (EmbeddingCache(capacity=0) if args.embedding_cache == "off"
                                else EmbeddingCache(Path(tmp) / "emb.sqlite"))
        report["router"]["reads_minilm"] = hasattr(featurizer, "token_lengths")
        if report["router"]["reads_minilm"]:
            report["router"]["encoder_dtype"] = minilm_encoder().dtype
        if args.baseline and report["router"]["reads_minilm"]:
            minilm_encoder().lean = False   # SentenceTransformer.encode, as before the lean encoder
        router.predict_quality([pool[0]])  # loads MiniLM before the clock starts
        report["cells"], report["open_cells"] = measure(router, pool, args)
    report["machine"]["loadavg_at_end"] = os.getloadavg()
    report["settings"] = {"duration_s": args.duration, "warmup_s": args.warmup, "repeat_ratio": args.repeat_ratio,
                          "embedding_cache": args.embedding_cache, "modes": MODES, "seed": args.seed,
                          "queries_from": report["router"]["queries_from"], "rates": args.rate,
                          "threads": args.threads, "workers": args.workers, "baseline": args.baseline}
    report["goal"] = goal(report["cells"])
    report["sustained"] = sustained(report["open_cells"])
    out = save_report(report, args.results, "routing_latency", started)
    section = render(report)
    print("\n" + section)
    if not args.no_readme:
        write_readme(getattr(router, "featurizer", router.name), section)
        print(f"\nwrote {README} and {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
