"""Logit addition's router (after FusionRoute): which expert speaks this token, and a correction.

At every decoding step the router reads the group's final hidden states at the current
position, ``h [E, d]`` (one row per expert: what each would say next, in its own words),
and returns

- choice logits ``[E]``: the expert whose logits to use (argmax);
- a complementary vector ``delta [d]`` whose logits are ``delta @ W.T``, ``W`` being the
  group's (frozen) output projection, so ``z = z_chosen + delta @ W.T``. Expressing the
  correction in hidden space keeps the head light (no ``d x V`` matrix: ~0.7 M
  parameters for four 576-wide experts) and its logits in the experts' own geometry.

The head is ``concat(h) -> Linear(E*d, width) -> GELU`` then two linear outputs; the
``delta`` output starts at zero, so an untrained router adds nothing.

Training (``train_logit_router``), after FusionRoute's recipe of supervising the router
where the experts disagree, on sequences with reference answers (teacher forcing):

1. *Features* (no gradients, cached, resumable): for every answer position, the experts'
   hidden states (fp16), the reference next token, and each expert's log-probability of
   it. The best expert at a position is the one giving the reference token the highest
   probability; a position is a *disagreement* when the experts' log-probabilities of
   it spread by more than ``margin`` nats.
2. *Fitting*: cross-entropy of the choice logits against the best expert on disagreement
   positions, plus cross-entropy of ``softmax(z_best + delta @ W.T)`` against the
   reference token on every position (the correction is learnt on top of the right
   expert, as it will be used). AdamW; a checkpoint after each epoch (weights and
   optimizer moments in safetensors) from which ``resume`` continues.
3. *Calibration*: the share of the correction to apply (``delta_scale`` in 0..1) is the
   one with the lowest reference-token loss on held-out examples; on the fleet the full
   correction fitted the training answers but not held-out ones.

The contrastive variant (after SCMoE) needs no training of its own: with
``contrastive_beta`` set, ``route`` also names the lowest-scored expert as the weak one,
and decoding uses ``z_strong - beta * z_weak``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from router_models.collab.decode import Route
from router_models.collab.group import ExpertGroup, GroupError, tokenizer_fingerprint

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
KIND = "logit-addition-router"
DELTA_SCALES = (0.0, 0.25, 0.5, 0.75, 1.0)


class RouterFileError(ValueError):
    """A router folder that is missing, unreadable, or made for another group."""


@dataclass(frozen=True)
class LogitTrainConfig:
    width: int = 256
    epochs: int = 4
    lr: float = 2e-3
    weight_decay: float = 0.01
    batch_positions: int = 256
    choice_weight: float = 1.0
    margin: float = 0.5            # nats of spread in the experts' log-prob of the reference token
    heldout_share: float = 0.1     # examples (not positions) kept out of fitting, for the report
    seed: int = 0
    feature_batch: int = 8         # sequences per teacher-forced forward
    chunk_examples: int = 64       # examples per cached feature file

    @classmethod
    def quick(cls) -> LogitTrainConfig:
        """CI settings: seconds, not a useful router."""
        return cls(width=64, epochs=2, chunk_examples=8, feature_batch=4)


class LogitRouter(torch.nn.Module):
    """Per-token expert choice plus complementary logits for one group (see module doc)."""

    def __init__(self, names: Sequence[str], hidden_size: int, width: int = 256, fingerprint: str = ""):
        super().__init__()
        self.names = list(names)
        self.hidden_size = hidden_size
        self.width = width
        self.fingerprint = fingerprint
        self.contrastive_beta: float | None = None
        self.delta_scale = 1.0  # chosen on held-out examples at the end of training
        E = len(self.names)
        self.body = torch.nn.Sequential(torch.nn.Linear(E * hidden_size, width), torch.nn.GELU())
        self.choice = torch.nn.Linear(width, E)
        self.delta = torch.nn.Linear(width, hidden_size)
        torch.nn.init.zeros_(self.delta.weight)
        torch.nn.init.zeros_(self.delta.bias)

    @classmethod
    def for_group(cls, group: ExpertGroup, width: int = 256) -> LogitRouter:
        return cls(group.names, group.hidden_size, width, tokenizer_fingerprint(group.tokenizer))

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``hidden [E, N, d]`` -> choice logits ``[N, E]``, delta ``[N, d]``."""
        x = hidden.permute(1, 0, 2).reshape(hidden.shape[1], -1).to(self.choice.weight.dtype)
        z = self.body(x)
        return self.choice(z), self.delta(z)

    def route(self, hidden: torch.Tensor, group: ExpertGroup) -> Route:
        choice_logits, delta = self(hidden)
        delta = delta * self.delta_scale
        choice = choice_logits.argmax(dim=-1)
        W = group.head_weight(0) if group.shared_head else None
        if W is None:  # experts with their own output heads: the chosen expert's head
            bias = torch.stack([delta[i] @ group.head_weight(int(c)).t() for i, c in enumerate(choice)])
        else:
            bias = delta.to(W.dtype) @ W.t()
        if self.contrastive_beta is None:
            return Route(choice, bias)
        return Route(choice, bias, weak=choice_logits.argmin(dim=-1), beta=float(self.contrastive_beta))

    # -- files -------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        return save_module(self, directory, {
            "kind": KIND, "experts": self.names, "hidden_size": self.hidden_size, "width": self.width,
            "tokenizer_fingerprint": self.fingerprint, "delta_scale": self.delta_scale})

    @classmethod
    def load(cls, directory: str | Path, group: ExpertGroup | None = None) -> LogitRouter:
        directory = Path(directory)
        config, state = read_module(directory, KIND, "logit-addition router")
        try:
            router = cls(config["experts"], config["hidden_size"], config["width"], config["tokenizer_fingerprint"])
            router.delta_scale = float(config.get("delta_scale", 1.0))
        except (TypeError, KeyError, ValueError) as exc:
            raise RouterFileError(f"{directory}: config.json is inconsistent: {exc}") from None
        if group is not None:
            check_group(router.names, router.fingerprint, group, directory)
        return fill_module(router, state, directory)


