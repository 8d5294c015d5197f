"""Gateway overhead: the same load sent straight to an upstream and through Switchyard.

One run starts everything on loopback: the load-test upstream
(``benchmarks/loadtest_upstream.py``, canned answers, not a model) in two flavours, and
in front of each its own Switchyard gateway on embedded Redis in a temporary data dir,
with that upstream registered as expert ``loadtest``; and (when it can be installed) a
LiteLLM proxy in front of the raw upstream. ``wrk`` then drives each target in turn
with identical POST bodies, for non-streaming and streaming chat completions at each
concurrency (closed loop: C keep-alive connections, each sending its next request when
the last one finished), the targets interleaved per cell.

The two upstream flavours (``--upstreams``, default both):

- ``raw``: the raw-socket upstream (``asyncio.Protocol`` + httptools, no ASGI layer),
  many times faster than any Python HTTP server. Targets ``direct``, ``gateway``,
  ``litellm`` (the names of earlier runs).
- ``asgi``: the same-stack upstream, the same answers as a raw ASGI app on uvicorn with
  uvloop and httptools, the HTTP stack the gateway runs on. Targets ``direct-asgi``,
  ``gateway-asgi``. The throughput goal's "about 50% is the practical ceiling" (the
  gateway does at least twice the HTTP work of the upstream) holds against this one.

One gateway per upstream rather than one gateway with two experts: each gateway is
configured exactly as a single-upstream run (one expert, the same request body), so its
per-request work and its CPU (measured per process) are not shared between the two;
the idle one costs next to nothing (its periodic registry refreshes and upstream health
probe) while the other is measured.

Reported per cell: req/s, p50/p99 latency (wrk's per-request histogram) and server CPU
per request; derived, per upstream flavour: added latency (target minus direct p50/p99
at concurrency 1) and the target/direct throughput ratio. Results go to
``benchmarks/results/*.json`` and to the "Gateway overhead" section of
``benchmarks/README.md`` (see there for details).

    python benchmarks/gateway_overhead.py                      # c=1 and c=64, 8 s cells
    python benchmarks/gateway_overhead.py -c 1 64 256 -d 15    # more concurrency, longer
    python benchmarks/gateway_overhead.py --no-litellm --no-readme --upstreams asgi

Needs ``wrk`` on PATH (Debian/Ubuntu: ``apt-get install wrk``; macOS: ``brew install wrk``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import resource
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import httpx
from _common import git_commit, machine_facts, rewrite_section

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
RESULTS = HERE / "results"
BEGIN, END = "<!-- gateway-overhead:begin -->", "<!-- gateway-overhead:end -->"
EXPERT = "loadtest"
PROMPT = [{"role": "user", "content": "Say hello in one short sentence."}]
GOAL_ADDED_P50_MS = 1.0  # added latency p50 at concurrency 1
GOAL_THROUGHPUT_SHARE = 0.30  # gateway req/s at concurrency 64 vs direct
#: upstream flavours (``loadtest_upstream.py --server``): short name for the tables, and
#: what the goal rows say the gateway is read against
UPSTREAMS = {"raw": "raw socket", "asgi": "uvicorn ASGI"}
UPSTREAM_GOAL_LABELS = {"raw": "raw-socket upstream", "asgi": "same-stack upstream (uvicorn ASGI)"}
LITELLM_VENV = Path(tempfile.gettempdir()) / "switchyard-litellm-venv"
# litellm>=1.110 moved the proxy into a separate `litellm-proxy` package; where that is
# not installable, the newest release with the proxy inside the litellm package
LITELLM_FALLBACK = "litellm[proxy]<1.110"
LUA = """wrk.method = "POST"
wrk.body = [==[%(body)s]==]
wrk.headers["Content-Type"] = "application/json"
%(headers)s
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests":%%d,"duration_us":%%d,"p50_us":%%d,"p99_us":%%d,' ..
    '"mean_us":%%.1f,"max_us":%%d,"errors":%%d}\\n', summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), latency.mean, latency.max,
    e.connect + e.read + e.write + e.status + e.timeout))
