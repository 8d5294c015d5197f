"""A group of causal LMs that share one tokenizer, run side by side in one torch process.

Both collaboration modes need every active expert's hidden states at the same positions,
so the group runs its experts layer stack by layer stack over the same tokens rather
than as separate ``generate`` calls. What the group does:

- **Shares what is identical.** The leading decoder layers whose weights are equal in
  every expert (and the embeddings, the final norm and the output head when equal) are
  kept once and run once: the *trunk*. The fleet's experts are the generalist plus LoRA
  deltas on its top 10 of 30 layers, so a four-expert group runs 20 + 4 x 10 layers per
  token (2x one model, not 4x) and holds one copy of the rest. Experts with nothing in
  common simply have an empty trunk.
- **Runs in stages.** ``forward(..., boundaries=(l1, l2), fuse=f)`` stops every active
  expert after decoder layer ``l1`` and ``l2`` (counted from 1) and hands their hidden
  states ``[E, B, T, d]`` to ``f``, which returns them, possibly changed (latent fusion
  adds the cross-attention output to the primary's stream there). Boundaries must lie
  at or past the trunk: inside it every expert's states are the same tensor.
- **Caches keys and values** per expert (and once for the trunk) for incremental
  decoding: ``cache = group.new_cache()``, then ``forward(prompt, cache)`` and
  ``forward(next_token, cache)``.

Padding: sequences in a batch are right-padded and no attention mask is used, which is
exact for every non-pad position of a causal model (a pad only follows real tokens).
Decoding with a cache is for batches of one sequence, or of sequences of equal length.

The decoder layers are the models' own modules (``transformers``' Llama-family layout:
``model.embed_tokens``, ``model.layers``, ``model.norm``, ``model.rotary_emb``,
``lm_head``), so the group's greedy output equals each model's own ``generate``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class GroupError(ValueError):
    """The models cannot form a group (different tokenizers, widths or layouts)."""


class _KV:
    """The minimal cache the models' attention layers write to: ``update(k, v, layer_idx)``."""

    def __init__(self) -> None:
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx in self.layers:
            k, v = self.layers[layer_idx]
            key, value = torch.cat([k, key], dim=-2), torch.cat([v, value], dim=-2)
        self.layers[layer_idx] = (key, value)
        return key, value

    def select(self, rows: torch.Tensor) -> None:
        """Keep only batch rows ``rows`` (sequences that finished are dropped)."""
        self.layers = {i: (k[rows], v[rows]) for i, (k, v) in self.layers.items()}


@dataclass
class GroupCache:
    """Keys/values of the trunk and of each expert's own layers, and how many positions they hold."""

    trunk: _KV = field(default_factory=_KV)
    experts: dict[int, _KV] = field(default_factory=dict)
    length: int = 0

    def select(self, rows: torch.Tensor) -> None:
        self.trunk.select(rows)
        for kv in self.experts.values():
            kv.select(rows)


