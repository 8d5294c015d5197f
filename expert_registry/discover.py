"""Ask an OpenAI-compatible server what it serves, to check an expert's spec as it is
registered (``switchyard experts add``; ``--no-check`` skips it).

``GET {base_url}/models`` lists the server's model ids (a vLLM worker: the model and any
LoRA adapters, each with its ``max_model_len``). :func:`checked_spec` then

- picks ``served_model`` when the user gave none: the server's only model, else the one
  named like the expert; with several and none of that name it refuses, listing them;
- refuses a given ``served_model`` the server does not list (a request naming it would
  get the server's 404 every time);
- fills ``context_window`` from the model's ``max_model_len`` when the user gave none.

A server that cannot be asked (down, not started yet, no ``/models``) is no error: the
spec stays as given and the reason is returned for a warning.
"""

from __future__ import annotations

from typing import Any

import httpx

from expert_registry.spec import ExpertSpec

CHECK_TIMEOUT_S = 3.0


class NotServed(ValueError):
    """The server answers, but not for the model the spec names (the message lists what it serves)."""


def served_models(base_url: str, api_key: str | None = None, timeout_s: float = CHECK_TIMEOUT_S
                  ) -> list[dict[str, Any]] | str:
    """The server's model entries (each with at least ``id``), or why they could not be read."""
    url = base_url.rstrip("/") + "/models"
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = httpx.get(url, headers=headers, timeout=timeout_s)
    except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:   # ValueError: a URL httpx cannot send to
        return f"GET {url} failed: {type(exc).__name__}: {exc}"
    if resp.status_code != 200:
        return f"GET {url} answered HTTP {resp.status_code}"
    try:
        data = resp.json().get("data")
    except (ValueError, AttributeError):
        data = None
    if not isinstance(data, list):
        return f"GET {url} answered something that is not an OpenAI model list"
    return [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]


def checked_spec(spec: ExpertSpec, models: list[dict[str, Any]], served_given: bool, window_given: bool
                 ) -> tuple[ExpertSpec, list[str]]:
    """``spec`` with ``served_model`` chosen or checked against ``models`` and
    ``context_window`` filled in, and a line for the user per change made. Raises
    :class:`NotServed` when the server does not serve the model."""
    ids = [m["id"] for m in models]
    listed = ", ".join(ids[:20]) + (f" and {len(ids) - 20} more" if len(ids) > 20 else "") or "nothing"
    notes = []
    served = spec.served_model
    if not served_given:
        if len(ids) == 1:
            served = ids[0]
        elif spec.name in ids:
            served = spec.name
        else:
            raise NotServed(f"{spec.base_url} serves {listed}; say which with --served-model")
        notes.append(f"served model: {served} (from {spec.base_url}/models)")
    elif served not in ids:
        raise NotServed(f"{spec.base_url} does not serve '{served}'; it serves {listed} "
                        "(--no-check registers it anyway)")
    update: dict[str, Any] = {"served_model": served}
    window = next((m.get("max_model_len") for m in models if m["id"] == served), None)
    if not window_given and type(window) is int and window > 0:
        update["context_window"] = window
        notes.append(f"context window: {window} tokens (the server's max_model_len)")
    return spec.model_copy(update=update), notes
