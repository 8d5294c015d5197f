"""`switchyard fleet eval`: every fleet expert on held-out, automatically scored prompts.

Each (task, expert) pair is one chat completion through the gateway (the real OpenAI
SDK, ``model=<expert name>``, temperature 0) whose answer the domain's checker scores
(``expert_registry.fleet.domains.score``). Each scored answer becomes one benchmark log
row (DESIGN.md's row schema) appended to a JSONL file as soon as it is known::

    prompt_id  the task id              task           the domain ("humaneval" for HumanEval)
    prompt     the task's prompt        model          the expert's name
    score      the checker's [0, 1]     cost_usd       usage x the expert's registry prices
    input_tokens, output_tokens         from the response's usage
    latency_s  client-side wall time    response       the answer text

Failed calls (timeouts, 4xx/5xx, connection errors) are counted, never written, so a
rerun retries them: rows already in the file for a (prompt_id, model) pair are skipped,
and the prompt sets are fixed by the seed. The report lives in ``fleet_report``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from expert_registry.fleet.domains import DOMAINS, Task, score, tasks
from expert_registry.spec import ExpertSpec

log = logging.getLogger(__name__)

HUMANEVAL = "humaneval"  # the row's task label for HumanEval prompts (scored as code)
MAX_TOKENS = {"arithmetic": 96, "extraction": 96, "code": 256, HUMANEVAL: 256}
FLEET_TAG = "fleet"
_ERROR_SAMPLES = 5


class UnknownExperts(ValueError):
    """Names asked for that the registry does not hold."""


@dataclass(frozen=True)
class EvalItem:
    """One prompt to put to every expert; ``label`` is the row's ``task`` column."""

    label: str
    task: Task


@dataclass
class EvalOutcome:
    """What one run did: pairs asked, rows written, pairs skipped as already done, failures."""

    requested: int = 0
    written: int = 0
    skipped: int = 0
    failed: Counter = field(default_factory=Counter)  # expert -> failed calls (not written)
    score_errors: int = 0  # answers the checker could not score (not written)
    errors: list[str] = field(default_factory=list)  # the first few failure messages

    def to_dict(self) -> dict[str, Any]:
        return {"requested": self.requested, "written": self.written, "skipped": self.skipped,
                "failed": dict(self.failed), "failed_total": sum(self.failed.values()),
                "score_errors": self.score_errors, "errors": list(self.errors)}


# --- what to ask, whom, and where the rows go ---------------------------------------
def build_items(domains: Sequence[str] = DOMAINS, per_domain: int = 100, seed: int = 0,
                humaneval: int = 0) -> list[EvalItem]:
    """The held-out prompts: ``per_domain`` of each domain, then ``humaneval`` HumanEval ones."""
    items = [EvalItem(d, t) for d in domains for t in tasks(d, "heldout", per_domain, seed)]
    if humaneval > 0:
        from expert_registry.fleet.humaneval import humaneval_tasks  # optional extra set

        items += [EvalItem(HUMANEVAL, t) for t in humaneval_tasks(humaneval)]
    return items


def default_out(data_dir: Path) -> Path:
    return Path(data_dir) / "fleet" / "eval" / "heldout.jsonl"


def choose_experts(registered: Sequence[ExpertSpec], names: Sequence[str] | None) -> list[ExpertSpec]:
    """``names`` in that order; by default every expert tagged "fleet", else every vLLM one."""
    by_name = {s.name: s for s in registered}
    if names:
        missing = [n for n in names if n not in by_name]
        if missing:
            raise UnknownExperts(f"unknown expert(s): {', '.join(missing)}; registered: "
                                 f"{', '.join(sorted(by_name)) or 'none'}")
        return [by_name[n] for n in dict.fromkeys(names)]
    fleet = [s for s in registered if FLEET_TAG in s.tags]
    return fleet or [s for s in registered if s.backend == "vllm"]


def done_pairs(path: Path) -> set[tuple[str, str]]:
    """(prompt_id, model) pairs that already have a scored row in ``path``."""
    done: set[tuple[str, str]] = set()
    if not path.exists():
        return done
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash: that pair is redone
            if isinstance(row, dict) and isinstance(row.get("score"), (int, float)):
                done.add((str(row.get("prompt_id")), str(row.get("model"))))
    return done


