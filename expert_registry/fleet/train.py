"""LoRA fine-tuning of a small causal LM's upper layers on CPU, for the fleet's experts.

Why this shape, on 2 CPU cores: the lower ``n_layers - lora_layers`` decoder layers
stay frozen and run without autograd, so backward only touches the top layers; the
loss is computed on the answer tokens only, so the 49k-wide output projection runs on
a few dozen positions per sequence instead of all of them; sequences are short
(chat-formatted prompt + answer, ~60-120 tokens) and batched by length.

The adapter is a standard LoRA on ``q,k,v,o,gate,up,down`` of the chosen layers:
``W x + (alpha / r) * B A x`` with ``A: [r, in]`` (Kaiming-uniform init) and
``B: [out, r]`` (zeros), saved in PEFT's layout (``adapter_config.json`` +
``adapter_model.safetensors``) so vLLM serves it with ``--enable-lora``; ``merge_lora``
folds it into full weights for engines without LoRA.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IGNORE = -100


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one expert's fine-tune (written into its manifest)."""

    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 20
    rank: int = 16
    alpha: float = 32.0
    lora_layers: int = 10  # the top N decoder layers get adapters
    max_len: int = 160
    seed: int = 0
    threads: int = 0  # 0: torch's default
    target_modules: tuple[str, ...] = field(default=TARGET_MODULES)


@dataclass
class TrainResult:
    losses: list[float]
    seconds: float
    examples: int
    tokens: int
    adapter_params: int


def _lora_modules(model, config: TrainConfig) -> dict[str, object]:
    layers = model.model.layers
    first = len(layers) - config.lora_layers
    if not 0 < config.lora_layers <= len(layers):
        raise ValueError(f"lora_layers must be in 1..{len(layers)}, got {config.lora_layers}")
    out = {}
    for i in range(first, len(layers)):
        for name, module in layers[i].named_modules():
            if name.rsplit(".", 1)[-1] in config.target_modules:
                out[f"model.layers.{i}.{name}"] = module
    return out


class _LoRA:
    """Adds ``scale * B(A(x))`` to a frozen ``nn.Linear`` through a forward hook."""

    def __init__(self, linear, rank: int, alpha: float, gen):
        import torch

        self.scale = alpha / rank
        self.A = torch.empty(rank, linear.in_features)
        torch.nn.init.kaiming_uniform_(self.A, a=math.sqrt(5), generator=gen)
        self.B = torch.zeros(linear.out_features, rank)
        self.A.requires_grad_(True)
        self.B.requires_grad_(True)
        self.handle = linear.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        return output + (inputs[0] @ self.A.t() @ self.B.t()) * self.scale


def encode_examples(tokenizer, pairs: Sequence[tuple[str, str]], max_len: int) -> list[tuple[list[int], int]]:
    """Chat-format each (prompt, answer): token ids and where the answer starts.

    The prompt side is exactly what vLLM's chat endpoint renders (the tokenizer's chat
    template, generation prompt added); the answer ends with the template's end token.
    """
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    out = []
    for prompt, answer in pairs:
        p = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False)
        if hasattr(p, "input_ids"):
            p = p["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [end]
        ids = (list(p) + a)[:max_len]
        if len(p) < len(ids):
            out.append((ids, len(p)))
    return out


def _batches(examples, batch_size: int, rng: random.Random):
    """Length-bucketed batches in random order (less padding, still shuffled)."""
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i][0]), rng.random()))
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    while True:
        rng.shuffle(chunks)
        yield from chunks


def _collate(examples, idx, pad_id: int):
    import torch

    width = max(len(examples[i][0]) for i in idx)
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    labels = torch.full((len(idx), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(idx), width), dtype=torch.long)
    for row, i in enumerate(idx):
        seq, start = examples[i]
        ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
        labels[row, start:len(seq)] = torch.tensor(seq[start:])
    return ids, mask, labels


def answer_loss(model, ids, mask, labels):
    """Mean next-token cross-entropy over answer positions only."""
    import torch.nn.functional as F

    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    target = labels[:, 1:]
    keep = target != IGNORE
    logits = model.lm_head(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), target[keep])


def train_lora(model, tokenizer, pairs: Sequence[tuple[str, str]], config: TrainConfig,
               on_step: Callable[[int, float], None] | None = None) -> tuple[dict, TrainResult]:
    """Fine-tune LoRA adapters on ``pairs``; returns (adapter tensors in PEFT naming, result).

    ``model`` is a transformers Llama-family causal LM in fp32; its own weights are not
    changed (the hooks are removed before returning).
    """
    import torch

    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    rng = random.Random(config.seed)
    model.requires_grad_(False)
    model.train(False)  # no dropout in these models; keeps the forward deterministic
    loras = {name: _LoRA(mod, config.rank, config.alpha, gen) for name, mod in _lora_modules(model, config).items()}
    params = [t for lo in loras.values() for t in (lo.A, lo.B)]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(config.warmup_steps, config.steps))
    examples = encode_examples(tokenizer, pairs, config.max_len)
    if not examples:
        raise ValueError("no training examples left after tokenization")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = _batches(examples, config.batch_size, rng)
    losses, tokens, started = [], 0, time.time()
    try:
        for step in range(config.steps):
            ids, mask, labels = _collate(examples, next(batches), pad)
            loss = answer_loss(model, ids, mask, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(round(loss.item(), 5))
            tokens += int(mask.sum())
            if on_step:
                on_step(step, losses[-1])
    finally:
        for lo in loras.values():
            lo.handle.remove()
    tensors = {}
    for name, lo in loras.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = lo.A.detach().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = lo.B.detach().contiguous()
    result = TrainResult(losses, round(time.time() - started, 1), len(examples), tokens,
                         sum(t.numel() for t in tensors.values()))
    return tensors, result


def _warmup_cosine(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def save_adapter(out_dir: Path, tensors: dict, config: TrainConfig, base_model: str) -> None:
    """Write ``tensors`` as a PEFT LoRA adapter folder (bf16 weights)."""
    import torch
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layers = sorted({int(k.split(".layers.")[1].split(".")[0]) for k in tensors})
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": list(config.target_modules),
        "layers_to_transform": layers,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "inference_mode": True,
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, str(out_dir / "adapter_model.safetensors"))
    (out_dir / "adapter_model.safetensors").chmod(0o644)


def merge_lora(model, tensors: dict, config: TrainConfig) -> None:
    """Fold the adapter into ``model``'s weights in place: ``W += (alpha/r) * B @ A``."""
    import torch

    scale = config.alpha / config.rank
    named = dict(model.named_modules())
    with torch.no_grad():
        for key, a in tensors.items():
            if not key.endswith("lora_A.weight"):
                continue
            name = key[len("base_model.model."):-len(".lora_A.weight")]
            b = tensors[key.replace("lora_A", "lora_B")]
            w = named[name].weight
            w += (scale * (b.float() @ a.float())).to(w.dtype)


def config_dict(config: TrainConfig) -> dict:
    d = asdict(config)
    d["target_modules"] = list(config.target_modules)
    return d