end
"""


class BenchError(RuntimeError):
    """A part of the benchmark could not be started or answered wrongly."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout_s: float, log: Path) -> None:
    """Poll ``url`` until it answers 200, the process dies, or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{proc.args[0]} exited ({proc.returncode}); log tail:\n{log.read_text()[-2000:]}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise BenchError(f"{url} not healthy after {timeout_s:.0f} s; log tail:\n{log.read_text()[-2000:]}")


def cpu_seconds(pid: int) -> float:
    """utime+stime of ``pid`` and its live descendants, from /proc (0.0 elsewhere)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    stats: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = entry.read_text().rsplit(")", 1)[1].split()
            stats[int(entry.parent.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += stats.get(p, (0, 0.0))[1]
        todo += [c for c, (ppid, _) in stats.items() if ppid == p]
    return total


class Fleet(contextlib.ExitStack):
    """Starts the servers under test as process groups and stops them on exit."""

    def __init__(self, workdir: Path) -> None:
        super().__init__()
        self.workdir = workdir

    def spawn(self, name: str, argv: list[str], env: dict | None = None,
              cwd: Path | None = None) -> tuple[subprocess.Popen, Path]:
        log = self.workdir / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                    start_new_session=True)
        self.callback(self._stop, proc)
        return proc, log

    @staticmethod
    def _stop(proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def target_name(kind: str, upstream: str) -> str:
    """``direct``/``gateway``/``litellm`` in front of the raw upstream (the names of
    earlier runs' JSON), ``<kind>-<flavour>`` in front of another flavour."""
    return kind if upstream == "raw" else f"{kind}-{upstream}"


def split_target(name: str) -> tuple[str, str]:
    """(kind, upstream flavour) of a target name: the inverse of :func:`target_name`."""
    kind, _, upstream = name.partition("-")
    return kind, upstream or "raw"


def start_upstream(fleet: Fleet, server: str = "raw") -> tuple[str, int]:
    """``loadtest_upstream.py --server <server>`` on a free port."""
    port = free_port()
    argv = [sys.executable, str(HERE / "loadtest_upstream.py"), "--port", str(port), "--server", server]
    proc, log = fleet.spawn(target_name("upstream", server), argv)
    wait_http(f"http://127.0.0.1:{port}/health", proc, 15, log)
    return f"http://127.0.0.1:{port}/v1", proc.pid


def start_gateway(fleet: Fleet, upstream: str, workers: int = 1, name: str = "gateway",
                  source: Path | None = None, env_extra: dict[str, str] | None = None,
                  more_experts: dict[str, str] | None = None, add_args: list[str] | None = None
                  ) -> tuple[str, int]:
    """Embedded-Redis gateway in a temp data dir, the upstream registered via the CLI;
    ``name`` names its log and data dir, so that several can run side by side. With
    ``source`` (a checkout of the project), the code in that tree instead of the installed
    ``switchyard``: ``python -m router_gateway.cli`` run from there, so its packages win.
    ``env_extra`` adds settings (``SWITCHYARD_*``) to its environment; ``more_experts``
    registers further experts, name -> base URL, besides ``loadtest``; ``add_args`` are
    appended to each ``experts add`` (prices, for example)."""
    if source is None:
        exe = shutil.which("switchyard", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        if exe is None:
            raise BenchError("the `switchyard` command is not installed (pip install -e .)")
        cli = [exe]
    else:
        cli = [sys.executable, "-m", "router_gateway.cli"]
    env = {k: v for k, v in os.environ.items() if k not in ("SWITCHYARD_REDIS_URL", "SWITCHYARD_API_KEYS")}
    env |= {"SWITCHYARD_DATA_DIR": str(fleet.workdir / f"{name}-data"), "SWITCHYARD_LOG_LEVEL": "warning"}
    env |= env_extra or {}
    if source is not None:
        env["PYTHONPATH"] = str(source)
    for expert, url in {EXPERT: upstream, **(more_experts or {})}.items():
        add = [*cli, "experts", "add", expert, "--backend", "openai", "--base-url", url, "--served-model", expert,
               *(add_args or ())]
        done = subprocess.run(add, env=env, cwd=source, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise BenchError(f"switchyard experts add {expert} failed:\n{done.stdout}{done.stderr}")
    port = free_port()
    proc, log = fleet.spawn(name, [*cli, "serve", "--host", "127.0.0.1", "--port", str(port),
                                   "--workers", str(workers)], env, cwd=source)
    wait_http(f"http://127.0.0.1:{port}/health", proc, 60, log)
    return f"http://127.0.0.1:{port}/v1", proc.pid


def ensure_litellm_venv(venv: Path) -> Path:
    """The LiteLLM proxy lives in its own venv: ``litellm[proxy]`` would downgrade
    packages (rich, websockets) that the project venv pins higher."""
    exe = venv / "bin" / "litellm"
    if exe.exists():
        return exe
    print(f"creating {venv} with litellm[proxy] (a few minutes, once) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    spec = "litellm[proxy]"
    with contextlib.suppress(metadata.PackageNotFoundError):
        spec += f"=={metadata.version('litellm')}"  # the same release the project venv has
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    try:
        subprocess.run([*pip, spec], check=True)
    except subprocess.CalledProcessError:
        print(f"{spec} cannot be installed here; installing {LITELLM_FALLBACK} instead ...", flush=True)
        subprocess.run([*pip, LITELLM_FALLBACK], check=True)
    return exe


def start_litellm(fleet: Fleet, upstream: str, venv: Path) -> tuple[str, int, str]:
    exe = ensure_litellm_venv(venv)
    config = fleet.workdir / "litellm.yaml"
    config.write_text(json.dumps({"model_list": [{"model_name": EXPERT, "litellm_params": {
        "model": f"openai/{EXPERT}", "api_base": upstream, "api_key": "unused"}}]}))
    key = "sk-" + secrets.token_hex(16)  # the proxy refuses to start without a master key
    env = os.environ | {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_MASTER_KEY": key,
                        "LITELLM_LOG": "ERROR"}
    port = free_port()
    proc, log = fleet.spawn("litellm", [str(exe), "--config", str(config), "--host", "127.0.0.1",
                                        "--port", str(port)], env)
    wait_http(f"http://127.0.0.1:{port}/health/liveliness", proc, 180, log)
    return f"http://127.0.0.1:{port}/v1", proc.pid, key


def request_body(stream: bool) -> dict:
    body = {"model": EXPERT, "messages": PROMPT, "max_tokens": 16}
    return body | {"stream": True, "stream_options": {"include_usage": True}} if stream else body


def check_target(name: str, base: str, headers: dict) -> None:
    """One request per mode: 200, the canned answer, and [DONE] when streaming."""
    with httpx.Client(timeout=30, headers=headers) as client:
        r = client.post(f"{base}/chat/completions", json=request_body(False))
        if r.status_code != 200 or "canned answer" not in r.text:
            raise BenchError(f"{name}: non-streaming check failed: {r.status_code} {r.text[:300]}")
        r = client.post(f"{base}/chat/completions", json=request_body(True))
        if r.status_code != 200 or "canned " not in r.text or not r.text.rstrip().endswith("data: [DONE]"):
            raise BenchError(f"{name}: streaming check failed: {r.status_code} {r.text[-300:]}")


def run_wrk(wrk: str, url: str, lua: Path, conns: int, seconds: int) -> dict:
    argv = [wrk, "-t1", f"-c{conns}", f"-d{seconds}s", "--timeout", "30s", "-s", str(lua), url]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    match = re.search(r"^WRKJSON (.*)$", out.stdout, re.M)
    if out.returncode != 0 or match is None:
        raise BenchError(f"wrk failed ({out.returncode}): {out.stdout[-500:]} {out.stderr[-500:]}")
    return json.loads(match.group(1))


def measure(args: argparse.Namespace, targets: dict, workdir: Path) -> list[dict]:
    """Every (mode, concurrency) cell for every target, targets interleaved per cell so
    that drift in background load hits them alike."""
    rows = []
    for stream in (False, True):
        for conns in args.concurrency:
            for name, (base, pid, headers) in targets.items():
                lua = workdir / f"{name}-{'stream' if stream else 'plain'}.lua"
                lua.write_text(LUA % {"body": json.dumps(request_body(stream)), "headers": "\n".join(
                    f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items())})
                url = f"{base}/chat/completions"
                run_wrk(args.wrk, url, lua, conns, args.warmup)
                cpu0, gen0 = cpu_seconds(pid), resource.getrusage(resource.RUSAGE_CHILDREN)
                res = run_wrk(args.wrk, url, lua, conns, args.duration)
                cpu, gen1 = cpu_seconds(pid) - cpu0, resource.getrusage(resource.RUSAGE_CHILDREN)
                gen = gen1.ru_utime + gen1.ru_stime - gen0.ru_utime - gen0.ru_stime
                n, secs = res["requests"], res["duration_us"] / 1e6
                row = {"target": name, "upstream": split_target(name)[1], "stream": stream, "concurrency": conns,
                       "requests": n, "errors": res["errors"], "rps": n / secs, "p50_ms": res["p50_us"] / 1e3,
                       "p99_ms": res["p99_us"] / 1e3, "mean_ms": res["mean_us"] / 1e3,
                       "max_ms": res["max_us"] / 1e3, "server_cpu_us_per_req": 1e6 * cpu / n if n else None,
                       "wrk_cpu_us_per_req": 1e6 * gen / n if n else None, "wrk_cpu_share": gen / secs}
                rows.append(row)
                print(f"{name:12} {'stream' if stream else 'plain ':6} c={conns:<4} {row['rps']:9.0f} req/s  "
                      f"p50 {row['p50_ms']:8.3f} ms  p99 {row['p99_ms']:8.3f} ms  errors {row['errors']}",
                      flush=True)
    return rows


def machine(wrk: str) -> dict:
    done = subprocess.run([wrk, "-v"], capture_output=True, text=True)
    wrk_version = (done.stdout + done.stderr).strip().split(" Copyright")[0]
    return {**machine_facts(), "wrk": wrk_version.splitlines()[0] if wrk_version else None}


def summarize(rows: list[dict]) -> dict:
    """Added latency at c=1 and throughput ratios at every concurrency, per mode, each
    target read against the direct target of its own upstream flavour."""
    cell = {(r["target"], r["stream"], r["concurrency"]): r for r in rows}
    out: dict = {}
    for (target, stream, conns), r in cell.items():
        kind, upstream = split_target(target)
        if kind == "direct":
            continue
        direct = cell[(target_name("direct", upstream), stream, conns)]
        key = f"{target}/{'stream' if stream else 'plain'}/c{conns}"
        out[key] = {"upstream": upstream, "direct": direct["target"], "rps_ratio": r["rps"] / direct["rps"],
                    "added_p50_ms": r["p50_ms"] - direct["p50_ms"], "added_p99_ms": r["p99_ms"] - direct["p99_ms"]}
    return out


def fmt_ms(x: float) -> str:
    return f"{x:.3f}" if abs(x) < 10 else f"{x:.1f}"


def upstreams_in(rows: list[dict]) -> list[str]:
    """The flavours measured, same-stack first: the goal's reasoning is about that one."""
    present = {split_target(r["target"])[1] for r in rows}
    return [u for u in ("asgi", "raw") if u in present]


def goal_rows(summary: dict, conc: list[int], upstreams: list[str]) -> list[str]:
    """The goals table: added latency at c=1 read against the raw upstream (the same-stack
    one when only that ran) and the throughput goal against every flavour measured."""
    big = 64 if 64 in conc else conc[-1]
    lat_up = "raw" if "raw" in upstreams else upstreams[0]
    lines = ["| goal | target | measured | met |", "| --- | --- | --- | --- |"]
    for mode in ("plain", "stream"):
        label = "non-streaming" if mode == "plain" else "streaming"
        if 1 in conc:
            added = summary[f"{target_name('gateway', lat_up)}/{mode}/c1"]["added_p50_ms"]
            lines.append(f"| added latency p50, c=1, {label}, vs {UPSTREAM_GOAL_LABELS[lat_up]} | "
                         f"< {GOAL_ADDED_P50_MS:g} ms | {fmt_ms(added)} ms | "
                         f"{'yes' if added < GOAL_ADDED_P50_MS else '**no**'} |")
        for up in upstreams:
            share = summary[f"{target_name('gateway', up)}/{mode}/c{big}"]["rps_ratio"]
            lines.append(f"| gateway throughput, c={big}, {label}, vs {UPSTREAM_GOAL_LABELS[up]} | "
                         f">= {GOAL_THROUGHPUT_SHARE:.0%} of direct | {share:.1%} | "
                         f"{'yes' if share >= GOAL_THROUGHPUT_SHARE else '**no**'} |")
    return lines


def upstream_note(cell: dict, conc: list[int], upstreams: list[str]) -> list[str]:
    """Why two upstreams, with how far apart the two flavours measured."""
    if len(upstreams) < 2:
        return []
    big = 64 if 64 in conc else conc[-1]
    raw, asgi = cell[("direct", False, big)], cell[("direct-asgi", False, big)]
    return ["", "Two upstreams, the same answers from two HTTP stacks (`loadtest_upstream.py --server`): "
            "the *same-stack* one is a raw ASGI app on uvicorn + uvloop + httptools, the stack the gateway "
            "runs on, the upstream that the goal's \"at least twice the HTTP work, so about 50% at best\" "
            "assumes; the *raw-socket* one (`asyncio.Protocol` + httptools, no ASGI layer) served "
            f"{raw['rps'] / asgi['rps']:.1f}x the same-stack one's requests at c={big}, non-streaming, "
            "so the gateway's share of it also measures the gap between the two stacks. "
            "Each upstream has its own gateway in front, configured alike."]


def render(report: dict) -> str:
    """The markdown that goes between the README markers."""
    m, rows, summary = report["machine"], report["rows"], report["summary"]
    cell = {(r["target"], r["stream"], r["concurrency"]): r for r in rows}
    conc = sorted({r["concurrency"] for r in rows})
    upstreams = upstreams_in(rows)
    kinds = [k for k in ("direct", "gateway", "litellm") if any(split_target(r["target"])[0] == k for r in rows)]
    lines = [f"Measured {report['date']} on {m['cpu']}, {m['cores']} cores ({m['os']}, Python {m['python']}, "
             f"{m['wrk']}; 1-min load average at start {m['loadavg_at_start'][0]:.2f}), every process on that "
             "machine, with this command:",
             "", f"    {report['command']}", "",
             f"Raw results: [`{report['json']}`]({report['json']}). Latency in ms.", ""]
    lines += goal_rows(summary, conc, upstreams)
    lines += upstream_note(cell, conc, upstreams)
    head = ["mode", "c", "upstream"] + [f"{k} req/s" for k in kinds] + [f"{k}/direct" for k in kinds[1:]]
    head += [f"{k} p50 / p99" for k in kinds] + [f"{k} CPU us/req" for k in kinds]
    lines += ["", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for stream in (False, True):
        for c in conc:
            for up in upstreams:
                rs = [cell.get((target_name(k, up), stream, c)) for k in kinds]
                row = ["streaming" if stream else "non-streaming", str(c), UPSTREAMS[up]]
                row += ["-" if r is None else f"{r['rps']:,.0f}" for r in rs]
                row += ["-" if r is None else f"{r['rps'] / rs[0]['rps']:.1%}" for r in rs[1:]]
                row += ["-" if r is None or not r["requests"] else f"{fmt_ms(r['p50_ms'])} / {fmt_ms(r['p99_ms'])}"
                        for r in rs]
                row += ["-" if r is None or r["server_cpu_us_per_req"] is None
                        else f"{r['server_cpu_us_per_req']:,.0f}" for r in rs]
                lines.append("| " + " | ".join(row) + " |")
    if 1 in conc:
        lines += ["", "Added latency at c=1 (target minus direct to the same upstream, ms):", "",
                  "| target | upstream | mode | p50 | p99 |", "| --- | --- | --- | --- | --- |"]
        for up in upstreams:
            for k in kinds[1:]:
                for mode in ("plain", "stream"):
                    s = summary.get(f"{target_name(k, up)}/{mode}/c1")
                    if s is not None:
                        lines.append(f"| {k} | {UPSTREAMS[up]} | {'streaming' if mode == 'stream' else 'non-streaming'}"
                                     f" | {fmt_ms(s['added_p50_ms'])} | {fmt_ms(s['added_p99_ms'])} |")
    if report.get("litellm_skipped"):
        lines += ["", f"LiteLLM proxy column skipped: {report['litellm_skipped']}"]
    errors = sum(r["errors"] for r in rows)
    busiest = max(rows, key=lambda r: r["wrk_cpu_share"])
    lines += ["", f"Errors (connect/read/write/timeout/HTTP >= 400) over all cells: {errors}. "
              f"Load generator (wrk, 1 thread): at most {busiest['wrk_cpu_share']:.0%} of one core "
              f"({busiest['target']}, c={busiest['concurrency']}); "
              f"{busiest['wrk_cpu_us_per_req'] or 0:.0f} us of CPU per request there."]
    return "\n".join(lines)


def write_readme(section: str, path: Path = README) -> None:
    """Replace the text between the markers; add heading and markers if missing."""
    rewrite_section(path, BEGIN, END, section, "## Gateway overhead")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-c", "--concurrency", type=int, nargs="+", default=[1, 64], help="connections (default 1 64)")
    p.add_argument("-d", "--duration", type=int, default=8, help="seconds measured per cell (default 8)")
    p.add_argument("--warmup", type=int, default=1, help="seconds of discarded load before each cell")
    p.add_argument("--no-litellm", action="store_true", help="skip the LiteLLM proxy column")
    p.add_argument("--litellm-venv", type=Path, default=LITELLM_VENV, help="venv for litellm[proxy] (made on demand)")
    p.add_argument("--no-readme", action="store_true", help="do not rewrite benchmarks/README.md")
    p.add_argument("--gateway-workers", type=int, default=1, help="gateway processes (switchyard serve --workers)")
    p.add_argument("--upstreams", nargs="+", choices=tuple(UPSTREAMS), default=list(UPSTREAMS),
                   help="load-test upstream flavours, each with its own gateway in front (default: raw asgi)")
    p.add_argument("--wrk", default=shutil.which("wrk"), help="wrk binary")
    args = p.parse_args(argv)
    if not args.wrk:
        p.error("wrk is not on PATH (Debian/Ubuntu: apt-get install wrk; macOS: brew install wrk)")
    if any(c < 1 for c in args.concurrency) or args.duration < 1 or args.warmup < 1:
        p.error("concurrency, duration and warmup must be positive (wrk takes whole seconds)")
    args.concurrency = sorted(set(args.concurrency))
    args.upstreams = list(dict.fromkeys(args.upstreams))
    return args


def start_targets(fleet: Fleet, flavours: list[str], workers: int) -> tuple[dict, dict[str, str]]:
    """Each upstream flavour and its own gateway: the targets (name -> base URL, pid,
    headers) and the upstreams' base URLs by flavour."""
    targets: dict = {}
    upstreams: dict[str, str] = {}
    for up in flavours:
        upstreams[up], pid = start_upstream(fleet, up)
        targets[target_name("direct", up)] = (upstreams[up], pid, {})
        name = target_name("gateway", up)
        base, pid = start_gateway(fleet, upstreams[up], workers, name=name)
        targets[name] = (base, pid, {})
    return targets, upstreams


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = dt.datetime.now(dt.timezone.utc)
    report: dict = {"date": started.strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(args.wrk),
                    "command": shlex.join(["python", "benchmarks/gateway_overhead.py", *(argv or sys.argv[1:])]),
                    "commit": git_commit(),
                    "settings": {"duration_s": args.duration, "warmup_s": args.warmup, "wrk_threads": 1,
                                 "gateway_workers": args.gateway_workers, "request": request_body(False),
                                 "upstreams": args.upstreams, "gateways": "one per upstream"}}
    with tempfile.TemporaryDirectory(prefix="switchyard-bench-") as tmp, Fleet(Path(tmp)) as fleet:
        targets, upstreams = start_targets(fleet, args.upstreams, args.gateway_workers)
        if args.no_litellm:
            report["litellm_skipped"] = "--no-litellm was given."
        elif "raw" not in upstreams:
            report["litellm_skipped"] = "it runs in front of the raw-socket upstream, not measured (--upstreams)."
        else:
            try:
                base, pid, key = start_litellm(fleet, upstreams["raw"], args.litellm_venv)
                targets["litellm"] = (base, pid, {"Authorization": f"Bearer {key}"})
            except (BenchError, subprocess.CalledProcessError, OSError) as exc:
                report["litellm_skipped"] = f"the proxy could not be started here: {str(exc)[:300]}"
                print(f"LiteLLM proxy skipped: {exc}", file=sys.stderr)
        for name, (base, _, headers) in targets.items():
            check_target(name, base, headers)
        report["rows"] = measure(args, targets, Path(tmp))
    report["summary"] = summarize(report["rows"])
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"gateway_overhead-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    report["json"] = str(out.relative_to(HERE))
    out.write_text(json.dumps(report, indent=2) + "\n")
    section = render(report)
    print("\n" + section)
    if not args.no_readme:
        write_readme(section)
        print(f"\nwrote {README.relative_to(HERE.parent)} and {out.relative_to(HERE.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
