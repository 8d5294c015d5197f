"""The fleet build on its --quick settings, end to end: real weights, real fine-tunes.

``fleet_specs`` (tests/conftest.py) builds the quick fleet once into the test cache;
these tests read what it wrote, and one rebuilds a single expert in a copy to show the
build is cached per expert, deterministic, and resumable.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open

from expert_registry.fleet.build import FLEET, QUICK, build_fleet, fleet_dir
from expert_registry.local_models import BASE_NAME, read_manifest


@pytest.fixture(scope="module")
def cache(fleet_specs, demo_models_dir) -> Path:
    return demo_models_dir.parent


def test_quick_manifest_records_recipe_losses_and_prices(fleet_specs, cache):
    root = fleet_dir(cache, quick=True)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["quick"] is True and set(manifest["experts"]) == {r.name for r in FLEET}
    assert {r.domain for r in FLEET} == {"arithmetic", "code", "extraction"}
    generalist = manifest["generalist"]
    for name, m in manifest["experts"].items():
        own = read_manifest(root / name)
        train = own["recipe"]["train"]
        assert train["steps"] == QUICK["steps"] == len(own["losses"]) and train["seed"] == 0
        assert own["recipe"]["data"]["split"] == "train" and own["recipe"]["data"]["domain"] == m["domain"]
        assert all(math.isfinite(x) and x > 0 for x in own["losses"])
        assert own["losses"][-1] < own["losses"][0], (name, own["losses"])
        assert m["param_count"] == generalist["param_count"] + m["adapter_params"] > generalist["param_count"]
    prices = manifest["prices"]["lora"]
    merged = manifest["prices"]["merged"]
    assert all(v == merged[BASE_NAME] for v in merged.values())  # merged: every call runs the same size
    rule = manifest["price_rule"]["input_usd_per_mtok_per_bparam"]
    assert prices[BASE_NAME]["input_per_mtok"] == pytest.approx(rule * generalist["param_count"] / 1e9, abs=1e-6)
    assert all(prices[n]["input_per_mtok"] >= prices[BASE_NAME]["input_per_mtok"] for n in manifest["experts"])


def test_experts_share_the_generalists_tokenizer_width_and_worker(fleet_specs, cache):
    base_dir = cache / "models" / BASE_NAME
    hidden = json.loads((base_dir / "config.json").read_text())["hidden_size"]
    by_name = {s.name: s for s in fleet_specs}
    base = by_name.pop(BASE_NAME)
    assert base.launch is not None and Path(base.launch.model_path) == base_dir
    assert base.launch.env["VLLM_ENABLE_RESPONSES_API_STORE"] == "1"   # continuations work on the demo
    args = base.launch.args
    assert "--enable-lora" in args and args[args.index("--max-loras") + 1] == str(len(by_name))
    modules = dict(a.split("=", 1) for a in args[args.index("--lora-modules") + 1:])
    assert set(modules) == set(by_name)
    for name, spec in by_name.items():
        assert spec.launch is None and spec.base_url == base.base_url and spec.served_model == name
        assert spec.tokenizer == base.tokenizer == "smollm2" and "fleet" in spec.tags
        adapter = Path(modules[name])
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert Path(config["base_model_name_or_path"]) == base_dir
        assert not list(adapter.glob("tokenizer*"))  # no tokenizer of its own: the generalist's
        with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
            a_key = next(k for k in f.keys() if k.endswith("q_proj.lora_A.weight"))
            assert f.get_slice(a_key).get_shape()[1] == hidden


def _link_copy(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, copy_function=os.link)


def test_a_missing_expert_is_rebuilt_alone_and_identically(fleet_specs, cache, tmp_path, monkeypatch):
    models = tmp_path / "data" / "models"
    _link_copy(cache / "models" / BASE_NAME, models / BASE_NAME)
    quick = fleet_dir(cache, quick=True)
    for r in FLEET:
        _link_copy(quick / r.name, models / quick.name / r.name)
    before = {r.name: read_manifest(models / quick.name / r.name) for r in FLEET}
    victim = FLEET[-1].name
    (models / quick.name / victim / "manifest.json").unlink()  # as if killed before it finished
    build_fleet(tmp_path / "data", quick=True, progress=False)
    after = {r.name: read_manifest(models / quick.name / r.name) for r in FLEET}
    for name in before:
        if name == victim:
            assert after[name]["built_at"] != before[name]["built_at"]  # a fine-tune takes > 1 s
            assert after[name]["losses"] == before[name]["losses"]  # seeded: the same fine-tune again
        else:
            assert after[name] == before[name]  # untouched
    assert not list((models / quick.name).glob(".*.tmp-*"))

    # The CLI on the same data dir: cached, registers the fleet.
    from typer.testing import CliRunner

    from expert_registry.store import ExpertStore, close_redis, open_redis
    from router_gateway.cli import app

    monkeypatch.setenv("SWITCHYARD_DATA_DIR", str(tmp_path / "data"))
    result = CliRunner().invoke(app, ["fleet", "build", "--quick", "--json"])
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.stdout)["experts"]) == {r.name for r in FLEET}
    store = ExpertStore(open_redis(None, tmp_path / "data"))
    try:
        registered = {s.name: s for s in store.list()}
        assert set(registered) == {BASE_NAME, *(r.name for r in FLEET)}
        assert all("fleet" in s.tags for s in registered.values())
    finally:
        close_redis(store.client)


def test_merged_serving_folds_each_adapter_into_its_own_worker(fleet_specs, cache):
    import torch
    from safetensors.torch import load_file

    from expert_registry.fleet.build import fleet_expert_specs

    specs = {s.name: s for s in fleet_expert_specs(cache, quick=True, progress=False, serving="merged")}
    assert set(specs) == {BASE_NAME, *(r.name for r in FLEET)}
    ports = {s.launch.port for s in specs.values()}
    assert len(ports) == len(specs) and all(s.base_url.endswith(f":{s.launch.port}/v1") for s in specs.values())
    base_dir = cache / "models" / BASE_NAME
    base = load_file(str(base_dir / "model.safetensors"))
    for r in FLEET:
        folder = Path(specs[r.name].launch.model_path)
        assert (folder / "config.json").exists() and (folder / "tokenizer.json").read_bytes() == (
            base_dir / "tokenizer.json").read_bytes()
        merged = load_file(str(folder / "model.safetensors"))
        adapter = load_file(str(fleet_dir(cache, quick=True) / r.name / "adapter_model.safetensors"))
        key = next(k for k in adapter if k.endswith("q_proj.lora_A.weight"))
        name = key[len("base_model.model."):-len(".lora_A.weight")] + ".weight"
        a, b = adapter[key].float(), adapter[key.replace("lora_A", "lora_B")].float()
        train = read_manifest(fleet_dir(cache, quick=True) / r.name)["recipe"]["train"]
        want = base[name].float() + train["alpha"] / train["rank"] * b @ a
        torch.testing.assert_close(merged[name].float(), want.to(torch.bfloat16).float(), atol=1e-2, rtol=1e-2)
        assert not torch.equal(merged[name], base[name])  # the adapter changed it
        untouched = "model.layers.0.self_attn.q_proj.weight"  # below the adapted layers
        assert torch.equal(merged[untouched], base[untouched])
