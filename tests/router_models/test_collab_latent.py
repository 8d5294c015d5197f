"""Latent fusion: identity when untrained, causal masking and caches, gradients, files, training."""

from __future__ import annotations

import json
import random

import pytest
import torch

from router_models.collab.decode import SamplingParams, generate
from router_models.collab.latent import (
    LatentFusion,
    LatentFusionConfig,
    RouterFileError,
    _answer_losses,
    _batch,
    _choose_peers,
    _fused_forward,
    boundaries_for,
    train_latent_fusion,
)
from tests.router_models.collab_tiny import greedy_examples, tiny_group, tiny_tokenizer

CONFIG = LatentFusionConfig(shared_width=16, heads=2, router_width=8, top_k=2, batch_size=4)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def group(tokenizer):
    return tiny_group(tokenizer)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, 256) for _ in range(rng.randrange(4, 9))] for _ in range(n)]


def _perturbed(group) -> LatentFusion:
    """A module whose fusion really changes the primary (the output projections non-zero)."""
    torch.manual_seed(0)
    model = LatentFusion.for_group(group, CONFIG)
    for stack in model.back:
        for lin in stack:
            torch.nn.init.normal_(lin.weight, std=0.5)
    return model.eval()


def test_boundaries_lie_past_the_shared_trunk(group):
    assert group.trunk_layers == 2
    assert boundaries_for(group, 2) == [3, 4]
    assert boundaries_for(group, 9) == [3, 4]  # no more stacks than free layers


def test_untrained_fusion_leaves_the_primary_unchanged(group):
    model = LatentFusion.for_group(group, CONFIG)
    params = SamplingParams(max_tokens=10, temperature=0.0)
    for prompt in _prompts(3):
        primary, peers = model.select(group, prompt)
        assert len(peers) == 1 and primary not in peers
        fused = [s.token for s in model.generate(group, prompt, params)]
        alone = [s.token for s in generate(group, prompt, params, expert=primary)]
        assert fused == alone


def test_full_sequence_fusion_equals_incremental_decoding(group):
    # The teacher-forced (causal kernel) path and the cached decoding path must agree.
    model = _perturbed(group)
    prompt = _prompts(1, 5)[0]
    params = SamplingParams(max_tokens=6, temperature=0.0)
    tokens = [s.token for s in model.generate(group, prompt, params)]
    primary, peers = model.select(group, prompt)
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model.route_logits(group, ids, torch.tensor([len(prompt)]))
        peer_t, gates = _choose_peers(logits, torch.tensor([primary]), CONFIG.top_k)
        assert peer_t.tolist() == [peers]
        hidden = _fused_forward(model, group, ids, torch.tensor([primary]), peer_t, gates)
        full = group.logits(hidden[None], [primary])[0, 0]
    greedy = full[len(prompt) - 1:-1].argmax(-1).tolist()
    assert greedy == tokens
    with torch.no_grad():
        alone = group.logits(group(ids, active=[primary]), [primary])[0, 0]
    assert (alone - full).abs().max() > 1e-2  # the perturbed fusion really changes the primary


def test_gradients_reach_router_and_interaction_not_experts(group):
    model = _perturbed(group).train()
    examples = greedy_examples(group, 1, _prompts(4, 2), 5)
    ids, starts, lengths = _batch(examples, range(4), 0, group.device)
    logits = model.route_logits(group, ids, starts)
    primaries = torch.tensor([1, 1, 2, 0])
    peers, gates = _choose_peers(logits, primaries, 2)
    hidden = _fused_forward(model, group, ids, primaries, peers, gates)
    _answer_losses(group, hidden, ids, starts, lengths, primaries).mean().backward()
    assert model.router[1].weight.grad is not None and model.router[1].weight.grad.abs().sum() > 0
    assert model.wq[0].weight.grad.abs().sum() > 0 and model.back[1][1].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in group.parameters())


def test_save_load_round_trip_and_refusals(group, tokenizer, tmp_path):
    model = _perturbed(group)
    model.save(tmp_path / "m")
    back = LatentFusion.load(tmp_path / "m", group)
    prompt = _prompts(1, 7)[0]
    params = SamplingParams(max_tokens=5, temperature=0.0)
    assert [s.token for s in back.generate(group, prompt, params)] == [s.token for s in model.generate(group, prompt,
                                                                                                         params)]
    with pytest.raises(RouterFileError, match="trained for experts"):
        LatentFusion.load(tmp_path / "m", tiny_group(tokenizer, n_experts=2))
    with pytest.raises(RouterFileError, match="not a saved latent-fusion model"):
        LatentFusion.load(tmp_path / "nothing")


def test_top_1_is_the_primary_alone(group):
    model = _perturbed(group)
    model.config = LatentFusionConfig(**{**CONFIG.__dict__, "top_k": 1})
    prompt = _prompts(1, 9)[0]
    params = SamplingParams(max_tokens=8, temperature=0.0)
    primary, peers = model.select(group, prompt)
    assert peers == []
    assert [s.token for s in model.generate(group, prompt, params)] == \
        [s.token for s in generate(group, prompt, params, expert=primary)]


def test_training_learns_the_router_and_resumes(group, tmp_path):
    # Expert 1 wrote the answers: the router must learn to choose it; the report and the
    # checkpoint must be written, and a second call resumes instead of training again.
    examples = greedy_examples(group, 1, _prompts(40, 3), 6)
    config = LatentFusionConfig(shared_width=16, heads=2, router_width=16, epochs=4, lr=1e-2, batch_size=8)
    model = train_latent_fusion(group, examples, tmp_path, config=config, progress=False)
    report = json.loads((tmp_path / "train_report.json").read_text())
    assert report["best_expert_share"]["tiny-1"] == 1.0
    assert report["heldout_router_accuracy"] == 1.0
    assert len(report["epoch_losses"]) == 4 and report["epoch_losses"][-1] < report["epoch_losses"][0]
    assert model.select(group, examples[0][0][:examples[0][1]])[0] == 1
    again = train_latent_fusion(group, examples, tmp_path, config=config, progress=False)
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
