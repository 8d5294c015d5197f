"""The `switchyard` CLI as a user runs it: separate processes sharing the embedded Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def sy(data_dir: Path, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "SWITCHYARD_DATA_DIR": str(data_dir), "NO_COLOR": "1", "COLUMNS": "200"}
    env.pop("SWITCHYARD_REDIS_URL", None)
    proc = subprocess.run([sys.executable, "-m", "router_gateway.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"switchyard {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_add_list_remove_persist_across_processes(tmp_path: Path):
    d = tmp_path / "data"
    sy(d, "experts", "add", "smol", "--backend", "vllm", "--base-url", "http://127.0.0.1:8101/v1",
       "--served-model", "smol-135m", "--input-price", "0.05", "--output-price", "0.1", "--context-window", "2048",
       "--tokenizer", "smollm2", "--tag", "demo", "--tag", "small", "--launch-model-path", "/models/smol",
       "--launch-port", "8101", "--launch-arg=--max-model-len", "--launch-arg=2048",
       "--replica", "http://127.0.0.1:8102/v1/", "--replica", "http://10.0.0.7:8101/v1",
       "--fallback", "remote", "--fallback", "other")
    spec_file = tmp_path / "remote.yaml"
    spec_file.write_text("name: remote\nbackend: litellm\nserved_model: openai/gpt-4o-mini\n"
                         "input_price_per_mtok: 0.15\noutput_price_per_mtok: 0.6\n")
    sy(d, "experts", "add", "--file", str(spec_file))
    listed = json.loads(sy(d, "experts", "list", "--json").stdout)
    by_name = {e["name"]: e for e in listed}
    assert set(by_name) == {"smol", "remote"}
    assert by_name["smol"]["launch"] == {"engine": "vllm", "model_path": "/models/smol", "port": 8101,
                                         "args": ["--max-model-len", "2048"], "env": {}}
    assert by_name["smol"]["tags"] == ["demo", "small"]
    assert by_name["smol"]["replicas"] == ["http://127.0.0.1:8102/v1", "http://10.0.0.7:8101/v1"]
    assert by_name["smol"]["fallbacks"] == ["remote", "other"]
    assert by_name["remote"]["output_price_per_mtok"] == 0.6
    assert "smol-135m" in sy(d, "experts", "list").stdout
    assert "in_flight" not in by_name["smol"]   # no cap, nothing to count

    # a capped expert shows the places held across the gateway (here one, taken by hand)
    sy(d, "experts", "add", "capped", "--backend", "openai", "--base-url", "http://127.0.0.1:9/v1",
       "--max-concurrency", "4", "--no-check")
    from expert_registry.store import close_redis, open_redis

    client = open_redis(None, d)
    seconds, _ = client.time()
    client.zadd("switchyard:inflight:capped", {"a-gateway:1": (seconds + 60) * 1000, "a-gateway:2": 1})  # one lapsed
    by_name = {e["name"]: e for e in json.loads(sy(d, "experts", "list", "--json").stdout)}
    assert by_name["capped"]["in_flight"] == 1 and by_name["capped"]["max_concurrency"] == 4
    row = next(line for line in sy(d, "experts", "list").stdout.splitlines() if "capped" in line)
    assert "1/4" in row
    close_redis(client)
    sy(d, "experts", "remove", "capped")

    dup = sy(d, "experts", "add", "smol", "--backend", "openai", "--base-url", "http://x:1/v1", check=False)
    assert dup.returncode == 1 and "already exists" in dup.stderr
    sy(d, "experts", "remove", "remote")
    assert [e["name"] for e in json.loads(sy(d, "experts", "list", "--json").stdout)] == ["smol"]
    missing = sy(d, "experts", "remove", "remote", check=False)
    assert missing.returncode == 1 and "does not exist" in missing.stderr


@pytest.mark.parametrize("args, needle", [
    (["experts", "add", "x", "--backend", "nope", "--base-url", "http://a:1/v1"], "backend"),
    (["experts", "add", "x", "--backend", "vllm"], "needs base_url"),
    (["experts", "add", "auto", "--backend", "openai", "--base-url", "http://a:1/v1"], "name"),
    (["experts", "add", "--file", "/no/such/file.yaml"], "cannot read"),
    (["experts", "add", "x", "--backend", "openai", "--base-url", "http://a:1/v1", "--replica", "http://a:1/v1/"],
     "must not repeat base_url"),
    (["experts", "add", "x", "--backend", "litellm", "--replica", "http://a:1/v1"], "replicas are for backends"),
    (["experts", "add", "x", "--backend", "litellm", "--fallback", "x"], "its own fallback"),
])
def test_bad_input_is_a_clear_error_not_a_traceback(tmp_path: Path, args, needle):
    proc = sy(tmp_path / "data", *args, check=False)
    assert proc.returncode == 1
    assert needle in proc.stderr and "Traceback" not in proc.stderr


def test_add_asks_the_server_what_it_serves(tmp_path: Path, scripted_upstream: str):
    """The scripted upstream lists one model, ``echo``, with vLLM's ``max_model_len`` 2048."""
    d = tmp_path / "data"
    added = sy(d, "experts", "add", "mine", "--backend", "vllm", "--base-url", scripted_upstream)
    assert "served model: echo" in added.stdout and "context window: 2048" in added.stdout
    sy(d, "experts", "add", "given", "--backend", "vllm", "--base-url", scripted_upstream, "--served-model", "echo",
       "--context-window", "512")
    wrong = sy(d, "experts", "add", "typo", "--backend", "vllm", "--base-url", scripted_upstream,
               "--served-model", "ecco", check=False)
    assert wrong.returncode == 1 and "does not serve 'ecco'; it serves echo" in wrong.stderr
    sy(d, "experts", "add", "typo", "--backend", "vllm", "--base-url", scripted_upstream, "--served-model", "ecco",
       "--no-check")
    later = sy(d, "experts", "add", "later", "--backend", "vllm", "--base-url", "http://127.0.0.1:9/v1")
    assert "could not check http://127.0.0.1:9/v1" in later.stderr and "registering as given" in later.stderr
    by_name = {e["name"]: e for e in json.loads(sy(d, "experts", "list", "--json").stdout)}
    assert (by_name["mine"]["served_model"], by_name["mine"]["context_window"]) == ("echo", 2048)
    assert (by_name["given"]["served_model"], by_name["given"]["context_window"]) == ("echo", 512)
    assert by_name["typo"]["served_model"] == "ecco" and by_name["later"]["served_model"] == "later"


