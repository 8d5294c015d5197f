"""Routers and everything to train and evaluate them. Pure ML: no HTTP, no Redis."""

# name -> Router class; filled as routers land (classifier, symbolic, gnn, ...).
ROUTERS: dict[str, type] = {}
