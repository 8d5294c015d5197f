"""Routers and everything to train and evaluate them; pure ML (no web, no Redis).

``ROUTERS`` names every router class: ``ROUTERS["classifier"](featurizer="tfidf")``.
"""

from router_models.base import Router, load_router
from router_models.classifier import ClassifierRouter
from router_models.graph import GraphRouter
from router_models.knn import KNNRouter
from router_models.symbolic import SymbolicRouter

ROUTERS: dict[str, type[Router]] = {
    KNNRouter.name: KNNRouter,
    ClassifierRouter.name: ClassifierRouter,
    GraphRouter.name: GraphRouter,
    SymbolicRouter.name: SymbolicRouter,
}

__all__ = ["ROUTERS", "Router", "load_router", "ClassifierRouter", "KNNRouter", "SymbolicRouter"]
