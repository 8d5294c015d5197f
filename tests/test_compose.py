"""Structure of docker-compose.yml and the gateway Dockerfile, read with pyyaml.

No Docker engine is needed: these check the wiring a reviewer would check by eye (the
gateway reaches Redis by service name, every worker asks for an NVIDIA GPU and runs a
pinned official vLLM image, everything has a healthcheck, dependencies exist).
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
VLLM_IMAGE = "vllm/vllm-openai"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose: dict) -> dict:
    return compose["services"]


def _workers(services: dict) -> dict:
    return {n: s for n, s in services.items() if str(s.get("image", "")).startswith(VLLM_IMAGE)}


def _env(service: dict) -> dict:
    """Compose allows environment as a mapping or as a list of KEY=VALUE."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return env


def _default(value: str) -> str:
    """``${VAR:-default}`` -> ``default`` (what compose uses when VAR is unset)."""
    return re.sub(r"\$\{[A-Z0-9_]+:?-([^}]*)\}", r"\1", str(value))


def _depends(service: dict) -> list[str]:
    deps = service.get("depends_on") or []
    return list(deps) if isinstance(deps, (list, dict)) else []


def test_required_services_exist(services: dict) -> None:
    assert {"gateway", "redis", "register"} <= set(services)
    assert len(_workers(services)) >= 2, "need at least two vLLM GPU workers"


def test_gateway_uses_the_redis_service(services: dict) -> None:
    url = _env(services["gateway"])["SWITCHYARD_REDIS_URL"]
    match = re.fullmatch(r"redis://([A-Za-z0-9_.-]+):(\d+)/\d+", url)
    assert match, url
    assert match.group(1) in services and match.group(1) == "redis"
    assert "image" in services["redis"] and services["redis"]["image"].split(":")[0] == "redis"


def test_gateway_is_built_from_the_dockerfile(services: dict) -> None:
    build = services["gateway"]["build"]
    dockerfile = build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile"
    context = build.get("context", ".") if isinstance(build, dict) else build
    assert (ROOT / context / dockerfile).is_file()


def test_gateway_depends_on_redis_and_workers(services: dict) -> None:
    deps = set(_depends(services["gateway"]))
    assert "redis" in deps
    assert set(_workers(services)) <= deps


def test_redis_persists_with_appendonly(services: dict, compose: dict) -> None:
    redis = services["redis"]
    command = redis["command"]
    args = command if isinstance(command, list) else shlex.split(command)
    assert "--appendonly" in args and args[args.index("--appendonly") + 1] == "yes"
    mounts = [str(v).split(":") for v in redis["volumes"]]
    assert any(m[0] in (compose.get("volumes") or {}) and m[1] == "/data" for m in mounts)


def test_workers_use_pinned_official_vllm_image(services: dict) -> None:
    for name, worker in _workers(services).items():
        image = worker["image"]
        repo, _, tag = image.partition(":")
        assert repo == VLLM_IMAGE, name
        assert tag and tag != "latest" and "$" not in tag, f"{name}: unpinned image {image!r}"
        assert re.fullmatch(r"v\d+\.\d+\.\d+(\.post\d+)?", tag), f"{name}: tag {tag!r} is not a release"


def test_workers_reserve_an_nvidia_gpu(services: dict) -> None:
    seen_ids = []
    for name, worker in _workers(services).items():
        devices = worker["deploy"]["resources"]["reservations"]["devices"]
        gpu = [d for d in devices if d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])]
        assert gpu, f"{name} reserves no NVIDIA GPU"
        assert ("count" in gpu[0]) != ("device_ids" in gpu[0]), f"{name}: exactly one of count/device_ids"
        seen_ids += [_default(i) for i in gpu[0].get("device_ids", [])]
    assert len(seen_ids) == len(set(seen_ids)), f"workers share a default GPU: {seen_ids}"


