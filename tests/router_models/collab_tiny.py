"""Tiny real Llama models that share a tokenizer and their first layers, for fast tests of
the collaboration heads (the quick fleet's 135M models are used where realism matters)."""

from __future__ import annotations

import random

import torch


def tiny_tokenizer(vocab: int = 256):
    """A real (``tokenizers`` word-level) tokenizer over ``w0 .. w{vocab-3}`` plus pad and eos."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(vocab - 2)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def random_prompts(n: int, seed: int = 0, vocab: int = 256) -> list[list[int]]:
    """``n`` seeded prompts of 4-8 token ids from the tiny vocabulary (pad and eos left out)."""
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(rng.randrange(4, 9))] for _ in range(n)]


def tiny_group(tokenizer, n_experts: int = 3, layers: int = 4, shared: int = 2, seed: int = 0):
    """``n_experts`` random 4-layer Llamas over ``tokenizer``'s vocabulary whose embeddings,
    first ``shared`` layers, final norm and (tied) head are identical."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from router_models.collab.group import ExpertGroup

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, initializer_range=0.3)
    models = []
    for i in range(n_experts):
        torch.manual_seed(seed * 100 + i)
        m = LlamaForCausalLM(config).float().eval()
        if models:
            first = models[0]
            m.model.embed_tokens.load_state_dict(first.model.embed_tokens.state_dict())
            m.model.norm.load_state_dict(first.model.norm.state_dict())
            for j in range(shared):
                m.model.layers[j].load_state_dict(first.model.layers[j].state_dict())
            m.tie_weights()
        models.append(m)
    return ExpertGroup([f"tiny-{i}" for i in range(n_experts)], models, tokenizer)


def greedy_examples(group, expert: int, prompts: list[list[int]], answer_len: int) -> list[tuple[list[int], int]]:
    """(ids, answer start) whose answers are ``expert``'s own greedy continuations."""
    from router_models.collab.decode import SamplingParams, generate

    params = SamplingParams(max_tokens=answer_len, temperature=0.0)
    return [(p + [s.token for s in generate(group, p, params, expert=expert)], len(p)) for p in prompts]
