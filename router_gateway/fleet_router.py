"""The demo's default router: a classifier trained on the fleet's own evaluation logs.

`switchyard fleet eval` ends by training it (TF-IDF classifier: seconds, ~1 ms per
decision) into ``DATA_DIR/fleet/router`` from the rows it wrote; `serve --demo` deploys
it as ``router:fleet`` and, when no other router is the default, as ``auto``. The logs'
model names are the experts' registered names, so the mapping is the identity.

Until the user has run an evaluation of their own, `serve --demo` trains it from
``fleet_logs.jsonl.gz``: the 520 rows measured on the default fleet for
benchmarks/README.md ("Fleet", ``results/fleet_eval-20261123T213551Z.jsonl``) without
the response texts. The build is seeded, so those are the logs of the same experts; a
first run routes among the fleet at once instead of after a 20-minute evaluation.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

NAME = "fleet"
SHIPPED_LOGS = Path(__file__).with_name("fleet_logs.jsonl.gz")
ORIGIN_FILE = "trained_on.txt"  # the rows file a router was fitted on
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
    (Path(out_dir) / ORIGIN_FILE).write_text(str(rows) + "\n")
    log.info("trained router %s on %d prompts x %d experts", out_dir, logs.n_prompts, len(logs.experts))
    return router


def ensure_fleet_router(data_dir: Path) -> str:
    """Make sure a fleet router exists; say what it was trained on: ``"own"`` (this
    machine's evaluation rows) or ``"shipped"`` (trained now or earlier from the shipped
    logs, because there was no router)."""
    import gzip
    import shutil

    out = router_dir(data_dir)
    rows = Path(data_dir) / "fleet" / "shipped_logs.jsonl"
    if not (out / "router.json").exists():
        rows.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(SHIPPED_LOGS, "rb") as src, rows.open("wb") as dst:
            shutil.copyfileobj(src, dst)
        train_fleet_router(rows, out)
    origin = out / ORIGIN_FILE
    return "shipped" if origin.exists() and origin.read_text().strip() == str(rows) else "own"


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
