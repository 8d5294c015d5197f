"""Latent fusion: identity when untrained, causal masking and caches, gradients, files, training."""

from __future__ import annotations

import json

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
from tests.router_models.collab_tiny import greedy_examples, random_prompts, tiny_group, tiny_tokenizer

CONFIG = LatentFusionConfig(shared_width=16, heads=2, router_width=8, top_k=2, batch_size=4)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def group(tokenizer):
    return tiny_group(tokenizer)


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
    for prompt in random_prompts(3):
        primary, peers = model.select(group, prompt)
        assert len(peers) == 1 and primary not in peers
        fused = [s.token for s in model.generate(group, prompt, params)]
        alone = [s.token for s in generate(group, prompt, params, expert=primary)]
        assert fused == alone


def test_full_sequence_fusion_equals_incremental_decoding(group):
    # The teacher-forced path (causal kernel over whole sequences) and the decoding path
    # (group cache + cached peer keys/values: the prompt, then a chunk of two tokens, then
    # one at a time) must give the same logits at every position.
    model = _perturbed(group)
    prompt, cont = random_prompts(1, 5)[0], [5, 17, 33, 2, 90]
    primary, peers, feed = model.session(group, prompt)
    with torch.no_grad():
        steps = [feed(torch.tensor([prompt])), feed(torch.tensor([cont[:2]]), last_only=False)]
        steps += [feed(torch.tensor([[t]])) for t in cont[2:-1]]
        incremental = torch.cat(steps)                                  # positions P-1 .. P+3
        ids = torch.tensor([prompt + cont])
        logits = model.route_logits(group, ids, torch.tensor([len(prompt)]))
        peer_t, gates = _choose_peers(logits, torch.tensor([primary]), CONFIG.top_k)
        assert peer_t.tolist() == [peers]
        hidden = _fused_forward(model, group, ids, torch.tensor([primary]), peer_t, gates)
        full = group.logits(hidden[None], [primary])[0, 0, len(prompt) - 1:-1]
        alone = group.logits(group(ids, active=[primary]), [primary])[0, 0, len(prompt) - 1:-1]
    assert incremental.shape == full.shape == (len(cont), group.vocab_size)
    torch.testing.assert_close(incremental, full, atol=1e-4, rtol=1e-4)
    assert (alone - full).abs().max() > 1e-2  # the perturbed fusion really changes the primary
    greedy = [s.token for s in model.generate(group, prompt, SamplingParams(max_tokens=4, temperature=0.0))]
    assert greedy[0] == int(full[0].argmax())


