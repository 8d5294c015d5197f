"""Latent fusion (after Mixture of Thoughts): the primary expert reads its peers' hidden states.

Per query a router picks the top-K experts; the first is the *primary*, whose tokens are
emitted, the other K-1 are its *peers*. The experts' layers past the shared trunk are
split into Q stacks; after each stack every active expert's hidden states are normed
and projected to a shared width (one projection per expert and stack), the primary's
projection cross-attends causally over its peers' projections (multi-head, one softmax
over all peers' positions ``s <= t``: ``kernels.latent_fusion``), and the result is
projected back (the primary's own output projection, zero-initialised) and added to the
primary's residual stream. Peers run unmodified. The experts stay frozen; the router
and the interaction layers train.

Why the boundaries lie past the trunk: in a group whose experts share their first
layers (the fleet: 20 of 30), every expert's state inside the trunk is the same tensor,
so attending to a peer there adds nothing.

The router reads the query's trunk output (mean over the prompt's positions) and gives a
distribution over experts. Each peer's values are scaled by its router probability
renormalised over the active experts (primary included), so the fusion loss reaches the
router too. Training
(``train_latent_fusion``, teacher forcing on sequences with reference answers):

- the answer tokens' cross-entropy under the fused primary;
- a supervised router term: cross-entropy against the expert with the lowest answer
  loss on that example (measured once, without gradients, and cached);
- Switch-style load balance ``E * sum_e f_e P_e`` and the mean entropy of the router's
  distributions (low entropy = a decided router), both lightly weighted.

During training the primary is the example's lowest-loss expert (teacher-forced routing,
so the interaction layers learn to help the expert that will be chosen once the router
is right); its peers are the router's next choices. Batches mix examples of every
primary (the load-balance term needs a mixed batch) and the group's ``active`` is one list
per call, so a batch runs as one group call per primary present, each with that primary
first and the union of its rows' peers (once the router has settled: K experts, not E);
each row gets the fusion of its own peers. The experts are frozen and what comes before
the first boundary holds no trainable parameter, so autograd records nothing there. The
reference pass (each expert's answer loss, and the router's prompt features: the trunk
is frozen, so a prompt's pooled trunk output never changes) runs once, without
gradients, and is cached in ``out_dir``.

A one-expert group (or ``top_k=1``) has no peers: ``generate`` is then the primary's own
decoding, token for token.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels.latent_fusion import latent_fusion
from router_models.collab.decode import Route, SamplingParams, Step, generator_for, sample
from router_models.collab.group import ExpertGroup, GroupError, tokenizer_fingerprint
from router_models.collab.logit import (
    RouterFileError,
    _collate,
    _examples_hash,
    _load_checkpoint,
    _save_checkpoint,
    check_group,
    fill_module,
    read_module,
    save_module,
)

log = logging.getLogger(__name__)

KIND = "latent-fusion"


@dataclass(frozen=True)
class LatentFusionConfig:
    shared_width: int = 256
    heads: int = 4
    top_k: int = 2
    stacks: int = 2              # Q, evenly over the layers past the trunk
    router_width: int = 128
    epochs: int = 2
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 8
    router_weight: float = 1.0
    balance_weight: float = 0.01
    entropy_weight: float = 0.01
    heldout_share: float = 0.1
    checkpoint_every: int = 50   # steps between checkpoints inside an epoch (0: at epoch ends only)
    seed: int = 0

    @classmethod
    def quick(cls) -> LatentFusionConfig:
        """CI settings: seconds, not a useful model."""
        return cls(shared_width=32, heads=2, router_width=16, epochs=1, batch_size=4)


def boundaries_for(group: ExpertGroup, stacks: int) -> list[int]:
    """Layer counts after which fusion happens: ``stacks`` even splits of the non-shared layers."""
    if len(group.names) == 1:
        return []            # nobody to fuse with: the module only routes (to its one expert)
    free = group.n_layers - group.trunk_layers
    if free < 1:
        raise GroupError("latent fusion needs experts that differ in at least one layer")
    q = max(1, min(stacks, free))
    return sorted({group.trunk_layers + round(free * (i + 1) / q) for i in range(q)})


def prompt_features(group: ExpertGroup, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``[B, d]``: the trunk's output (what every expert holds after the shared layers)
    averaged over the first ``lengths[b]`` positions of each right-padded row, the prompt."""
    width = int(lengths.max())
    h = group.trunk_states(ids[:, :width])
    mask = (torch.arange(width, device=ids.device)[None] < lengths[:, None]).to(h.dtype)
    return (h * mask[..., None]).sum(1) / lengths[:, None].to(h.dtype)