def test_a_served_model_is_picked_only_when_the_choice_is_clear():
    from expert_registry.discover import NotServed, checked_spec
    from expert_registry.spec import ExpertSpec

    spec = ExpertSpec(name="math", backend="vllm", base_url="http://h:1/v1", served_model="math")
    lora = [{"id": "/models/base", "max_model_len": 8192}, {"id": "math", "max_model_len": 8192}, {"id": "poet"}]
    got, notes = checked_spec(spec, lora, served_given=False, window_given=False)
    assert (got.served_model, got.context_window) == ("math", 8192) and len(notes) == 2
    with pytest.raises(NotServed, match="serves /models/base, math, poet; say which"):
        checked_spec(spec.model_copy(update={"name": "other"}), lora, served_given=False, window_given=False)
    got, notes = checked_spec(spec, [{"id": "math", "max_model_len": "big"}], served_given=True, window_given=False)
    assert got.context_window == 4096 and notes == []     # an unreadable window is left alone
    with pytest.raises(NotServed, match="serves nothing"):
        checked_spec(spec, [], served_given=True, window_given=False)


def test_health_reports_unreachable_expert(tmp_path: Path):
    d = tmp_path / "data"
    sy(d, "experts", "add", "gone", "--backend", "openai", "--base-url", "http://127.0.0.1:9/v1")
    proc = sy(d, "experts", "health", "--json", check=False)
    assert proc.returncode == 2
    assert json.loads(proc.stdout)["gone"]["healthy"] is False
    assert json.loads(sy(d, "experts", "list", "--json").stdout)[0]["healthy"] is False


def test_serve_with_two_processes_shares_one_embedded_redis(tmp_path: Path, scripted_upstream: str):
    import time
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from tests.router_gateway.conftest import free_port

    d, port = tmp_path / "data", free_port()
    sy(d, "experts", "add", "gone", "--backend", "openai", "--base-url", "http://127.0.0.1:9/v1")
    # answers after 5 s; at most 2 at a time across both processes
    sy(d, "experts", "add", "slow", "--backend", "openai", "--base-url", scripted_upstream, "--served-model", "slow",
       "--max-concurrency", "2", "--no-check")
    env = {**os.environ, "SWITCHYARD_DATA_DIR": str(d), "SWITCHYARD_HEALTH_INTERVAL_S": "0"}
    env.pop("SWITCHYARD_REDIS_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "router_gateway.cli", "serve", "--port", str(port),
                             "--workers", "2"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").json()["experts"] == 2:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
            time.sleep(0.3)
        for _ in range(6):  # both processes answer from the same registry
            models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"]
            assert sorted(m["id"] for m in models) == ["gone", "slow"]

        def ask(_: int) -> int:
            return httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=30,
                              json={"model": "slow", "messages": [{"role": "user", "content": "hi"}]}).status_code

        # The cap holds under `serve --workers 2`. Which process accepts each connection is
        # the kernel's choice (often one takes them all); that two gateways share one cap
        # is shown in test_slots.
        with ThreadPoolExecutor(12) as pool:
            codes = sorted(pool.map(ask, range(12)))
        assert codes == [200] * 2 + [503] * 10
        servers = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _is_redis_for(p, d)]
        assert len(servers) == 1
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _is_redis_for(proc_dir: Path, data_dir: Path) -> bool:
    try:
        return "redis-server" in (proc_dir / "cmdline").read_text() and (proc_dir / "cwd").resolve() == data_dir
    except OSError:
        return False


def test_piped_output_is_wide_and_a_terminal_or_columns_decide_otherwise(tmp_path: Path, monkeypatch):
    import io

    from router_gateway.cli_common import PIPED_WIDTH, _width

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("COLUMNS", raising=False)
    assert _width(io.StringIO()) == PIPED_WIDTH and _width(Tty()) is None
    monkeypatch.setenv("COLUMNS", "100")
    assert _width(io.StringIO()) is None
    # As a user piping a table to a file or a pager: its rows are not cut to 80 columns.
    d = tmp_path / "data"
    sy(d, "experts", "add", "a-rather-long-expert-name-for-a-wide-table", "--backend", "openai",
       "--base-url", "http://127.0.0.1:9/v1", "--served-model", "some-served-model-name", "--no-check")
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"} | {"SWITCHYARD_DATA_DIR": str(d), "NO_COLOR": "1"}
    env.pop("SWITCHYARD_REDIS_URL", None)
    out = subprocess.run([sys.executable, "-m", "router_gateway.cli", "experts", "list"], env=env,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert "a-rather-long-expert-name-for-a-wide-table" in out and max(map(len, out.splitlines())) > 80
