"""The demo's default router: a classifier trained on the fleet's own evaluation logs.

`switchyard fleet eval` ends by training it (TF-IDF classifier: seconds, ~1 ms per
decision) into ``DATA_DIR/fleet/router`` from the rows it wrote; `serve --demo` deploys
it as ``router:fleet`` and, when no other router is the default, as ``auto``. The logs'
model names are the experts' registered names, so the mapping is the identity.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

NAME = "fleet"
MIN_PROMPTS = 20  # fewer cannot be cross-validated into anything but noise


def router_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "fleet" / "router"


def train_fleet_router(rows: Path, out_dir: Path, seed: int = 0):
    """Fit the classifier router on the rows of ``rows`` (row-schema JSONL); save it."""
    from router_models import ROUTERS
    from router_models.logs import load_logs

    logs = load_logs(rows, format="rows-jsonl")
    if len(logs.experts) < 2 or logs.n_prompts < MIN_PROMPTS:
        raise ValueError(f"{rows}: a router needs at least {MIN_PROMPTS} prompts answered by at least two "
                         f"experts; found {logs.n_prompts} prompts, experts {logs.experts}")
    router = ROUTERS["classifier"](featurizer="tfidf", seed=seed).fit(logs)
    router.save(out_dir)
    log.info("trained router %s on %d prompts x %d experts", out_dir, logs.n_prompts, len(logs.experts))
    return router


def deploy_fleet_router(store, data_dir: Path, registered: set[str]) -> str | None:
    """Deploy the trained fleet router, if there is one; returns what was deployed.

    Default (``auto``) only when no other deployment is the default, so a user's own
    choice is never overridden. Experts the router knows but the registry lacks are left
    out of the mapping (the gateway then routes among the rest).
    """
    import json

    from router_gateway.deployments import DeploymentStore, RouterDeployment

    folder = router_dir(data_dir)
    try:
        experts = json.loads((folder / "router.json").read_text())["experts"]
    except (OSError, ValueError, KeyError):
        return None
    deployments = DeploymentStore(store)
    others_default = any(d.default for d in deployments.list() if d.name != NAME)
    mapping = {e: e for e in experts if e in registered}
    if len(mapping) < 2:
        return None
    deployments.put(RouterDeployment(name=NAME, router_dir=str(folder), expert_map=mapping,
                                     default=not others_default))
    return f"router:{NAME}" + ("" if others_default else " (also 'auto')")
