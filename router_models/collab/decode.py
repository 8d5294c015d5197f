"""Token-by-token decoding for a collaboration group: the loop both modes share.

``generate(group, prompt_ids, params, router=None)`` is logit addition: every expert
runs on every token (their caches stay current), the router sees their final hidden
states and returns, per sequence, the expert whose logits to use and its complementary
logits (``z = z_chosen + z_router``); ``kernels.logit_fusion`` adds, tempers, filters
and samples in one pass. Without a router the group's first expert decodes alone,
which is how a one-expert group reproduces that expert's own greedy output
(``expert=i`` picks another member to decode alone).

Anything with ``route(hidden [E, B, d]) -> Route`` is a router here
(``logit.LogitRouter`` is the trained one). Latent fusion has its own loop
(``latent.LatentFusion.generate``) and shares ``SamplingParams``, ``Step`` and
``sample`` with this one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch

from kernels.logit_fusion import logit_fusion
from router_models.collab.group import ExpertGroup


@dataclass(frozen=True)
class SamplingParams:
    """What a chat request sets: OpenAI's meanings (temperature 0 = greedy)."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_ids: frozenset[int] = field(default_factory=frozenset)


class Step(NamedTuple):
    token: int
    logprob: float
    expert: int  # which expert's logits this token was drawn from (the primary in latent fusion)


class Route(NamedTuple):
    choice: torch.Tensor                 # [B] int64, the expert per sequence
    bias: torch.Tensor | None = None     # [B, V] complementary logits, or None
    weak: torch.Tensor | None = None     # [B] int64, contrastive variant's weak expert
    beta: float | None = None            # its weight (z_strong - beta * z_weak)


class TokenRouter(Protocol):
    def route(self, hidden: torch.Tensor, group: ExpertGroup) -> Route: ...


def generator_for(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A seeded generator when the request set ``seed`` (reproducible sampling), else None."""
    if params.seed is None:
        return None
    g = torch.Generator(device="cpu")
    g.manual_seed(int(params.seed) & 0x7FFF_FFFF_FFFF_FFFF)
    return g


def sample(expert_logits: torch.Tensor, route: Route, params: SamplingParams,
           generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens ``[B]`` and their logprobs from ``expert_logits [E, B, V]`` under ``route``."""
    out = logit_fusion(expert_logits, route.choice, route.bias, params.temperature, params.top_k, params.top_p,
                       weak=route.weak, beta=route.beta, generator=generator, check_values=False)
    return out.tokens, out.logprobs


def generate(group: ExpertGroup, prompt_ids: list[int], params: SamplingParams,
             router: TokenRouter | None = None, *, expert: int = 0) -> Iterator[Step]:
    """Decode one sequence; yields each new token (the stop token included, then ends).

    Without a router, expert ``expert`` decodes alone (the others do not run)."""
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    gen = generator_for(params, group.device)
    cache = group.new_cache()
    active = None if router is not None else [expert]
    x = torch.tensor([prompt_ids], device=group.device)
    with torch.inference_mode():
        for _ in range(params.max_tokens):
            hidden = group(x, cache, active=active)[:, :, -1]          # [E, 1, d]
            route = router.route(hidden, group) if router is not None else Route(
                torch.zeros(1, dtype=torch.long, device=group.device))
            tokens, logprobs = sample(group.logits(hidden, active), route, params, gen)
            token = int(tokens[0])
            expert = int(route.choice[0]) if active is None else active[int(route.choice[0])]
            yield Step(token, float(logprobs[0]), expert)
            if token in params.stop_ids:
                return
            x = tokens.view(1, 1)
