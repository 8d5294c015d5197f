"""The fleet's collaboration groups: train their heads, write their group files, describe them as experts.

``switchyard collab train logit|latent`` (``router_gateway/cli_collab.py``) lands here.
A group is the whole fleet (the generalist and every domain expert, merged models) plus
one trained head; layout under ``DATA_DIR/collab/fleet[-quick]/``::

    logit/            train_logit_router's out_dir: features/, checkpoint/, router/, train_report.json
    latent/           train_latent_fusion's out_dir: ..., model/, train_report.json
    fleet-logit.json  the group file the collaboration worker serves (``collab_worker.GroupFile``)
    fleet-latent.json

Training data: each domain's *train* split (the experts' own material, never a
held-out problem), drawn with a seed other than the experts' fine-tunes' so the heads
also see examples the experts did not memorise.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from expert_registry.collab_worker import GroupFile
from expert_registry.fleet import domains
from expert_registry.fleet.build import fleet_expert_specs
from expert_registry.local_models import BASE_NAME, MAX_MODEL_LEN
from expert_registry.spec import ExpertSpec, LaunchSpec

log = logging.getLogger(__name__)

MODES = ("logit", "latent")
HEAD_SUBDIR = {"logit": "router", "latent": "model"}
DATA_SEED = 1  # the experts were fine-tuned on seed 0's draw of the train split
PER_DOMAIN = 200
QUICK_PER_DOMAIN = 8
MAX_LEN = 160


def collab_dir(data_dir: Path, quick: bool = False) -> Path:
    return Path(data_dir) / "collab" / ("fleet-quick" if quick else "fleet")


def group_name(mode: str, quick: bool = False) -> str:
    return f"fleet-quick-{mode}" if quick else f"fleet-{mode}"


def group_file(data_dir: Path, mode: str, quick: bool = False) -> Path:
    return collab_dir(data_dir, quick) / f"{group_name(mode, quick)}.json"


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")


def fleet_members(data_dir: Path, *, quick: bool = False, progress: bool = True) -> dict[str, str]:
    """``{name: HF folder}`` of the fleet as full models (built and merged when missing), generalist first."""
    specs = fleet_expert_specs(data_dir, quick=quick, progress=progress, serving="merged")
    members = {s.name: s.launch.model_path for s in specs if s.launch is not None}
    return {BASE_NAME: members.pop(BASE_NAME), **members}


def training_examples(tokenizer, per_domain: int, seed: int = DATA_SEED) -> list[tuple[list[int], int]]:
    """Chat-formatted (ids, answer start) of ``per_domain`` train-split tasks per domain, interleaved."""
    from expert_registry.fleet.train import encode_examples

    per = [encode_examples(tokenizer, [(t.prompt, t.target) for t in domains.tasks(d, "train", per_domain, seed=seed)],
                           MAX_LEN) for d in domains.DOMAINS]
    return [ex for row in zip(*per) for ex in row]


def train_group(data_dir: Path, mode: str, *, quick: bool = False, per_domain: int | None = None,
                fresh: bool = False, progress: bool = True, contrastive_beta: float | None = None) -> dict:
    """Train ``mode``'s head on the fleet (resumable), write the group file; returns the head's report."""
    import shutil

    from router_models.collab.group import ExpertGroup

    _check_mode(mode)
    members = fleet_members(data_dir, quick=quick, progress=progress)
    out = collab_dir(data_dir, quick) / mode
    if fresh and out.exists():
        shutil.rmtree(out)
    group = ExpertGroup.load(members)
    n = per_domain or (QUICK_PER_DOMAIN if quick else PER_DOMAIN)
    examples = training_examples(group.tokenizer, n)
    if mode == "logit":
        from router_models.collab.logit import train_logit_router

        train_logit_router(group, examples, out, config=_config(mode, quick), progress=progress, resume=True)
    else:
        from router_models.collab.latent import train_latent_fusion

        train_latent_fusion(group, examples, out, config=_config(mode, quick), progress=progress, resume=True)
    report = json.loads((out / "train_report.json").read_text())
    params = sum(p.numel() for p in group.parameters())
    GroupFile(name=group_name(mode, quick), mode=mode, experts=members, head=str(out / HEAD_SUBDIR[mode]),
              contrastive_beta=contrastive_beta).write(group_file(data_dir, mode, quick))
    (out / "group_params.json").write_text(json.dumps({"params": params, "trunk_layers": group.trunk_layers,
                                                       "layers": group.n_layers}) + "\n")
    return report


def _config(mode: str, quick: bool):
    if mode == "logit":
        from router_models.collab.logit import LogitTrainConfig as Config
    else:
        from router_models.collab.latent import LatentFusionConfig as Config
    return Config.quick() if quick else Config()


def group_specs(data_dir: Path, *, quick: bool = False) -> list[ExpertSpec]:
    """The trained groups as registry entries (backend ``collab``, started by ``workers up``)."""
    from expert_registry.local_models import INPUT_USD_PER_MTOK_PER_BPARAM, OUTPUT_USD_PER_MTOK_PER_BPARAM

    specs = []
    for mode in MODES:
        path = group_file(data_dir, mode, quick)
        if not path.exists():
            continue
        try:
            params = json.loads((collab_dir(data_dir, quick) / mode / "group_params.json").read_text())["params"]
        except (OSError, ValueError, KeyError):
            params = 0
        name = group_name(mode, quick)
        specs.append(ExpertSpec(
            name=name, backend="collab", served_model=name, tokenizer="smollm2", context_window=MAX_MODEL_LEN,
            # A call runs through every parameter the group holds (shared layers once).
            input_price_per_mtok=round(INPUT_USD_PER_MTOK_PER_BPARAM * params / 1e9, 6),
            output_price_per_mtok=round(OUTPUT_USD_PER_MTOK_PER_BPARAM * params / 1e9, 6),
            tags=["local", "demo", "fleet", "collab", mode], skills=["arithmetic", "code", "extraction"],
            launch=LaunchSpec(engine="collab", model_path=str(path), args=["--max-model-len", str(MAX_MODEL_LEN)])))
    return specs