class RowWriter:
    """Appends one JSON row per line and flushes each, so a crash loses at most one line."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        needs_newline = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
        self._f = path.open("a", encoding="utf-8")
        if needs_newline:
            self._f.write("\n")

    def write(self, row: dict) -> None:
        self._f.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


# --- asking -----------------------------------------------------------------------------
Scorer = Callable[[Task, str], float]


async def run_eval(base_url: str, api_key: str, experts: Sequence[ExpertSpec], items: Sequence[EvalItem],
                   out: Path, *, concurrency: int = 8, timeout_s: float = 120.0, progress: bool = True,
                   scorer: Scorer = score) -> EvalOutcome:
    """Ask every expert every item not yet in ``out``; append a row per scored answer."""
    import openai
    from tqdm import tqdm

    out = Path(out)
    done = done_pairs(out)
    pairs = [(it, spec) for it in items for spec in experts]
    todo = [(it, spec) for it, spec in pairs if (it.task.task_id, spec.name) not in done]
    outcome = EvalOutcome(requested=len(todo), skipped=len(pairs) - len(todo))
    if not todo:
        return outcome
    client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout_s)
    gate = asyncio.Semaphore(max(1, concurrency))
    writer = RowWriter(out)
    bar = tqdm(total=len(todo), desc="fleet eval", unit="call", file=sys.stderr, disable=not progress)
    # Checkers may run a sandboxed subprocess for seconds: keep them off the event loop.
    pool = ThreadPoolExecutor(max_workers=max(1, min(4, concurrency)), thread_name_prefix="fleet-score")

    def note(msg: str) -> None:
        if len(outcome.errors) < _ERROR_SAMPLES:
            outcome.errors.append(msg)

    async def one(item: EvalItem, spec: ExpertSpec) -> None:
        async with gate:
            t0 = time.perf_counter()
            try:
                resp = await client.chat.completions.create(
                    model=spec.name, messages=[{"role": "user", "content": item.task.prompt}],
                    temperature=0, max_tokens=MAX_TOKENS.get(item.label, 256))
            except openai.APIError as exc:
                outcome.failed[spec.name] += 1
                note(f"{spec.name} / {item.task.task_id}: {type(exc).__name__}: {exc}")
                return
            finally:
                bar.update(1)
            latency = time.perf_counter() - t0
        text = (resp.choices[0].message.content if resp.choices else None) or ""
        try:
            value = float(await asyncio.get_running_loop().run_in_executor(pool, scorer, item.task, text))
        except Exception as exc:  # a checker bug must not end a long run; it is reported
            outcome.score_errors += 1
            note(f"scoring {item.task.task_id}: {type(exc).__name__}: {exc}")
            return
        writer.write(_row(item, spec, text, value, resp.usage, latency))
        outcome.written += 1

    try:
        await asyncio.gather(*(one(it, spec) for it, spec in todo))
    finally:
        bar.close()
        writer.close()
        pool.shutdown(wait=False, cancel_futures=True)
        await client.close()
    return outcome


def _row(item: EvalItem, spec: ExpertSpec, text: str, value: float, usage: Any, latency: float) -> dict:
    n_in = getattr(usage, "prompt_tokens", None)
    n_out = getattr(usage, "completion_tokens", None)
    cost = spec.cost_usd(n_in, n_out) if n_in is not None and n_out is not None else None
    return {"prompt_id": item.task.task_id, "prompt": item.task.prompt, "task": item.label,
            "model": spec.name, "score": min(1.0, max(0.0, value)), "cost_usd": cost,
            "input_tokens": n_in, "output_tokens": n_out, "latency_s": round(latency, 6), "response": text}


# --- the local gateway and workers ----------------------------------------------------
@contextlib.contextmanager
def local_gateway(settings, store) -> Iterator[str]:
    """The gateway app (``serve``'s factory and settings) on a free loopback port in a
    thread; yields its ``/v1`` base URL."""
    import uvicorn

    from router_gateway.app import create_app
    from router_gateway.http_server import http_protocol

    class _ThreadServer(uvicorn.Server):
        def install_signal_handlers(self) -> None:  # Ctrl-C stays with the main thread
            pass

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = _ThreadServer(uvicorn.Config(create_app(settings, store), host="127.0.0.1", port=port,
                                          log_level="warning", access_log=False, lifespan="on",
                                          http=http_protocol()))
    thread = threading.Thread(target=server.run, name="fleet-gateway", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("the in-process gateway did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def answering(spec: ExpertSpec, timeout_s: float = 2.0) -> bool:
    """Whether the expert's upstream answers its health probe now."""
    import httpx

    from router_gateway.registry_view import health_url

    url = health_url(spec)
    if url is None:
        return False
    try:
        return httpx.get(url, timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def fleet_workers(launcher, experts: Sequence[ExpertSpec], start: bool = True,
                  timeout_s: float = 600, registered: Sequence[ExpertSpec] = ()) -> Iterator[list[str]]:
    """Start workers for the experts with a launch block whose upstream does not answer;
    yield the names this call started, and stop exactly those on exit (Ctrl-C too).

    An expert without a launch block that shares its ``base_url`` with a registered one
    that has it (a LoRA adapter served by its base model's worker) gets that worker."""
    hosted = {s.base_url for s in experts if s.launch is None and s.base_url}
    hosts = [r for r in registered if r.launch is not None and r.base_url in hosted]
    chosen = {s.name: s for s in [*experts, *hosts]}.values()
    want = [s.name for s in chosen if start and s.launch is not None and not answering(s)]
    already = {w.name for w in launcher.status() if w.alive} if want else set()
    started = [n for n in want if n not in already]
    try:
        if want:
            launcher.up(want, timeout_s=timeout_s)
        yield started
    finally:
        if started:
            launcher.down(started)