def save_module(module: torch.nn.Module, directory: str | Path, config: dict) -> Path:
    """Write a collaboration head as ``model.safetensors`` (its weights) and ``config.json``
    (``config`` with this file format's version): no pickle on either side."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()},
              str(directory / "model.safetensors"))
    config = {"format_version": FORMAT_VERSION} | config
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


def read_module(directory: Path, kind: str, what: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config, weights)`` of a folder written by :func:`save_module` for a head of ``kind``;
    :class:`RouterFileError` naming ``what`` was expected when it is missing, unreadable, or
    another kind or format version."""
    from safetensors.torch import load_file

    try:
        config = json.loads((directory / "config.json").read_text())
        state = load_file(str(directory / "model.safetensors"))
    except FileNotFoundError as exc:
        raise RouterFileError(f"{directory} is not a saved {what} ({exc.filename} missing)") from None
    except Exception as exc:  # noqa: BLE001 - OSError, bad JSON, or safetensors' own error type
        raise RouterFileError(f"{directory}: unreadable {what} files: {exc}") from None
    if not isinstance(config, dict) or config.get("kind") != kind or config.get("format_version") != FORMAT_VERSION:
        got = config if isinstance(config, dict) else {}
        raise RouterFileError(f"{directory} holds {got.get('kind')!r} format {got.get('format_version')}, "
                              f"not a {what} v{FORMAT_VERSION}")
    return config, state


def fill_module(module: torch.nn.Module, state: dict[str, torch.Tensor], directory: Path):
    """``module`` with the weights ``state`` read from ``directory``, frozen for inference."""
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise RouterFileError(f"{directory}: weights do not match config.json: {exc}") from None
    return module.eval().requires_grad_(False)


def check_group(names: list[str], fingerprint: str, group: ExpertGroup, where) -> None:
    """A head trained for one group must be used with that group: same experts, same order, same tokenizer."""
    if names != group.names:
        raise RouterFileError(f"{where} was trained for experts {names}, but the group has {group.names}")
    if fingerprint and fingerprint != tokenizer_fingerprint(group.tokenizer):
        raise RouterFileError(f"{where} was trained with another tokenizer than the group's")