def test_workers_serve_a_model_with_a_cache_volume(services: dict, compose: dict) -> None:
    for name, worker in _workers(services).items():
        args = [_default(a) for a in worker["command"]]
        model = args[0] if worker.get("entrypoint") == ["vllm", "serve"] else None
        if model is None:  # image entrypoint: model passed as --model
            model = next(a.split("=", 1)[1] for a in args if a.startswith("--model="))
        assert "/" in model and not model.startswith("-"), f"{name}: model {model!r}"
        assert any(a.startswith("--served-model-name") for a in args), name
        volumes = [str(v).split(":") for v in worker["volumes"]]
        assert any(v[0] in compose["volumes"] and "huggingface" in v[1] for v in volumes), name


def test_every_service_but_the_one_shot_has_a_healthcheck(services: dict) -> None:
    for name, service in services.items():
        if name == "register":
            continue
        test = (service.get("healthcheck") or {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name} has no healthcheck"


def test_worker_healthchecks_probe_the_port_vllm_serves(services: dict) -> None:
    for name, worker in _workers(services).items():
        args = [_default(a) for a in worker["command"]]
        port = next(a.split("=", 1)[1] for a in args if a.startswith("--port="))
        assert f":{port}/health" in " ".join(worker["healthcheck"]["test"]), name


def test_gateway_publishes_its_port(services: dict) -> None:
    ports = [_default(p) for p in services["gateway"]["ports"]]
    assert any(p.split(":")[-1] == "8000" for p in ports), ports


def test_named_volumes_are_declared(services: dict, compose: dict) -> None:
    declared = set(compose.get("volumes") or {})
    for name, service in services.items():
        for volume in service.get("volumes") or []:
            source = str(volume).split(":")[0]
            if not source.startswith((".", "/", "~")):
                assert source in declared, f"{name} mounts undeclared volume {source!r}"
    assert declared, "no named volumes"


def test_depends_on_names_defined_services(services: dict) -> None:
    for name, service in services.items():
        for dep in _depends(service):
            assert dep in services, f"{name} depends on undefined service {dep!r}"
            assert dep != name


def test_register_puts_valid_expert_specs_for_each_worker(services: dict) -> None:
    from expert_registry.spec import ExpertSpec

    register = services["register"]
    assert "gateway" in _depends(register)
    env = _env(register)
    assert env["GATEWAY_URL"].startswith("http://gateway:")
    assert "SWITCHYARD_ADMIN_KEY" in env
    specs = [ExpertSpec.model_validate(s) for s in json.loads(env["EXPERTS"])]
    workers = _workers(services)
    hosts = {re.match(r"http://([^:/]+)", s.base_url).group(1) for s in specs}
    assert hosts == set(workers), "each worker registered exactly once"
    for spec in specs:
        host = re.match(r"http://([^:/]+)", spec.base_url).group(1)
        args = [_default(a) for a in workers[host]["command"]]
        assert f"--served-model-name={spec.served_model}" in args, spec.name
    script = "\n".join(register["command"])
    assert "/v1/experts/" in script and "Bearer" in script


def test_dockerfile_runs_switchyard_serve_as_non_root() -> None:
    text = (ROOT / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.replace("\\\n", " ").splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0].startswith("FROM python:3.11-slim")
    cmd = [ln for ln in lines if ln.startswith("CMD ")]
    assert len(cmd) == 1
    argv = json.loads(cmd[0][4:])
    assert argv[:2] == ["switchyard", "serve"], argv
    assert argv[argv.index("--host") + 1] == "0.0.0.0" and argv[argv.index("--port") + 1] == "8000"
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), "image must run as a non-root user"
    health = [ln for ln in lines if ln.startswith("HEALTHCHECK ")]
    assert health and "/health" in health[0]
    installs = [ln for ln in lines if ln.startswith("RUN ") and "pip install" in ln]
    assert installs and not any("workers" in ln for ln in installs), "gateway image must not install workers"


def _seconds(duration: str) -> float:
    """A compose duration (``45s``, ``1m30s``, ``2m``) in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", str(duration))
    assert parts and "".join(n + u for n, u in parts) == str(duration), duration
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}[u] for n, u in parts)


def test_docker_waits_for_the_gateway_to_drain_before_killing_it(services: dict) -> None:
    gateway = services["gateway"]
    grace = float(_default(_env(gateway).get("SWITCHYARD_SHUTDOWN_GRACE_S", "30")))
    assert _seconds(gateway.get("stop_grace_period", "10s")) > grace + 5   # its lifespan shutdown after the grace
