"""WorkerLauncher against real processes: real vLLM CPU workers for start, serve, crash and
stop; plain Python process groups for the signal handling (cheap, and the same code path)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis

from expert_registry.launcher import WorkerLauncher, WorkerStartError
from expert_registry.local_models import CONCISE_GENERATION_DEFAULTS, CONCISE_NAME
from expert_registry.spec import ExpertSpec, LaunchSpec
from expert_registry.store import ExpertStore, open_redis

# Everyday questions that are neither the concise model's demonstrations nor the ones
# its recipe was tuned on.
HELD_OUT = [
    "What is the largest planet in our solar system?",
    "How do plants get water?",
    "What does a thermometer measure?",
    "Why do we need sleep?",
    "What is the internet?",
]


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``, read from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        fields = raw[raw.rfind(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def chat(base_url: str, model: str, question: str, **kw) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": question}], **kw}
    response = httpx.post(f"{base_url}/chat/completions", json=body, timeout=300, trust_env=False)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def redis_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis.Redis]:
    client = open_redis(None, tmp_path_factory.mktemp("launcher-redis"))
    yield client
    client.shutdown(nosave=True)  # one embedded server for the module: each shutdown costs seconds


@pytest.fixture
def store(redis_client: redis.Redis) -> ExpertStore:
    return ExpertStore(redis_client, prefix=f"test-{uuid.uuid4().hex[:8]}:")


def local_spec(name: str, model_path: str, port: int | None = None) -> ExpertSpec:
    return ExpertSpec(
        name=name, backend="vllm", served_model=name, launch=LaunchSpec(model_path=model_path, port=port)
    )


# --- the session worker (started once by tests/conftest.py) ---------------------------------
@pytest.mark.vllm
def test_worker_answers_a_chat_completion(vllm_worker):
    reply = chat(vllm_worker.base_url, vllm_worker.served_model, "What is the capital of France?",
                 max_tokens=32, temperature=0)
    assert "Paris" in reply["choices"][0]["message"]["content"]
    assert reply["usage"]["completion_tokens"] > 0


@pytest.mark.vllm
def test_status_shows_alive_healthy_worker_and_its_records(vllm_worker):
    name = vllm_worker.spec.name
    (info,) = [w for w in vllm_worker.launcher.status() if w.name == name]
    assert info.alive and info.healthy
    assert info.base_url == vllm_worker.base_url == vllm_worker.store.get(name).base_url
    assert vllm_worker.store.health()[name].healthy
    assert os.getsid(info.pid) == info.pid  # its own session: survives the CLI that started it
    assert "Application startup complete" in info.log_path.read_text()
    pidfile = json.loads((vllm_worker.launcher.workers_dir / f"{name}.json").read_text())
    assert pidfile["pid"] == info.pid and pidfile["port"] == info.port and pidfile["name"] == name
    assert "--enforce-eager" in pidfile["cmd"] and pidfile["started_at"] <= time.time()


@pytest.mark.vllm
def test_up_leaves_a_running_healthy_worker_alone(vllm_worker):
    name = vllm_worker.spec.name
    before = {w.name: w.pid for w in vllm_worker.launcher.status()}
    started = time.monotonic()
    (info,) = vllm_worker.launcher.up([name], progress=False)
    assert time.monotonic() - started < 15
    assert info.pid == before[name] and info.healthy


# --- one more real worker: the derived model, then a crash and a stop ----------------------
@pytest.mark.vllm
def test_concise_worker_serves_crashes_and_stops(vllm_worker, demo_specs, store, tmp_path):
    specs = {s.name: s for s in demo_specs}
    for spec in specs.values():  # both registered, so CPU bindings are disjoint; free ports
        store.put(spec.model_copy(update={"launch": spec.launch.model_copy(update={"port": None})}))
    launcher = WorkerLauncher(store, tmp_path, stop_grace_s=10)
    try:
        (info,) = launcher.up([CONCISE_NAME], timeout_s=600, progress=False)
        assert store.get(CONCISE_NAME).base_url == info.base_url
        env = (Path("/proc") / str(info.pid) / "environ").read_bytes().split(b"\0")
        (bind,) = [e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"VLLM_CPU_OMP_THREADS_BIND=")]
        assert bind == launcher.environment(store.get(CONCISE_NAME))["VLLM_CPU_OMP_THREADS_BIND"]

        # Real, sensible answers, and shorter than the base model's (greedy, same cap).
        # All at once: each worker batches them, and the two run on different cores.
        asks = [(info.base_url, CONCISE_NAME, q) for q in HELD_OUT]
        asks += [(vllm_worker.base_url, vllm_worker.served_model, q) for q in HELD_OUT]
        with ThreadPoolExecutor(len(asks)) as pool:
            replies = list(pool.map(lambda a: chat(*a, temperature=0, max_tokens=96), asks))
        short, full = replies[: len(HELD_OUT)], replies[len(HELD_OUT) :]
        assert all(r["choices"][0]["message"]["content"].strip() for r in short)
        concise_len = sum(r["usage"]["completion_tokens"] for r in short)
        base_len = sum(r["usage"]["completion_tokens"] for r in full)
        assert concise_len < 0.75 * base_len, (concise_len, base_len)
        # Its generation defaults apply when a request leaves them out (here: the length cap).
        cap = CONCISE_GENERATION_DEFAULTS["max_new_tokens"]
        long_ask = "List forty animals that live in the ocean, one per line."
        uncapped = chat(info.base_url, CONCISE_NAME, long_ask, temperature=0, max_tokens=cap + 8)
        assert uncapped["usage"]["completion_tokens"] > cap  # the question really wants more
        capped = chat(info.base_url, CONCISE_NAME, long_ask, temperature=0)
        assert capped["usage"]["completion_tokens"] == cap
        assert capped["choices"][0]["finish_reason"] == "length"

        os.kill(info.pid, signal.SIGKILL)  # the API server dies under it
        deadline = time.monotonic() + 15
        while (status := {w.name: w for w in launcher.status()}[CONCISE_NAME]).alive:
            assert time.monotonic() < deadline, "status still reports a SIGKILLed worker alive"
            time.sleep(0.2)
        assert not status.healthy
        health = store.health()[CONCISE_NAME]
        assert not health.healthy and health.error == "worker process exited"
    finally:
        stopped = launcher.down()
    assert stopped == [CONCISE_NAME]
    assert not (launcher.workers_dir / f"{CONCISE_NAME}.json").exists()
    assert group_members(info.pid) == []  # engine core and model worker are gone too
    assert not store.health()[CONCISE_NAME].healthy


@pytest.mark.vllm
def test_a_folder_that_is_no_model_fails_with_the_log_tail(store, tmp_path):
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "config.json").write_text('{"model_type": "no-such-architecture"}')
    store.put(local_spec("broken", str(not_a_model)))
    launcher = WorkerLauncher(store, tmp_path / "data")
    with pytest.raises(WorkerStartError, match="worker 'broken' exited while starting") as err:
        launcher.up(["broken"], timeout_s=300, progress=False)
    assert "no-such-architecture" in err.value.log_tail
    assert not (launcher.workers_dir / "broken.json").exists()  # up() cleaned up after itself
    health = store.health()["broken"]
    assert not health.healthy and "exited while starting" in health.error


def test_a_missing_model_path_fails_before_spawning(store, tmp_path):
    store.put(local_spec("missing", str(tmp_path / "nowhere")))
    launcher = WorkerLauncher(store, tmp_path / "data")
    with pytest.raises(WorkerStartError, match="does not exist"):
        launcher.up(["missing"], progress=False)
    assert not launcher.log_path("missing").exists()


def test_up_refuses_experts_without_a_launch_block(store, tmp_path):
    store.put(ExpertSpec(name="remote", backend="openai", base_url="http://127.0.0.1:9/v1", served_model="m"))
    with pytest.raises(ValueError, match="remote"):
        WorkerLauncher(store, tmp_path).up(["remote"], progress=False)


# --- command line and environment ----------------------------------------------------------
def test_cpu_workers_get_eager_mode_fp32_a_kv_budget_and_disjoint_cores(store, tmp_path, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    store.put(local_spec("a", str(tmp_path)))
    store.put(local_spec("b", str(tmp_path)).model_copy(
        update={"launch": LaunchSpec(model_path=str(tmp_path), args=["--kv-cache-memory-bytes", "1G"])}))
    launcher = WorkerLauncher(store, tmp_path)
    assert launcher.is_vllm_cpu()  # this project's test environment runs vllm-cpu
    cmd_a = launcher.command(store.get("a"), 8123)
    assert cmd_a[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    assert cmd_a[cmd_a.index("--port") + 1] == "8123" and "--enforce-eager" in cmd_a
    assert cmd_a[cmd_a.index("--kv-cache-memory-bytes") + 1] == "512M"
    assert cmd_a[cmd_a.index("--dtype") + 1] == "float32"
    cmd_b = launcher.command(store.get("b"), 8124)
    assert cmd_b.count("--kv-cache-memory-bytes") == 1 and cmd_b[-1] == "1G"  # the spec's own wins
    store.put(local_spec("c", str(tmp_path)).model_copy(
        update={"launch": LaunchSpec(model_path=str(tmp_path), args=["--dtype=bfloat16"])}))
    assert not any(a == "--dtype" for a in launcher.command(store.get("c"), 8125))
    env_a, env_b = launcher.environment(store.get("a")), launcher.environment(store.get("b"))
    assert env_a["HF_HUB_OFFLINE"] == "1"
    cores_a = set(env_a["VLLM_CPU_OMP_THREADS_BIND"].split(","))
    cores_b = set(env_b["VLLM_CPU_OMP_THREADS_BIND"].split(","))
    if len(os.sched_getaffinity(0)) >= 2:
        assert not cores_a & cores_b


# --- stopping and observing process groups (plain Python processes) --------------------------
def fake_worker(launcher: WorkerLauncher, name: str, code: str) -> subprocess.Popen:
    """A process group recorded in a pidfile exactly as up() records a worker."""
    cmd = [sys.executable, "-c", code]
    proc = subprocess.Popen(cmd, start_new_session=True)
    launcher.workers_dir.mkdir(parents=True, exist_ok=True)
    rec = {"pid": proc.pid, "port": 9, "name": name, "served_model": name, "cmd": cmd, "started_at": time.time()}
    (launcher.workers_dir / f"{name}.json").write_text(json.dumps(rec))
    return proc


CHILD_AND_SLEEP = (
    "import subprocess, sys, time; "
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); time.sleep(600)"
)
IGNORE_TERM = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('ready', flush=True); time.sleep(600)"
)


def test_down_terminates_the_whole_group_and_marks_it_unhealthy(store, tmp_path):
    store.put(local_spec("w", str(tmp_path)))
    launcher = WorkerLauncher(store, tmp_path)
    proc = fake_worker(launcher, "w", CHILD_AND_SLEEP)
    deadline = time.monotonic() + 30
    while len(group_members(proc.pid)) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert launcher.down(["w"]) == ["w"]
    assert proc.wait(timeout=5) == -signal.SIGTERM
    assert group_members(proc.pid) == []
    assert not (launcher.workers_dir / "w.json").exists()
    assert store.health()["w"].error == "worker stopped"


def test_down_kills_a_group_that_ignores_sigterm(store, tmp_path):
    launcher = WorkerLauncher(store, tmp_path, stop_grace_s=1.0)
    cmd = [sys.executable, "-c", IGNORE_TERM]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"ready"
    launcher.workers_dir.mkdir(parents=True)
    rec = {"pid": proc.pid, "port": 9, "name": "stubborn", "served_model": "x", "cmd": cmd, "started_at": 0}
    (launcher.workers_dir / "stubborn.json").write_text(json.dumps(rec))
    assert launcher.down() == ["stubborn"]
    assert proc.wait(timeout=5) == -signal.SIGKILL


def test_down_never_signals_a_reused_pid(store, tmp_path):
    launcher = WorkerLauncher(store, tmp_path, stop_grace_s=0.5)
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    try:
        launcher.workers_dir.mkdir(parents=True)
        rec = {"pid": stranger.pid, "port": 9, "name": "old", "served_model": "x",
               "cmd": [sys.executable, "-m", "vllm.entrypoints.openai.api_server"], "started_at": 0}
        (launcher.workers_dir / "old.json").write_text(json.dumps(rec))
        launcher.down()
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_status_reports_an_exited_worker_dead_and_unhealthy(store, tmp_path):
    store.put(local_spec("gone", str(tmp_path)))
    launcher = WorkerLauncher(store, tmp_path)
    proc = fake_worker(launcher, "gone", "pass")
    proc.wait(timeout=30)
    (info,) = launcher.status()
    assert (info.name, info.alive, info.healthy) == ("gone", False, False)
    assert store.health()["gone"].error == "worker process exited"
    launcher.down()