class _RMSNorm(torch.nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class LatentFusion(torch.nn.Module):
    """Router plus per-boundary interaction layers for one group (see module doc)."""

    def __init__(self, names: Sequence[str], hidden_size: int, boundaries: Sequence[int],
                 config: LatentFusionConfig = LatentFusionConfig(), fingerprint: str = ""):
        super().__init__()
        if config.shared_width % config.heads:
            raise ValueError("shared_width must be a multiple of heads")
        self.names, self.hidden_size, self.fingerprint = list(names), hidden_size, fingerprint
        self.boundaries = list(boundaries)
        self.config = config
        E, d, s, Q = len(self.names), hidden_size, config.shared_width, len(self.boundaries)
        self.router = torch.nn.Sequential(_RMSNorm(d), torch.nn.Linear(d, config.router_width), torch.nn.GELU(),
                                          torch.nn.Linear(config.router_width, E))
        self.norm = torch.nn.ModuleList(torch.nn.ModuleList(_RMSNorm(d) for _ in range(E)) for _ in range(Q))
        self.proj = torch.nn.ModuleList(torch.nn.ModuleList(torch.nn.Linear(d, s) for _ in range(E))
                                        for _ in range(Q))
        self.wq = torch.nn.ModuleList(torch.nn.Linear(s, s, bias=False) for _ in range(Q))
        self.wk = torch.nn.ModuleList(torch.nn.Linear(s, s, bias=False) for _ in range(Q))
        self.wv = torch.nn.ModuleList(torch.nn.Linear(s, s, bias=False) for _ in range(Q))
        self.back = torch.nn.ModuleList(torch.nn.ModuleList(torch.nn.Linear(s, d) for _ in range(E))
                                        for _ in range(Q))
        for stack in self.back:
            for lin in stack:
                torch.nn.init.zeros_(lin.weight)
                torch.nn.init.zeros_(lin.bias)

    @classmethod
    def for_group(cls, group: ExpertGroup, config: LatentFusionConfig = LatentFusionConfig()) -> LatentFusion:
        return cls(group.names, group.hidden_size, boundaries_for(group, config.stacks), config,
                   tokenizer_fingerprint(group.tokenizer))

    # -- routing -----------------------------------------------------------------------------
    def route_logits(self, group: ExpertGroup, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Router logits ``[B, E]`` from the trunk output averaged over each prompt's positions."""
        return self.router(prompt_features(group, ids, lengths).to(self.router[1].weight.dtype))

    def select(self, group: ExpertGroup, prompt_ids: list[int]) -> tuple[int, list[int]]:
        """(primary, peers) for one prompt: the router's top-K, best first."""
        primary, peers, _ = self._plan(group, prompt_ids)
        return primary, peers

    def _plan(self, group: ExpertGroup, prompt_ids: list[int]) -> tuple[int, list[int], torch.Tensor]:
        with torch.no_grad():
            logits = self.route_logits(group, torch.tensor([prompt_ids], device=group.device),
                                       torch.tensor([len(prompt_ids)], device=group.device))
        k = max(1, min(self.config.top_k, len(self.names)))
        top = logits[0].topk(k).indices.tolist()
        return top[0], top[1:], logits[:, top].softmax(-1)[:, 1:]

    # -- the interaction ---------------------------------------------------------------------
    def project(self, stage: int, expert: int, h: torch.Tensor) -> torch.Tensor:
        """``expert``'s states ``[..., d]`` normed and projected to the shared width."""
        return self.proj[stage][expert](self.norm[stage][expert](h.to(self.wq[0].weight.dtype)))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # [..., T, s] -> [..., H, T, s/H]
        H = self.config.heads
        return x.unflatten(-1, (H, x.shape[-1] // H)).transpose(-3, -2)

    def attend(self, stage: int, primary: int, q_in: torch.Tensor, peers: torch.Tensor, gates: torch.Tensor,
               past: tuple[torch.Tensor, torch.Tensor] | None = None):
        """What to add to the primary's stream after stack ``stage``.

        ``q_in [B, T, d]``: the primary's states; ``peers [B, P, T, s]``: the peers'
        projections (``project``) at the same positions; ``gates [B, P]``; ``past``: peer
        keys/values ``[B, P, H, S, D]`` cached by earlier calls for the positions before
        these ``T``. Query ``t`` sees every peer's positions ``<= t`` in one softmax. Returns
        (addition ``[B, T, d]``, the keys/values to cache: past and new).
        """
        q = self._heads(self.wq[stage](self.project(stage, primary, q_in)))            # [B, H, T, D]
        k = self._heads(self.wk[stage](peers))                                          # [B, P, H, T, D]
        v = self._heads(self.wv[stage](peers)) * gates[:, :, None, None, None].to(q.dtype)
        if past is None:
            out = latent_fusion(q, k, v)                                                # causal, same T
        else:
            before, T = past[0].shape[3], q.shape[2]
            k, v = torch.cat([past[0], k], dim=3), torch.cat([past[1], v], dim=3)
            B, P, H, S, D = k.shape
            # One new position (decoding) sees every cached one; a chunk of several needs the
            # causal mask, offset by the cached length, repeated for each peer's block of keys.
            mask = None if T == 1 else (torch.arange(S, device=q.device)[None]
                                        <= torch.arange(T, device=q.device)[:, None] + before).repeat(1, P)
            out = F.scaled_dot_product_attention(q, k.permute(0, 2, 1, 3, 4).reshape(B, H, P * S, D),
                                                 v.permute(0, 2, 1, 3, 4).reshape(B, H, P * S, D), attn_mask=mask)
        return self.back[stage][primary](out.transpose(1, 2).flatten(-2)), (k, v)

    # -- decoding ----------------------------------------------------------------------------
    def session(self, group: ExpertGroup, prompt_ids: list[int]):
        """Route ``prompt_ids`` and open an incremental decoder for it: returns ``(primary,
        peers, feed)``; ``feed(ids [1, T], last_only=True)`` runs the next ``T`` tokens (the
        prompt first) through the group's cache and the peers' cached keys/values, and
        returns the fused primary's logits ``[T, V]`` (``[1, V]``: the last position)."""
        primary, peers, gates = self._plan(group, prompt_ids)
        active = [primary, *peers]
        cache = group.new_cache()
        peer_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def fuse(stage: int, h: torch.Tensor) -> torch.Tensor:
            proj = torch.stack([self.project(stage, e, h[i + 1]) for i, e in enumerate(peers)], 1)
            add, peer_kv[stage] = self.attend(stage, primary, h[0], proj, gates, peer_kv.get(stage))
            return torch.cat([(h[0] + add.to(h.dtype))[None], h[1:]])

        def feed(ids: torch.Tensor, last_only: bool = True) -> torch.Tensor:
            hidden = group(ids, cache, active=active, boundaries=self.boundaries if peers else (),
                           fuse=fuse if peers else None)[:1]                           # [1, 1, T, d]
            return group.logits(hidden[:, :, -1:] if last_only else hidden, [primary])[0, 0]

        return primary, peers, feed

    def generate(self, group: ExpertGroup, prompt_ids: list[int], params: SamplingParams) -> Iterator[Step]:
        """Decode one sequence with the router's primary, fused with its peers; yields each
        new token (the stop token included, then ends)."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        primary, _, feed = self.session(group, prompt_ids)
        gen = generator_for(params, group.device)
        x = torch.tensor([prompt_ids], device=group.device)
        zero = torch.zeros(1, dtype=torch.long, device=group.device)
        with torch.inference_mode():
            for _ in range(params.max_tokens):
                tokens, logprobs = sample(feed(x)[None], Route(zero), params, gen)    # [E=1, B=1, V]
                token = int(tokens[0])
                yield Step(token, float(logprobs[0]), primary)
                if token in params.stop_ids:
                    return
                x = tokens.view(1, 1)

    # -- files -------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        return save_module(self, directory, {
            "kind": KIND, "experts": self.names, "hidden_size": self.hidden_size,
            "boundaries": self.boundaries, "config": asdict(self.config), "tokenizer_fingerprint": self.fingerprint})

    @classmethod
    def load(cls, directory: str | Path, group: ExpertGroup | None = None) -> LatentFusion:
        directory = Path(directory)
        meta, state = read_module(directory, KIND, "latent-fusion model")
        try:
            config = LatentFusionConfig(**meta["config"])
            model = cls(meta["experts"], meta["hidden_size"], meta["boundaries"], config, meta["tokenizer_fingerprint"])
        except (TypeError, KeyError, ValueError) as exc:
            raise RouterFileError(f"{directory}: config.json is inconsistent: {exc}") from None
        if group is not None:
            check_group(model.names, model.fingerprint, group, directory)
            if any(not group.trunk_layers <= b <= group.n_layers for b in model.boundaries):
                raise RouterFileError(f"{directory}: fusion boundaries {model.boundaries} do not fit the group")
        return fill_module(model, state, directory)


# -- training ----------------------------------------------------------------------------------
def _answer_losses(group: ExpertGroup, hidden: torch.Tensor, ids: torch.Tensor,
                   starts: torch.Tensor, lengths: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean answer-token CE per example: ``hidden [B, T, d]`` of the expert(s) ``rows [B]``.
    The output head (V x d, as costly as ~8 of SmolLM2's layers) runs on answer positions only."""
    T = ids.shape[1]
    pos = torch.arange(T - 1, device=ids.device)[None]
    keep = (pos >= (starts - 1)[:, None]) & (pos < (lengths - 1)[:, None])     # predicts an answer token
    out = torch.zeros(len(ids), device=ids.device)
    for e in rows.unique().tolist():
        sel = (rows == e).nonzero().squeeze(1)
        r, c = keep[sel].nonzero(as_tuple=True)
        z = group.logits(hidden[sel[r], c][None], [e])[0]                           # [M, V]
        ce = F.cross_entropy(z.float(), ids[sel[r], c + 1], reduction="none")
        out[sel] = torch.zeros(len(sel), device=ids.device).index_add(0, r, ce) / keep[sel].sum(1)
    return out


def _batch(examples, idx, pad, device):
    batch = [examples[i] for i in idx]
    ids = _collate(batch, pad).to(device)
    starts = torch.tensor([s for _, s in batch], device=device)
    lengths = torch.tensor([len(x) for x, _ in batch], device=device)
    return ids, starts, lengths


@torch.no_grad()
def _reference_pass(group, examples, out_dir: Path, batch_size: int, progress: bool):
    """``[N, E]`` answer loss of every expert alone on every example and ``[N, d]`` prompt
    features for the router; both fixed (the experts are frozen), so computed once and
    cached in ``out_dir/reference.safetensors`` (keyed by the experts and the examples)."""
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    path = out_dir / "reference.safetensors"
    key = json.dumps({"experts": group.names, "examples": _examples_hash(examples)})
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("key") == key:
                cached = load_file(str(path))
                return cached["losses"], cached["features"]
    except Exception:  # noqa: BLE001 - none yet, or cut short: compute it again
        pass
    pad = group.tokenizer.pad_token_id or 0
    losses, feats = [], []
    for i in tqdm(range(0, len(examples), batch_size), desc="latent fusion: reference pass", unit="batch",
                  disable=not progress):
        ids, starts, lengths = _batch(examples, range(i, min(i + batch_size, len(examples))), pad, group.device)
        hidden = group(ids)
        losses.append(torch.stack([_answer_losses(group, hidden[e], ids, starts, lengths,
                                                  torch.full((len(ids),), e, device=ids.device))
                                   for e in range(len(group.names))], 1).cpu())
        feats.append(prompt_features(group, ids, starts).float().cpu())
    out = {"losses": torch.cat(losses).contiguous(), "features": torch.cat(feats).contiguous()}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path), metadata={"key": key})
    return out["losses"], out["features"]


def _fused_forward(model: LatentFusion, group: ExpertGroup, ids, primaries: torch.Tensor, peers: torch.Tensor,
                   gates: torch.Tensor) -> torch.Tensor:
    """The primaries' final states ``[B, T, d]``, each fused with its own peers ``peers [B, K-1]``
    (gates ``[B, K-1]``). One group call per primary in the batch, running that primary and
    the peers its rows use: every row runs the trunk once and only the experts it needs
    (K of E once the router has settled). Autograd records nothing before the first
    boundary; after it, ``ExpertGroup.forward`` re-stacks the states, so the peers' later
    layers are recorded too and backward runs through them (gradient that ends nowhere)."""
    parts, where = [], []
    for p in primaries.unique().tolist():
        sel = (primaries == p).nonzero().squeeze(1)
        parts.append(_fused_primary(model, group, ids[sel], p, peers[sel], gates[sel]))
        where.append(sel)
    return torch.cat(parts)[torch.cat(where).argsort()]                # back in batch order


def _fused_primary(model: LatentFusion, group: ExpertGroup, ids, primary: int, peers: torch.Tensor,
                   gates: torch.Tensor) -> torch.Tensor:
    """``ids [n, T]`` that share ``primary``; row ``b``'s peers ``peers[b]``. -> ``[n, T, d]``."""
    used = sorted(set(peers.flatten().tolist()) - {primary})
    active = [primary, *used]
    slot = {e: i for i, e in enumerate(active)}

    def fuse(stage: int, h: torch.Tensor) -> torch.Tensor:   # h: [len(active), n, T, d]
        proj = torch.empty(len(ids), peers.shape[1], ids.shape[1], model.config.shared_width, device=ids.device,
                           dtype=model.wq[0].weight.dtype)
        for j in range(peers.shape[1]):
            for e in peers[:, j].unique().tolist():
                sel = (peers[:, j] == e).nonzero().squeeze(1)
                proj[sel, j] = model.project(stage, e, h[slot[e], sel])
        add, _ = model.attend(stage, primary, h[0], proj, gates)
        return torch.cat([(h[0] + add.to(h.dtype))[None], h[1:]])

    return group(ids, active=active, boundaries=model.boundaries, fuse=fuse)[0]


def _router_terms(logits: torch.Tensor, target: torch.Tensor):
    probs = logits.softmax(-1)
    E = logits.shape[1]
    frac = F.one_hot(logits.argmax(-1), E).float().mean(0)
    balance = E * (frac * probs.mean(0)).sum()
    entropy = -(probs * probs.clamp_min(1e-9).log()).sum(-1).mean()
    return F.cross_entropy(logits, target), balance, entropy


def _choose_peers(logits: torch.Tensor, primaries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's top (k-1) experts other than each row's primary, and their gates: router
    probabilities renormalised over the active experts (primary included, so that with
    one peer the gate still varies and the fusion loss reaches the router)."""
    masked = logits.clone()
    masked[torch.arange(len(logits)), primaries] = float("-inf")
    peers = masked.topk(k - 1, dim=-1).indices
    gates = logits.gather(1, torch.cat([primaries[:, None], peers], 1)).softmax(-1)[:, 1:]
    return peers, gates


def _train_step(model, group, opt, batch, features, primaries, k, config) -> tuple[float, float, float]:
    """One AdamW step on a batch ``(ids, starts, lengths)``; returns (loss, answer loss, router CE)."""
    ids, starts, lengths = batch
    logits = model.router(features)
    peers, gates = _choose_peers(logits, primaries, k)
    hidden = _fused_forward(model, group, ids, primaries, peers, gates)
    lm = _answer_losses(group, hidden, ids, starts, lengths, primaries).mean()
    ce, balance, entropy = _router_terms(logits, primaries)
    loss = lm + config.router_weight * ce + config.balance_weight * balance + config.entropy_weight * entropy
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach()), float(lm.detach()), float(ce.detach())


def train_latent_fusion(group: ExpertGroup, examples: Sequence[tuple[list[int], int]], out_dir: str | Path, *,
                        config: LatentFusionConfig = LatentFusionConfig(), progress: bool = True,
                        resume: bool = True) -> LatentFusion:
    """Train the router and interaction layers on ``examples`` (token ids, answer start); see module doc.

    Writes ``out_dir/{reference.safetensors,checkpoint/,model/,train_report.json}``; with
    ``resume`` a checkpoint made with the same settings and examples is continued (from
    the step it was written at), anything else starts over.
    """
    from tqdm.auto import tqdm

    if len(group.names) < 2 or config.top_k < 2:
        raise GroupError("latent fusion trains a group of at least two experts with top_k >= 2")
    examples = [(list(ids), int(start)) for ids, start in examples if 0 < start < len(ids)]
    if len(examples) < 2:
        raise ValueError("training needs at least two examples with an answer after the prompt")
    out_dir = Path(out_dir)
    started = time.time()
    torch.manual_seed(config.seed)
    losses, features = _reference_pass(group, examples, out_dir, config.batch_size, progress)
    reference_s = time.time() - started
    target = losses.argmin(1)
    order = list(range(len(examples)))
    random.Random(config.seed).shuffle(order)
    n_held = max(1, round(len(examples) * config.heldout_share))
    held, fit = order[:n_held], order[n_held:] or order[:1]
    model, opt, state = _start(group, config, out_dir / "checkpoint", _examples_hash(examples), resume)
    pad, k = group.tokenizer.pad_token_id or 0, min(config.top_k, len(group.names))
    by_len = sorted(fit, key=lambda i: len(examples[i][0]))
    batches = [by_len[i:i + config.batch_size] for i in range(0, len(by_len), config.batch_size)]
    with tqdm(total=config.epochs * len(batches), initial=state["epoch"] * len(batches) + state["step"],
              desc="latent fusion: training", unit="step", disable=not progress) as bar:
        for epoch in range(state["epoch"], config.epochs):
            shuffled = list(batches)
            random.Random(config.seed * 1000 + epoch).shuffle(shuffled)  # the same order when resumed
            model.train()
            for step in range(state["step"], len(shuffled)):
                idx = shuffled[step]
                loss, lm, ce = _train_step(model, group, opt, _batch(examples, idx, pad, group.device),
                                           features[idx].to(group.device), target[idx].to(group.device), k, config)
                state.update(step=step + 1, total=state["total"] + loss * len(idx), n=state["n"] + len(idx))
                bar.set_postfix_str(f"lm {lm:.3f} router {ce:.3f}")
                bar.update()
                if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and step + 1 < len(shuffled):
                    _save_checkpoint(out_dir / "checkpoint", model, opt, state)
            state["losses"].append(round(state["total"] / max(state["n"], 1), 4))
            state.update(epoch=epoch + 1, step=0, total=0.0, n=0)
            _save_checkpoint(out_dir / "checkpoint", model, opt, state)
    model.eval().requires_grad_(False)
    model.save(out_dir / "model")
    report = _report(model, group, examples, held, losses, features, target, k, state)
    report.update(examples=len(examples), heldout_examples=len(held), steps_per_epoch=len(batches),
                  seconds=round(time.time() - started, 1), seconds_reference_pass=round(reference_s, 1))
    (out_dir / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return model


def _start(group, config, ckpt: Path, examples_hash: str, resume: bool):
    """A fresh module and optimizer, or the checkpoint's when it was made with the same
    settings and examples. Returns (model, optimizer, progress state)."""
    key = {"config": asdict(config), "examples": examples_hash}
    model = LatentFusion.for_group(group, config)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    state = _load_checkpoint(ckpt, model, opt) if resume else None
    if state is not None and state.get("key") == key:
        log.info("latent fusion: resuming from %s (epoch %d, step %d)", ckpt, state["epoch"], state["step"])
        return model, opt, state
    if state is not None:
        log.info("checkpoint in %s was made with other settings or examples; starting over", ckpt)
        model = LatentFusion.for_group(group, config)
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return model, opt, {"key": key, "epoch": 0, "step": 0, "total": 0.0, "n": 0, "losses": []}


@torch.no_grad()
def _report(model, group, examples, held, losses, features, target, k, state) -> dict:
    """Held-out: router accuracy against the lowest-loss expert, and the answer loss of
    the router's primary alone vs fused with its peers."""
    pad = group.tokenizer.pad_token_id or 0
    alone, fused, right = [], [], []
    for i in range(0, len(held), model.config.batch_size):
        idx = held[i:i + model.config.batch_size]
        ids, starts, lengths = _batch(examples, idx, pad, group.device)
        logits = model.router(features[idx].to(group.device))
        primaries = logits.argmax(-1)
        peers, gates = _choose_peers(logits, primaries, k)
        hidden = _fused_forward(model, group, ids, primaries, peers, gates)
        fused += _answer_losses(group, hidden, ids, starts, lengths, primaries).tolist()
        alone += losses[idx, primaries.cpu()].tolist()
        right += (primaries.cpu() == target[idx]).float().tolist()
    majority = int(torch.bincount(target, minlength=len(group.names)).argmax())
    return {"epoch_losses": state["losses"], "boundaries": model.boundaries,
            "heldout_router_accuracy": round(sum(right) / len(right), 4),
            "heldout_majority_accuracy": round(float((target[held] == majority).float().mean()), 4),
            "heldout_answer_loss": {"primary_alone": round(sum(alone) / len(alone), 4),
                                    "primary_fused": round(sum(fused) / len(fused), 4),
                                    "lowest_loss_expert": round(float(losses[held].min(1).values.mean()), 4)},
            "best_expert_share": {n: round(float((target == e).float().mean()), 4) for e, n in enumerate(group.names)}}
