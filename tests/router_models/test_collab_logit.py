"""The logit-addition router: its contract, its files, and that training learns who is right."""

from __future__ import annotations

import json

import pytest
import torch

from router_models.collab import logit as logit_mod
from router_models.collab.decode import SamplingParams, generate
from router_models.collab.logit import LogitRouter, LogitTrainConfig, RouterFileError, train_logit_router
from tests.router_models.collab_tiny import greedy_examples, random_prompts, tiny_group, tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def group(tokenizer):
    return tiny_group(tokenizer)


def test_untrained_router_adds_nothing_and_routes_every_row(group):
    router = LogitRouter.for_group(group, width=16)
    hidden = torch.randn(len(group.names), 5, group.hidden_size)
    route = router.route(hidden, group)
    assert route.choice.shape == (5,) and route.choice.dtype == torch.long
    assert set(route.choice.tolist()) <= set(range(len(group.names)))
    assert route.bias.shape == (5, group.vocab_size) and torch.count_nonzero(route.bias) == 0
    assert route.weak is None
    router.contrastive_beta = 0.5
    contrastive = router.route(hidden, group)
    assert contrastive.beta == 0.5 and (contrastive.weak != contrastive.choice).all()


def test_save_load_round_trip_and_refusals(group, tokenizer, tmp_path):
    router = LogitRouter.for_group(group, width=16)
    torch.nn.init.normal_(router.delta.weight)  # make the correction non-zero
    router.save(tmp_path / "r")
    back = LogitRouter.load(tmp_path / "r", group)
    hidden = torch.randn(len(group.names), 3, group.hidden_size)
    a, b = router.route(hidden, group), back.route(hidden, group)
    assert torch.equal(a.choice, b.choice) and torch.allclose(a.bias, b.bias)
    other = tiny_group(tokenizer, n_experts=2)
    with pytest.raises(RouterFileError, match="trained for experts"):
        LogitRouter.load(tmp_path / "r", other)
    with pytest.raises(RouterFileError, match="not a saved logit-addition router"):
        LogitRouter.load(tmp_path / "missing")
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    (tmp_path / "r" / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "width"}))
    with pytest.raises(RouterFileError, match="config.json is inconsistent"):
        LogitRouter.load(tmp_path / "r")
    (tmp_path / "r" / "config.json").write_text(json.dumps(config | {"format_version": 99}))
    with pytest.raises(RouterFileError, match="'logit-addition-router' format 99, not a logit-addition router v1"):
        LogitRouter.load(tmp_path / "r")
    (tmp_path / "r" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(RouterFileError, match="unreadable"):
        LogitRouter.load(tmp_path / "r")


def test_training_learns_to_pick_the_expert_that_wrote_the_answers(group, tmp_path):
    # Answers are expert 1's greedy continuations, so expert 1 gives the reference token
    # the highest probability almost everywhere: the router must learn to pick it, and the
    # correction must lower the reference tokens' loss further.
    examples = greedy_examples(group, 1, random_prompts(60, 1), 10)
    router = train_logit_router(group, examples, tmp_path, progress=False,
                                config=LogitTrainConfig(width=32, epochs=4, lr=3e-3, batch_positions=64, margin=0.0))

    report = json.loads((tmp_path / "train_report.json").read_text())
    assert report["best_expert_share"]["tiny-1"] > 0.8
    assert report["heldout_choice_accuracy"] >= 0.8
    assert report["heldout_nll"]["router_choice_plus_delta"] < report["heldout_nll"]["router_choice"]
    assert (tmp_path / "router" / "config.json").exists() and (tmp_path / "features" / "manifest.json").exists()
    prompt, start = examples[0]
    steps = list(generate(group, prompt[:start], SamplingParams(max_tokens=8, temperature=0.0), router))
    assert len(steps) == 8 and sum(s.expert == 1 for s in steps) >= 6


def test_resume_after_an_interruption_ends_where_an_uninterrupted_run_does(group, tmp_path, monkeypatch):
    examples = greedy_examples(group, 1, random_prompts(12, 3), 6)
    config = LogitTrainConfig(width=16, epochs=3, batch_positions=16, chunk_examples=4)
    whole = train_logit_router(group, examples, tmp_path / "a", config=config, progress=False)

    real = logit_mod._save_checkpoint
    calls = []

    def interrupt_after_first(*args, **kw):
        real(*args, **kw)
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(logit_mod, "_save_checkpoint", interrupt_after_first)
    with pytest.raises(KeyboardInterrupt):
        train_logit_router(group, examples, tmp_path / "b", config=config, progress=False)
    assert not (tmp_path / "b" / "router").exists()
    resumed = train_logit_router(group, examples, tmp_path / "b", config=config, progress=False)
    assert len(calls) == 3  # epochs 2 and 3 only: the first was not redone
    for (k, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), k


def test_training_refuses_what_it_cannot_use(group, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="at least two examples"):
        train_logit_router(group, [([1, 2, 3], 3)], tmp_path, progress=False)
    solo = tiny_group(tokenizer, n_experts=1)
    with pytest.raises(ValueError, match="at least two experts"):
        train_logit_router(solo, [([1, 2, 3], 1)] * 3, tmp_path, progress=False)