# -- training ----------------------------------------------------------------------------------
def _examples_hash(examples: Sequence[tuple[list[int], int]]) -> str:
    h = hashlib.sha256()
    for ids, start in examples:
        h.update(json.dumps([ids, start]).encode())
    return h.hexdigest()[:16]


def _collate(batch: Sequence[tuple[list[int], int]], pad: int) -> torch.Tensor:
    width = max(len(ids) for ids, _ in batch)
    out = torch.full((len(batch), width), pad, dtype=torch.long)
    for row, (ids, _) in enumerate(batch):
        out[row, :len(ids)] = torch.tensor(ids)
    return out


@torch.inference_mode()
def _features(group: ExpertGroup, examples, first_index: int, batch_size: int) -> dict[str, torch.Tensor]:
    """Hidden states, reference token and per-expert log-prob of it at every answer position."""
    pad = group.tokenizer.pad_token_id or 0
    hs, targets, logps, owners = [], [], [], []
    for i in range(0, len(examples), batch_size):
        batch = examples[i:i + batch_size]
        ids = _collate(batch, pad).to(group.device)
        hidden = group(ids)                                            # [E, B, T, d]
        for row, (seq, start) in enumerate(batch):
            pos = torch.arange(max(start - 1, 0), len(seq) - 1, device=group.device)
            h = hidden[:, row, pos]                                     # [E, n, d]
            target = ids[row, pos + 1]
            logits = group.logits(h).float()                            # [E, n, V]
            lp = logits.log_softmax(-1).gather(-1, target[None, :, None].expand(len(h), -1, 1)).squeeze(-1)
            hs.append(h.permute(1, 0, 2).to(torch.float16).cpu())
            targets.append(target.cpu())
            logps.append(lp.t().cpu())
            owners.append(torch.full((len(pos),), first_index + i + row, dtype=torch.long))
    return {"hidden": torch.cat(hs), "target": torch.cat(targets), "logp": torch.cat(logps),
            "example": torch.cat(owners)}


def _extract(group: ExpertGroup, examples, out_dir: Path, config: LogitTrainConfig, progress: bool) -> dict:
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    feat_dir = out_dir / "features"
    want = {"experts": group.names, "tokenizer_fingerprint": tokenizer_fingerprint(group.tokenizer),
            "examples": _examples_hash(examples), "n_examples": len(examples), "chunk": config.chunk_examples}
    manifest_path = feat_dir / "manifest.json"
    if feat_dir.exists():
        try:
            have = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            have = None
        if have != want:
            log.info("cached features in %s are for other experts or examples; extracting again", feat_dir)
            for f in feat_dir.glob("*"):
                f.unlink()
    feat_dir.mkdir(parents=True, exist_ok=True)
    manifest_path.write_text(json.dumps(want) + "\n")
    starts = list(range(0, len(examples), config.chunk_examples))
    parts = []
    with tqdm(total=len(examples), desc="logit router: features", unit="seq", disable=not progress) as bar:
        for c, s in enumerate(starts):
            path = feat_dir / f"chunk-{c:05d}.safetensors"
            chunk = examples[s:s + config.chunk_examples]
            if path.exists():
                try:
                    parts.append(load_file(str(path)))
                    bar.update(len(chunk))
                    continue
                except Exception:  # noqa: BLE001 - safetensors' own error type
                    path.unlink()  # a chunk cut short by an interruption: redo it
            feats = _features(group, chunk, s, config.feature_batch)
            tmp = path.with_suffix(".tmp")
            save_file(feats, str(tmp))
            tmp.replace(path)
            parts.append(feats)
            bar.update(len(chunk))
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _labels(feats: dict, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    logp = feats["logp"].float()
    best = logp.argmax(dim=-1)
    disagree = (logp.max(dim=-1).values - logp.min(dim=-1).values) > margin
    return best, disagree


def _save_checkpoint(path: Path, router: LogitRouter, opt: torch.optim.Optimizer, state: dict) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in router.state_dict().items()}
    for i, p in enumerate(router.parameters()):
        st = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key in st:
                tensors[f"optim.{i}.{key}"] = torch.as_tensor(st[key]).detach().float().contiguous()
    save_file(tensors, str(path / "state.safetensors.tmp"))
    (path / "state.safetensors.tmp").replace(path / "state.safetensors")
    (path / "progress.json").write_text(json.dumps(state) + "\n")