def test_gradients_reach_router_and_interaction_not_experts(group):
    model = _perturbed(group).train()
    examples = greedy_examples(group, 1, random_prompts(4, 2), 5)
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
    prompt = random_prompts(1, 7)[0]
    params = SamplingParams(max_tokens=5, temperature=0.0)
    assert [s.token for s in back.generate(group, prompt, params)] == [s.token for s in model.generate(group, prompt,
                                                                                                         params)]
    with pytest.raises(RouterFileError, match="trained for experts"):
        LatentFusion.load(tmp_path / "m", tiny_group(tokenizer, n_experts=2))
    with pytest.raises(RouterFileError, match="not a saved latent-fusion model"):
        LatentFusion.load(tmp_path / "nothing")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps(config | {"kind": "logit-addition-router"}))
    with pytest.raises(RouterFileError, match="'logit-addition-router' format 1, not a latent-fusion model v1"):
        LatentFusion.load(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "boundaries"}))
    with pytest.raises(RouterFileError, match="config.json is inconsistent"):
        LatentFusion.load(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("[1, 2]")
    with pytest.raises(RouterFileError, match="None format None, not a latent-fusion model"):
        LatentFusion.load(tmp_path / "m")


def test_top_1_is_the_primary_alone(group):
    model = _perturbed(group)
    model.config = LatentFusionConfig(**{**CONFIG.__dict__, "top_k": 1})
    prompt = random_prompts(1, 9)[0]
    params = SamplingParams(max_tokens=8, temperature=0.0)
    primary, peers = model.select(group, prompt)
    assert peers == []
    assert [s.token for s in model.generate(group, prompt, params)] == \
        [s.token for s in generate(group, prompt, params, expert=primary)]


def test_one_expert_group_is_the_expert_alone(tokenizer):
    solo = tiny_group(tokenizer, n_experts=1)
    model = LatentFusion.for_group(solo, CONFIG)
    assert model.boundaries == []
    prompt = random_prompts(1, 11)[0]
    params = SamplingParams(max_tokens=8, temperature=0.0)
    assert model.select(solo, prompt) == (0, [])
    assert [s.token for s in model.generate(solo, prompt, params)] == [s.token for s in generate(solo, prompt, params)]


def test_answer_losses_use_each_experts_own_head(tokenizer):
    # Experts with their own (untied, different) output heads: the loss of expert e must
    # be computed through e's head, as the model itself computes it.
    from transformers import LlamaConfig, LlamaForCausalLM

    from router_models.collab.group import ExpertGroup

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    models = []
    for i in range(2):
        torch.manual_seed(i)
        models.append(LlamaForCausalLM(config).eval())
    models[1].model.embed_tokens.load_state_dict(models[0].model.embed_tokens.state_dict())
    models[1].model.layers[0].load_state_dict(models[0].model.layers[0].state_dict())
    pair = ExpertGroup(["a", "b"], models, tokenizer)
    assert pair.trunk_layers == 1 and not pair.shared_head
    examples = [(p + [7, 8, 9], len(p)) for p in random_prompts(3, 4)]
    ids, starts, lengths = _batch(examples, range(3), 0, pair.device)
    with torch.no_grad():
        hidden = pair(ids)
        for e, m in enumerate(models):
            ours = _answer_losses(pair, hidden[e], ids, starts, lengths, torch.full((3,), e))
            for row, (seq, start) in enumerate(examples):
                x = torch.tensor([seq])
                theirs = m(x, labels=torch.where(torch.arange(len(seq)) >= start, x, -100)).loss
                torch.testing.assert_close(ours[row], theirs, atol=1e-4, rtol=1e-4)


def test_training_resumes_mid_epoch_as_if_never_stopped(group, tmp_path, monkeypatch):
    import router_models.collab.latent as latent

    examples = greedy_examples(group, 2, random_prompts(20, 4), 4)   # 18 fitted = 5 steps per epoch
    config = LatentFusionConfig(shared_width=16, heads=2, router_width=8, epochs=2, batch_size=4, checkpoint_every=2)
    whole = train_latent_fusion(group, examples, tmp_path / "whole", config=config, progress=False)
    real, calls = latent._train_step, []

    def stop_after_seven(*args, **kwargs):
        if len(calls) == 7:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(latent, "_train_step", stop_after_seven)
    with pytest.raises(KeyboardInterrupt):
        train_latent_fusion(group, examples, tmp_path / "cut", config=config, progress=False)
    progress = json.loads((tmp_path / "cut" / "checkpoint" / "progress.json").read_text())
    assert (progress["epoch"], progress["step"]) == (1, 2)     # second epoch, after its second step
    monkeypatch.undo()
    resumed = train_latent_fusion(group, examples, tmp_path / "cut", config=config, progress=False)
    for (key, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=key)
    reports = [json.loads((tmp_path / d / "train_report.json").read_text()) for d in ("whole", "cut")]
    assert reports[0]["epoch_losses"] == reports[1]["epoch_losses"]


def test_training_learns_the_router_and_resumes(group, tmp_path):
    # Expert 1 wrote the answers: the router must learn to choose it; the report and the
    # checkpoint must be written, and a second call resumes instead of training again.
    examples = greedy_examples(group, 1, random_prompts(40, 3), 6)
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


def test_trains_and_decodes_on_the_real_quick_fleet(fleet_model_dirs, tmp_path):
    # The quick fleet's four SmolLM2-135M models (they differ only in their top layers, so
    # fusion happens after two stacks of those); a few real chat-formatted examples per
    # domain with a quick config.
    from expert_registry.fleet import domains
    from expert_registry.fleet.train import encode_examples
    from router_models.collab.group import ExpertGroup

    group = ExpertGroup.load(fleet_model_dirs)
    pairs = [(t.prompt, t.target) for d in ("arithmetic", "code", "extraction")
             for t in domains.tasks(d, "train", 3, seed=0)]
    examples = encode_examples(group.tokenizer, pairs, 96)
    train_latent_fusion(group, examples, tmp_path, config=LatentFusionConfig.quick(), progress=False)
    report = json.loads((tmp_path / "train_report.json").read_text())
    assert group.trunk_layers >= 20 and report["boundaries"] == boundaries_for(group, 2)
    assert len(report["boundaries"]) == 2 and report["boundaries"][-1] == group.n_layers
    assert report["heldout_examples"] == 1
    assert set(report["heldout_answer_loss"]) == {"primary_alone", "primary_fused", "lowest_loss_expert"}
    model = LatentFusion.load(tmp_path / "model", group)
    prompt = examples[0][0][:examples[0][1]]
    primary, peers = model.select(group, prompt)
    assert len(peers) == 1 and primary not in peers
    steps = list(model.generate(group, prompt, SamplingParams(max_tokens=4, temperature=0.0)))
    assert 1 <= len(steps) <= 4 and all(s.expert == primary and s.logprob <= 0 for s in steps)
