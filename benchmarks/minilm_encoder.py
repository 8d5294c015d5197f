"""MiniLM encoder speed and agreement: float32 against bfloat16, side by side in one run.

The routing path embeds each new query with ``router_models.featurize.MiniLMEncoder``. On
CPUs with AMX tiles it runs in bfloat16 (``encoder_dtype``); this script measures what
that buys and what it costs:

- **speed**: one forward pass of a query of L word pieces (L in 16, 32, 64, 128, 256), one
  at a time and in batches of 8 of equal length, on one torch thread (the scorer's
  setting), all variants interleaved round by round so that a noisy neighbour hits each;
  median milliseconds per query and the ratio float32 / bfloat16. bfloat16 runs twice: as
  the encoder does (weights prepacked in oneDNN's layout for calls of up to
  ``PACKED_MAX_ROWS`` rows) and on its plain weights, with the ratio plain / prepacked;
- **agreement**: the cosine similarity of each query's bfloat16 vector to its float32
  vector, over real prompts of the LLMRouter and RouterBench logs (made-up text when the
  logs are absent).

    python benchmarks/minilm_encoder.py
    python benchmarks/minilm_encoder.py --rounds 50 --texts 2000 --no-readme

Results go to ``benchmarks/results/minilm_encoder-*.json`` and the README section marked
``minilm-encoder``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from _common import git_commit, machine_facts, rewrite_section, save_report

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
DATA = HERE.parent.parent / "shared" / "data"
LENGTHS = (16, 32, 64, 128, 256)
VARIANTS = ("float32", "bfloat16", "bfloat16_plain")   # the last: prepacking switched off


def real_texts(n: int) -> tuple[list[str], str]:
    """Up to ``n`` prompts from the LLMRouter queries and RouterBench CSVs, as the featurizer
    reads them (their tails); made-up questions when the logs are absent."""
    from router_models.featurize import query_text

    texts: list[str] = []
    queries = DATA / "llmrouter" / "queries_train.jsonl"
    if queries.exists():
        with queries.open() as f:
            texts += [json.loads(line).get("query", "") for line in f][: n // 2]
    bench = sorted((DATA / "routerbench").glob("*.csv"))
    if bench:
        import pandas as pd

        per = max(1, (n - len(texts)) // len(bench))
        for path in bench:
            texts += pd.read_csv(path, usecols=["prompt"])["prompt"].astype(str).tolist()[:per]
    source = f"prompts of {DATA}" if texts else "made-up questions"
    if not texts:
        texts = [f"Question {i}: what is {i} times {i + 7}? Explain the steps." for i in range(n)]
    return [query_text(t) for t in texts[:n]], source


def time_forward(enc, ids: list[list[int]]) -> float:
    t0 = time.perf_counter()
    enc.forward(ids)
    return time.perf_counter() - t0


def measure(rounds: int, batch: int) -> dict:
    """Median ms per query of each dtype, per length and batch size, interleaved per round."""
    import torch

    from router_models.featurize import PACKED_MAX_ROWS, MiniLMEncoder, minilm_model

    torch.set_num_threads(1)
    model = minilm_model()
    encoders = {v: MiniLMEncoder(model, dtype=v.split("_")[0]) for v in VARIANTS}
    encoders["bfloat16_plain"].packed = None
    rows = []
    for length in LENGTHS:
        for size in (1, batch):
            ids = [[101] + [2000 + (i * 7 + b) % 20000 for i in range(length - 2)] + [102] for b in range(size)]
            times: dict[str, list[float]] = {v: [] for v in VARIANTS}
            for v in VARIANTS:   # warm-up: oneDNN picks and caches its kernels per shape
                for _ in range(3):
                    time_forward(encoders[v], ids)
            for _ in range(rounds):
                for v in VARIANTS:
                    times[v].append(time_forward(encoders[v], ids) / size)
            med = {v: float(np.median(times[v]) * 1e3) for v in VARIANTS}
            rows.append({"word_pieces": length, "batch": size, "ms_per_query": med,
                         "ratio": med["float32"] / med["bfloat16"],
                         "prepacked_gain": med["bfloat16_plain"] / med["bfloat16"],
                         "prepacked": encoders["bfloat16"].packed is not None
                         and length * size <= PACKED_MAX_ROWS})
    return {"rows": rows, "threads": torch.get_num_threads()}


def agreement(n: int) -> dict:
    from router_models.featurize import MiniLMEncoder, minilm_model

    texts, source = real_texts(n)
    model = minilm_model()
    f32 = MiniLMEncoder(model, dtype="float32").encode(texts)
    bf16 = MiniLMEncoder(model, dtype="bfloat16").encode(texts)
    cos = (f32 * bf16).sum(1)
    return {"texts": len(texts), "source": source, "cos_mean": float(cos.mean()),
            "cos_min": float(cos.min()), "cos_p1": float(np.percentile(cos, 1)),
            "max_abs_diff": float(np.abs(f32 - bf16).max())}


def render(report: dict) -> str:
    m, a = report["machine"], report["agreement"]

    lines = [f"Measured {report['date']} on {m['cpu']}, {m['cores']} cores ({m['os']}, Python {m['python']}, "
             f"torch {m['torch']}; AMX tiles: {'yes' if m['amx'] else 'no'}, so the encoder's default here is "
             f"**{m['default_dtype']}**; 1-min load average at start {m['loadavg_at_start'][0]:.2f}), "
             f"commit {report['commit']}, with this command:", "", f"    {report['command']}", "",
             f"One forward pass on {report['speed']['threads']} torch thread, median of "
             f"{report['rounds']} rounds, the variants interleaved; bfloat16 as the encoder runs it "
             f"(weights prepacked for oneDNN in calls of up to {report.get('packed_max_rows')} rows: "
             f"\"yes\" below) and on its plain weights. Raw results: [`{report['json']}`]({report['json']}).", "",
             "| word pieces | batch | float32 ms/query | bfloat16 ms/query | float32 / bfloat16 | prepacked | "
             "bfloat16 plain weights ms/query | plain / prepacked |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["speed"]["rows"]:
        t = r["ms_per_query"]
        plain = t.get("bfloat16_plain")
        lines.append(f"| {r['word_pieces']} | {r['batch']} | {t['float32']:.2f} | {t['bfloat16']:.2f} | "
                     f"{r['ratio']:.2f}x | {'yes' if r.get('prepacked') else 'no'} | "
                     + (f"{plain:.2f} | {r['prepacked_gain']:.2f}x |" if plain is not None else "- | - |"))
    lines += ["", f"Agreement over {a['texts']} {a['source']}: cosine of the bfloat16 vector to the float32 "
              f"one, mean {a['cos_mean']:.5f}, 1st percentile {a['cos_p1']:.5f}, min {a['cos_min']:.5f}; "
              f"largest difference in one coordinate {a['max_abs_diff']:.4f} (the vectors are unit length)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=30, help="timed forward passes per cell and dtype")
    p.add_argument("--batch", type=int, default=8, help="the batched cell's size")
    p.add_argument("--texts", type=int, default=1000, help="real prompts for the agreement check")
    p.add_argument("--results", type=Path, default=HERE / "results")
    p.add_argument("--no-readme", action="store_true", help="do not rewrite benchmarks/README.md")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.batch < 2 or args.texts < 1:
        p.error("--rounds and --texts must be at least 1, --batch at least 2")

    import torch

    from router_models.featurize import PACKED_MAX_ROWS, encoder_dtype

    started = dt.datetime.now(dt.timezone.utc)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    report = {"date": started.strftime("%Y-%m-%d %H:%M UTC"), "commit": git_commit(), "rounds": args.rounds,
              "packed_max_rows": PACKED_MAX_ROWS, "machine": {**machine_facts(), "torch": torch.__version__, "amx": bool(amx),
                          "default_dtype": encoder_dtype()},
              "command": shlex.join(["python", "benchmarks/minilm_encoder.py",
                                     *(sys.argv[1:] if argv is None else argv)])}
    report["speed"] = measure(args.rounds, args.batch)
    report["agreement"] = agreement(args.texts)
    out = save_report(report, args.results, "minilm_encoder", started)
    section = render(report)
    print("\n" + section)
    if not args.no_readme:
        rewrite_section(README, "<!-- minilm-encoder:begin -->", "<!-- minilm-encoder:end -->", section,
                        "### MiniLM encoder: float32 and bfloat16")
        print(f"\nwrote {README} and {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