def _load_checkpoint(path: Path, router: LogitRouter, opt: torch.optim.Optimizer) -> dict | None:
    from safetensors.torch import load_file

    try:
        state = json.loads((path / "progress.json").read_text())
        tensors = load_file(str(path / "state.safetensors"))
    except Exception:  # noqa: BLE001 - none, or cut short: start over
        return None
    router.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    for i, p in enumerate(router.parameters()):
        if f"optim.{i}.exp_avg" in tensors:
            opt.state[p] = {"step": tensors[f"optim.{i}.step"].reshape(()),
                            "exp_avg": tensors[f"optim.{i}.exp_avg"].to(p.dtype),
                            "exp_avg_sq": tensors[f"optim.{i}.exp_avg_sq"].to(p.dtype)}
    return state


def _head_logits(group: ExpertGroup, hidden: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """``hidden [N, d]`` through each row's expert's output head -> ``[N, V]``."""
    if group.shared_head:
        return hidden @ group.head_weight(0).t().to(hidden.dtype)
    out = torch.empty(len(hidden), group.vocab_size, dtype=hidden.dtype, device=hidden.device)
    for e in experts.unique().tolist():
        rows = experts == e
        out[rows] = hidden[rows] @ group.head_weight(e).t().to(hidden.dtype)
    return out


def _losses(router: LogitRouter, group: ExpertGroup, h: torch.Tensor, target, best, disagree, weight):
    """Choice CE on disagreement rows, fused-token CE on all; ``h [N, E, d]`` float."""
    import torch.nn.functional as F

    choice_logits, delta = router(h.permute(1, 0, 2))
    chosen = h[torch.arange(len(h)), best]
    if group.shared_head:  # (h_best + delta) @ W.T == z_best + delta @ W.T
        fused = _head_logits(group, chosen + delta, best)
    else:
        fused = _head_logits(group, chosen, best) + _head_logits(group, delta, best)
    token = F.cross_entropy(fused.float(), target)
    choice = F.cross_entropy(choice_logits[disagree], best[disagree]) if disagree.any() else fused.sum() * 0
    return token + weight * choice, token, choice, choice_logits


def train_logit_router(group: ExpertGroup, examples: Sequence[tuple[list[int], int]], out_dir: str | Path, *,
                       config: LogitTrainConfig = LogitTrainConfig(), progress: bool = True,
                       resume: bool = True) -> LogitRouter:
    """Train the group's logit-addition router on ``examples`` (token ids, answer start); see module doc.

    Writes ``out_dir/{features,checkpoint,router}`` and ``out_dir/train_report.json``.
    """
    from tqdm.auto import tqdm

    if len(group.names) < 2:
        raise GroupError("logit addition needs a group of at least two experts")
    examples = [(list(ids), int(start)) for ids, start in examples if 0 < start < len(ids)]
    if len(examples) < 2:
        raise ValueError("training needs at least two examples with an answer after the prompt")
    out_dir = Path(out_dir)
    started = time.time()
    torch.manual_seed(config.seed)
    feats = _extract(group, examples, out_dir, config, progress)
    best, disagree = _labels(feats, config.margin)
    order = list(range(len(examples)))
    random.Random(config.seed).shuffle(order)
    n_held = max(1, round(len(examples) * config.heldout_share))
    held = torch.zeros(len(examples), dtype=torch.bool)
    held[order[:n_held]] = True
    fit_rows = (~held[feats["example"]]).nonzero().squeeze(1)
    held_rows = held[feats["example"]].nonzero().squeeze(1)

    router = LogitRouter.for_group(group, config.width)
    opt = torch.optim.AdamW(router.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    ckpt = out_dir / "checkpoint"
    state = _load_checkpoint(ckpt, router, opt) if resume else None
    if state is not None and state.get("config") != asdict(config):
        log.info("checkpoint in %s was made with other settings; starting over", ckpt)
        router = LogitRouter.for_group(group, config.width)
        opt = torch.optim.AdamW(router.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        state = None
    state = state or {"epoch": 0, "losses": [], "config": asdict(config)}
    hidden = feats["hidden"]
    steps_per_epoch = max(1, -(-len(fit_rows) // config.batch_positions))
    with tqdm(total=config.epochs * steps_per_epoch, initial=state["epoch"] * steps_per_epoch,
              desc="logit router: training", unit="step", disable=not progress) as bar:
        for epoch in range(state["epoch"], config.epochs):
            gen = torch.Generator().manual_seed(config.seed * 1000 + epoch)
            perm = fit_rows[torch.randperm(len(fit_rows), generator=gen)]
            router.train()
            total, n = 0.0, 0
            for i in range(0, len(perm), config.batch_positions):
                rows = perm[i:i + config.batch_positions]
                loss, _, _, _ = _losses(router, group, hidden[rows].float(), feats["target"][rows], best[rows],
                                        disagree[rows], config.choice_weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, n = total + float(loss.detach()) * len(rows), n + len(rows)
                bar.set_postfix_str(f"loss {float(loss.detach()):.3f}")
                bar.update()
            state["losses"].append(round(total / max(n, 1), 4))
            state["epoch"] = epoch + 1
            _save_checkpoint(ckpt, router, opt, state)
    router.eval().requires_grad_(False)
    report = _report(router, group, feats, best, disagree, fit_rows, held_rows, state, len(examples), n_held)
    router.delta_scale = report["delta_scale"]
    router.save(out_dir / "router")
    report["seconds"] = round(time.time() - started, 1)
    (out_dir / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return router


@torch.no_grad()
def _report(router, group, feats, best, disagree, fit_rows, held_rows, state, n_examples, n_held) -> dict:
    """Held-out (by example) choice accuracy against the always-the-most-frequent-expert
    baseline, and the reference tokens' NLL under four ways of decoding."""
    import torch.nn.functional as F

    rows = held_rows if len(held_rows) else fit_rows
    h, target = feats["hidden"][rows].float(), feats["target"][rows]
    choice_logits, delta = router(h.permute(1, 0, 2))
    pick = choice_logits.argmax(-1)
    d = disagree[rows]
    majority = int(torch.bincount(best[fit_rows][disagree[fit_rows]], minlength=len(group.names)).argmax()) \
        if disagree[fit_rows].any() else 0
    idx = torch.arange(len(h))

    def nll(hidden, experts, add=None):
        z = _head_logits(group, hidden, experts)
        if add is not None:
            z = z + _head_logits(group, add, experts)
        return round(float(F.cross_entropy(z.float(), target)), 4)

    fixed = {name: nll(h[:, e], torch.full_like(pick, e)) for e, name in enumerate(group.names)}
    # How much of the correction to apply: the scale with the lowest held-out loss (the
    # correction can overfit the training answers; 0 = per-token routing alone).
    by_scale = {scale: nll(h[idx, pick], pick, delta * scale) for scale in DELTA_SCALES}
    scale = min(by_scale, key=lambda k: (by_scale[k], -k))
    return {
        "examples": n_examples, "heldout_examples": n_held, "positions": len(feats["target"]),
        "disagreement_share": round(float(disagree.float().mean()), 4),
        "best_expert_share": {name: round(float((best == e).float().mean()), 4) for e, name in enumerate(group.names)},
        "epoch_losses": state["losses"],
        "heldout_choice_accuracy": round(float((pick[d] == best[rows][d]).float().mean()), 4) if d.any() else None,
        "heldout_majority_accuracy": round(float((best[rows][d] == majority).float().mean()), 4) if d.any() else None,
        "delta_scale": scale, "heldout_nll_by_delta_scale": {str(k): v for k, v in by_scale.items()},
        "heldout_nll": {"router_choice_plus_delta": by_scale[scale],
                        "router_choice": nll(h[idx, pick], pick),
                        "best_fixed_expert": min(fixed.values()), "per_expert": fixed},
    }


