"""LoRA fine-tuning on a tiny random Llama: the adapter is what it claims to be.

The tiny model has the real SmolLM2 tokenizer (from the demo build) so the chat
formatting is the one vLLM renders; its weights are random and small, so each test
takes well under a second of compute.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from expert_registry.fleet.train import (
    IGNORE,
    TrainConfig,
    _collate,
    encode_examples,
    merge_lora,
    save_adapter,
    train_lora,
)

PAIRS = [(f"What is {a} + {b}?", f"{a} + {b} = {a + b}. The answer is {a + b}.") for a in range(3, 9) for b in (4, 7)]


@pytest.fixture(scope="module")
def tokenizer(demo_models_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(demo_models_dir / "smollm2-135m"))


def tiny_model(tokenizer, layers: int = 3):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, initializer_range=0.3)  # logits that can move
    return LlamaForCausalLM(config).float()


def test_examples_are_chat_formatted_with_the_answer_marked(tokenizer):
    (ids, start), = encode_examples(tokenizer, PAIRS[:1], max_len=200)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": PAIRS[0][0]}], add_generation_prompt=True,
                                             tokenize=False)
    assert tokenizer.decode(ids[:start]) == rendered
    assert tokenizer.decode(ids[start:]) == PAIRS[0][1] + "<|im_end|>"
    ids_, mask, labels = _collate([(ids, start), (ids[:start + 2], start)], [0, 1], pad_id=0)
    assert mask[1].sum() == start + 2 and (labels[1, :start] == IGNORE).all()
    assert labels[0, start:].tolist() == ids[start:]


def test_prompts_longer_than_max_len_are_dropped(tokenizer):
    assert encode_examples(tokenizer, PAIRS[:2], max_len=5) == []


def test_training_lowers_the_loss_and_leaves_the_base_weights_alone(tokenizer):
    model = tiny_model(tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = TrainConfig(steps=30, batch_size=4, lr=5e-2, warmup_steps=2, rank=4, alpha=8, lora_layers=2)
    tensors, result = train_lora(model, tokenizer, PAIRS[:4], config)  # few pairs: it can memorise them
    assert len(result.losses) == 30 and result.examples == 4
    assert sum(result.losses[-5:]) / 5 < sum(result.losses[:5]) / 5 - 1.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # Only the top `lora_layers` layers, every target module, PEFT names and shapes.
    layers = {int(k.split(".layers.")[1].split(".")[0]) for k in tensors}
    assert layers == {1, 2}
    a = tensors["base_model.model.model.layers.2.self_attn.k_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.2.self_attn.k_proj.lora_B.weight"]
    assert a.shape == (4, 32) and b.shape == (16, 4) and b.abs().sum() > 0
    assert len(tensors) == 2 * 2 * 7 and result.adapter_params == sum(t.numel() for t in tensors.values())


def test_merged_weights_compute_what_the_adapter_computes(tokenizer, tmp_path):
    model = tiny_model(tokenizer)
    config = TrainConfig(steps=5, batch_size=4, lr=1e-2, warmup_steps=1, rank=4, alpha=8, lora_layers=2)
    tensors, _ = train_lora(model, tokenizer, PAIRS, config)
    ids = torch.tensor([encode_examples(tokenizer, PAIRS[:1], 200)[0][0]])
    with torch.no_grad():
        base_logits = model(ids).logits
    # The adapter as served (hooks) vs folded into the weights.
    from expert_registry.fleet.train import _LoRA, _lora_modules

    hooked = []
    for name, mod in _lora_modules(model, config).items():
        lo = _LoRA(mod, config.rank, config.alpha, torch.Generator())
        lo.A.data = tensors[f"base_model.model.{name}.lora_A.weight"]
        lo.B.data = tensors[f"base_model.model.{name}.lora_B.weight"]
        hooked.append(lo)
    with torch.no_grad():
        adapted = model(ids).logits
    for lo in hooked:
        lo.handle.remove()
    merge_lora(model, tensors, config)
    with torch.no_grad():
        merged = model(ids).logits
    assert not torch.allclose(adapted, base_logits, atol=1e-4)
    torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=1e-4)
    # Saved in PEFT's layout, bf16, with the config vLLM reads.
    save_adapter(tmp_path / "adapter", tensors, config, base_model="base")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["layers_to_transform"] == [1, 2] and set(cfg["target_modules"]) >= {"q_proj", "down_proj"}
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert saved.keys() == tensors.keys() and all(t.dtype == torch.bfloat16 for t in saved.values())


def test_bad_layer_count_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="lora_layers must be in 1..3"):
        train_lora(tiny_model(tokenizer), tokenizer, PAIRS, TrainConfig(steps=1, lora_layers=7))