def _tensors_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def tokenizer_fingerprint(tokenizer) -> str:
    """Same fingerprint <=> same token ids for the same text (vocabulary and specials)."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps([vocab, tokenizer.all_special_tokens]).encode()).hexdigest()[:16]


class ExpertGroup(torch.nn.Module):
    """``E`` causal LMs with one tokenizer and one hidden width, run together (see module doc)."""

    def __init__(self, names: Sequence[str], models: Sequence[torch.nn.Module], tokenizer) -> None:
        super().__init__()
        if not models or len(names) != len(models):
            raise GroupError("a group needs at least one model and one name per model")
        if len(set(names)) != len(names):
            raise GroupError(f"expert names repeat: {list(names)}")
        configs = [m.config for m in models]
        for key in ("hidden_size", "num_hidden_layers", "vocab_size"):
            values = {getattr(c, key) for c in configs}
            if len(values) > 1:
                raise GroupError(f"the models differ in {key}: {sorted(values)}")
        self.names = list(names)
        self.tokenizer = tokenizer
        self.config = configs[0]
        self.hidden_size = self.config.hidden_size
        self.n_layers = self.config.num_hidden_layers
        self.vocab_size = self.config.vocab_size
        first = models[0]
        same = lambda get: all(_tensors_equal(get(first), get(m)) for m in models[1:])  # noqa: E731
        self.shared_embed = same(lambda m: m.model.embed_tokens)
        trunk = 0
        if self.shared_embed:
            while trunk < self.n_layers and same(lambda m: m.model.layers[trunk]):
                trunk += 1
        self.trunk_layers = trunk
        self.trunk = torch.nn.ModuleList(first.model.layers[:trunk])
        self.branches = torch.nn.ModuleList(torch.nn.ModuleList(m.model.layers[trunk:]) for m in models)
        self.embeds = torch.nn.ModuleList([first.model.embed_tokens] if self.shared_embed
                                          else [m.model.embed_tokens for m in models])
        self.shared_norm = same(lambda m: m.model.norm)
        self.norms = torch.nn.ModuleList([first.model.norm] if self.shared_norm else [m.model.norm for m in models])
        self.shared_head = same(lambda m: m.lm_head)
        self.heads = torch.nn.ModuleList([first.lm_head] if self.shared_head else [m.lm_head for m in models])
        self.rotary = first.model.rotary_emb
        self.requires_grad_(False)
        self.eval()

    # -- loading ------------------------------------------------------------------------------
    @classmethod
    def load(cls, experts: dict[str, str | Path], *, dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu") -> ExpertGroup:
        """Load HF model folders ``{name: path}``; they must share a tokenizer."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not experts:
            raise GroupError("a group needs at least one expert")
        tokenizers = {name: AutoTokenizer.from_pretrained(str(path)) for name, path in experts.items()}
        prints = {name: tokenizer_fingerprint(t) for name, t in tokenizers.items()}
        if len(set(prints.values())) > 1:
            raise GroupError(f"the experts' tokenizers differ, so they cannot decode together: {prints}")
        models = []
        for name, path in experts.items():
            m = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa")
            models.append(m.to(device))
        group = cls(list(experts), models, next(iter(tokenizers.values())))
        log.info("group %s: %d shared leading layers of %d", list(experts), group.trunk_layers, group.n_layers)
        return group

    @property
    def device(self) -> torch.device:
        return self.embeds[0].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embeds[0].weight.dtype

    def new_cache(self) -> GroupCache:
        return GroupCache()

    # -- running ------------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, cache: GroupCache | None = None, *,
                active: Sequence[int] | None = None, boundaries: Sequence[int] = (),
                fuse: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Final-normed hidden states ``[len(active), B, T, d]`` of tokens ``ids [B, T]``.

        ``active``: which experts run (default all), in that order along the first axis.
        ``boundaries``: layer counts (``trunk_layers <= l <= n_layers``) after which
        ``fuse(stage, h)`` sees and may replace the active experts' states ``h``.
        """
        experts = list(range(len(self.names))) if active is None else list(active)
        if not experts or any(not 0 <= e < len(self.names) for e in experts):
            raise GroupError(f"active experts {experts} are not in 0..{len(self.names) - 1}")
        stops = sorted(set(boundaries))
        if stops and (stops[0] < self.trunk_layers or stops[-1] > self.n_layers):
            raise GroupError(f"boundaries {stops} must lie in {self.trunk_layers}..{self.n_layers} "
                             f"(the first {self.trunk_layers} layers are shared by every expert)")
        B, T = ids.shape
        start = cache.length if cache is not None else 0
        positions = torch.arange(start, start + T, device=ids.device)[None].expand(B, T)
        mask = self._mask(T, start)

        if self.shared_embed:
            h = self.embeds[0](ids)
            pe = self.rotary(h, positions)
            trunk_kv = cache.trunk if cache is not None else None
            for layer in self.trunk:
                h = layer(h, attention_mask=mask, position_ids=positions, past_key_values=trunk_kv,
                          position_embeddings=pe)
            states = [h] * len(experts)
        else:
            states = [self.embeds[e](ids) for e in experts]
            pe = self.rotary(states[0], positions)
        kvs = [cache.experts.setdefault(e, _KV()) if cache is not None else None for e in experts]
        done = self.trunk_layers
        for stage, stop in enumerate([*stops, self.n_layers]):
            for i, e in enumerate(experts):
                for layer in self.branches[e][done - self.trunk_layers:stop - self.trunk_layers]:
                    states[i] = layer(states[i], attention_mask=mask, position_ids=positions,
                                      past_key_values=kvs[i], position_embeddings=pe)
            done = stop
            if stage < len(stops) and fuse is not None:
                stacked = fuse(stage, torch.stack(states))
                states = list(stacked.unbind(0))
        if cache is not None:
            cache.length = start + T
        norms = [self.norms[0 if self.shared_norm else e] for e in experts]
        return torch.stack([norm(s) for norm, s in zip(norms, states)])

    def trunk_states(self, ids: torch.Tensor) -> torch.Tensor:
        """``[B, T, d]``: what every expert holds after the shared layers (the first
        expert's embeddings when nothing is shared); a query's common representation."""
        positions = torch.arange(ids.shape[1], device=ids.device)[None].expand_as(ids)
        h = self.embeds[0](ids)
        if self.trunk_layers:
            pe = self.rotary(h, positions)
            for layer in self.trunk:
                h = layer(h, attention_mask=None, position_ids=positions, past_key_values=None,
                          position_embeddings=pe)
        return h

    def logits(self, hidden: torch.Tensor, active: Sequence[int] | None = None) -> torch.Tensor:
        """``[E', ..., V]`` next-token logits from ``forward``'s states (same ``active``)."""
        experts = list(range(len(self.names))) if active is None else list(active)
        if self.shared_head:
            return self.heads[0](hidden)
        return torch.stack([self.heads[e](h) for e, h in zip(experts, hidden)])

    def head_weight(self, expert: int = 0) -> torch.Tensor:
        """The output projection ``[V, d]`` of ``expert`` (the shared one when shared)."""
        return self.heads[0 if self.shared_head else expert].weight

    def _mask(self, T: int, start: int) -> torch.Tensor | None:
        """None for the usual cases (prefill from empty, or one new token): SDPA is causal
        by itself; an explicit bottom-right causal mask when several tokens follow a cache."""
        if T == 1 or start == 0:
            return None
        rows = torch.arange(T, device=self.device)[:, None] + start
        return (torch.arange(start + T, device=self.device)[None, :] <= rows)[None, None]

    # -- chat formatting ----------------------------------------------------------------------
    def encode_chat(self, messages: list[dict]) -> list[int]:
        """The token ids an OpenAI-style ``messages`` list renders to, generation prompt added."""
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=False)
        if hasattr(ids, "input_ids") or isinstance(ids, dict):
            ids = ids["input_ids"]
        return list(ids)

    def stop_ids(self) -> set[int]:
        """Token ids that end an answer: the tokenizer's EOS and the chat template's end marker."""
        out = set()
        for tok in (self.tokenizer.eos_token, "<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
            if tok is None:
                continue
            tid = self.tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id:
                out.add(tid)
        gen = getattr(self.config, "eos_token_id", None)
        out.update([gen] if isinstance(gen, int) else (gen or []))
        return out
