"""The collaboration worker: one process hosting a group of experts, speaking the OpenAI API.

``python -m expert_registry.collab_worker --group GROUP.json --port P`` loads the group
the file describes and serves ``GET /health``, ``GET /v1/models``,
``POST /v1/chat/completions`` (streamed or not) and the Responses API over the same
decoding (``POST /v1/responses`` and its stored responses; ``collab_responses``), so the
gateway dispatches
``model: "collab:<group>"`` to it as to any vLLM worker (registry backend ``collab``,
started by ``switchyard workers up`` from the expert's ``launch`` block, engine
``collab``). The group file::

    {"name": "fleet-logit",               # the served model id
     "mode": "logit" | "latent" | "single",
     "experts": {"smollm2-135m": "/path/to/hf/folder", ...},
     "head": "/path/to/trained/router-or-model/dir",   # logit / latent
     "contrastive_beta": null,             # logit: z_strong - beta * z_weak when set
     "dtype": "float32"}

Modes: ``single`` decodes with the first expert alone (a one-expert group is how the
worker is checked against the expert's own greedy output); ``logit`` is logit addition
with a trained ``router_models.collab.logit.LogitRouter``; ``latent`` is latent fusion
with a trained ``router_models.collab.latent.LatentFusion``.

One sequence decodes at a time (requests queue on a lock; torch already uses every core
for one sequence on a CPU). A client that disconnects mid-stream stops its decode.
Bad requests get OpenAI-shaped 4xx errors; the worker stays up.
Each response carries which experts produced its tokens: ``x-switchyard-collab-experts``
(``name=count,...``) and the same counts in the body's ``switchyard`` field.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger(__name__)

MODES = ("single", "logit", "latent")


class GroupFileError(ValueError):
    """The group file is missing, unreadable or inconsistent."""


@dataclass(frozen=True)
class GroupFile:
    name: str
    mode: str
    experts: dict[str, str]
    head: str | None = None
    contrastive_beta: float | None = None
    dtype: str = "float32"

    @classmethod
    def read(cls, path: str | Path) -> GroupFile:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise GroupFileError(f"group file {path} does not exist") from None
        except (OSError, ValueError) as exc:
            raise GroupFileError(f"group file {path} is not readable JSON: {exc}") from None
        if not isinstance(data, dict):
            raise GroupFileError(f"group file {path} must hold a JSON object")
        unknown = set(data) - {"name", "mode", "experts", "head", "contrastive_beta", "dtype"}
        if unknown:
            raise GroupFileError(f"group file {path}: unknown keys {sorted(unknown)}")
        mode = data.get("mode", "single")
        if mode not in MODES:
            raise GroupFileError(f"group file {path}: mode must be one of {', '.join(MODES)}, not {mode!r}")
        experts = data.get("experts")
        if not isinstance(experts, dict) or not experts or not all(isinstance(v, str) for v in experts.values()):
            raise GroupFileError(f"group file {path}: 'experts' must map names to model folders")
        if mode != "single" and not data.get("head"):
            raise GroupFileError(f"group file {path}: mode '{mode}' needs 'head' (a trained router or model dir)")
        if not isinstance(data.get("name"), str) or not data["name"]:
            raise GroupFileError(f"group file {path}: 'name' (the served model id) is required")
        if data.get("dtype", "float32") not in ("float32", "bfloat16", "float16"):
            raise GroupFileError(f"group file {path}: dtype must be float32, bfloat16 or float16")
        return cls(name=data["name"], mode=mode, experts=dict(experts), head=data.get("head"),
                   contrastive_beta=data.get("contrastive_beta"), dtype=data.get("dtype", "float32"))

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.__dict__, indent=2) + "\n")
        tmp.replace(path)
        return path


# --- the engine: a loaded group and its decoding mode ------------------------------------
class CollabEngine:
    """A loaded group plus its mode's head; ``stream(messages, params)`` yields decode steps."""

    def __init__(self, spec: GroupFile, device: str = "cpu", max_model_len: int | None = None):
        import torch

        from router_models.collab.group import ExpertGroup

        self.spec = spec
        self.group = ExpertGroup.load(spec.experts, dtype=getattr(torch, spec.dtype), device=device)
        self.head = None
        if spec.mode == "logit":
            from router_models.collab.logit import LogitRouter

            self.head = LogitRouter.load(spec.head, self.group)
            self.head.contrastive_beta = spec.contrastive_beta
        elif spec.mode == "latent":
            from router_models.collab.latent import LatentFusion

            self.head = LatentFusion.load(spec.head, self.group)
        trained = int(getattr(self.group.config, "max_position_embeddings", 2048))
        self.context_window = min(trained, max_model_len) if max_model_len else trained
        self.stop_ids = frozenset(self.group.stop_ids())
        self.lock = threading.Lock()

    def encode(self, messages: list[dict]) -> list[int]:
        return self.group.encode_chat(messages)

    def steps(self, prompt_ids: list[int], params) -> Iterator:
        from router_models.collab.decode import generate

        if self.spec.mode == "latent":
            return self.head.generate(self.group, prompt_ids, params)
        return generate(self.group, prompt_ids, params, self.head)


# --- the wire ---------------------------------------------------------------------------
class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


TOP_K_CAP = 1 << 31   # above any vocabulary


class ChatRequest(BaseModel):
    """The chat-completions fields the worker reads; unknown fields are accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[_Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=-1)
    seed: int | None = None
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 error_type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.error_type = status, message, param, code, error_type


def _error(status: int, message: str, param: str | None = None, code: str | None = None,
           error_type: str = "invalid_request_error"):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": error_type, "param": param, "code": code}},
                        status_code=status)


async def json_object(request: Request):
    """``(body, None)`` for a request whose body is a JSON object, else ``(None, the 400)``."""
    try:
        body = await request.json()
    except ValueError:
        return None, _error(400, "the request body is not valid JSON")
    if not isinstance(body, dict):
        return None, _error(400, "the request body must be a JSON object")
    return body, None


def invalid(exc: ValidationError):
    """The 400 for a body pydantic refused, naming the first field it refused."""
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ())) or None
    return _error(400, f"{param}: {first.get('msg')}" if param else str(first.get("msg")), param)


def _text_of(msg: _Message) -> str:
    if msg.content is None or isinstance(msg.content, str):
        return msg.content or ""
    parts = []
    for part in msg.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise RequestError(400, "only text content parts are supported by this worker", "messages")
        parts.append(part["text"])
    return "".join(parts)


def _prepare(engine: CollabEngine, req: ChatRequest):
    """Validate what pydantic cannot, render the prompt; returns (prompt_ids, params, stops)."""
    from router_models.collab.decode import SamplingParams

    if req.model != engine.spec.name:
        raise RequestError(404, f"The model `{req.model}` does not exist; this worker serves "
                                f"`{engine.spec.name}`.", "model", "model_not_found", "not_found_error")
    if req.n != 1:
        raise RequestError(400, "n > 1 is not supported by the collaboration worker", "n")
    messages = [{"role": m.role, "content": _text_of(m)} for m in req.messages]
    try:
        prompt = engine.encode(messages)
    except Exception as exc:  # the chat template rejects e.g. an unknown role order
        raise RequestError(400, f"the messages cannot be rendered with the model's chat template: {exc}",
                           "messages") from None
    room = engine.context_window - len(prompt)
    asked = req.max_completion_tokens or req.max_tokens
    if room < 1 or (asked is not None and asked > room):
        raise RequestError(400, f"This model's maximum context length is {engine.context_window} tokens; "
                                f"the messages take {len(prompt)} and {asked or 1} more were asked for.",
                           "messages", "context_length_exceeded")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise RequestError(400, "stop must be up to 4 non-empty strings", "stop")
    # top_k past any vocabulary (or -1, 0) means no cut; clamped so that torch never sees a
    # number past int64 (2**63 was a 500).
    params = SamplingParams(max_tokens=asked or room, temperature=req.temperature, top_p=req.top_p,
                            top_k=min(max(req.top_k, 0), TOP_K_CAP), seed=req.seed, stop_ids=engine.stop_ids)
    return prompt, params, stops


class _Detok:
    """Incremental detokenisation with stop strings: ``push(token) -> new text``."""

    def __init__(self, tokenizer, stops: list[str], stop_ids: frozenset[int]):
        self.tok, self.stops, self.stop_ids = tokenizer, stops, stop_ids
        self.ids: list[int] = []
        self.sent = 0
        self.text = ""
        self.finish: str | None = None

    def push(self, token: int) -> str:
        if token in self.stop_ids:
            self.finish = "stop"
            return self._flush(self.text)
        self.ids.append(token)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        for s in self.stops:
            cut = text.find(s)
            if cut >= 0:
                self.finish = "stop"
                return self._flush(text[:cut])
        self.text = text
        # Hold back an incomplete UTF-8 sequence and anything that may start a stop string.
        safe = len(text.rstrip("\ufffd"))
        for s in self.stops:
            for k in range(min(len(s) - 1, safe), 0, -1):
                if text[:safe].endswith(s[:k]):
                    safe -= k
                    break
        return self._flush(text[:safe])

    def _flush(self, text: str) -> str:
        self.text = text
        out = text[self.sent:] if len(text) > self.sent else ""
        self.sent = max(self.sent, len(text))
        return out

    def rest(self) -> str:
        return self._flush(self.text)


def create_app(engine: CollabEngine):
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title=f"Switchyard collaboration worker ({engine.spec.name})")
    created = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):  # body that is not JSON at all
        return _error(400, f"invalid request body: {exc.errors()[0].get('msg', exc)}")

    @app.exception_handler(404)
    async def _not_found(request, exc):
        return _error(404, f"no route {request.method} {request.url.path}", code="not_found",
                      error_type="not_found_error")

    @app.get("/health")
    async def health():
        return JSONResponse({"status": "ok", "group": engine.spec.name, "mode": engine.spec.mode})

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": engine.spec.name, "object": "model", "created": created, "owned_by": "switchyard",
            "max_model_len": engine.context_window,
            "switchyard": {"mode": engine.spec.mode, "experts": list(engine.spec.experts)}}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body, refused = await json_object(request)
        if refused is not None:
            return refused
        try:
            req = ChatRequest.model_validate(body)
            prompt, params, stops = await asyncio.to_thread(_prepare, engine, req)
        except ValidationError as exc:
            return invalid(exc)
        except RequestError as exc:
            return _error(exc.status, exc.message, exc.param, exc.code, exc.error_type)
        rid, created_at = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        run = _Run(engine, prompt, params, stops)
        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(_sse(run, rid, created_at, include_usage, request),
                                     media_type="text/event-stream")
        try:
            await run.finish()
        except _DecodeFailed as exc:
            return _error(500, f"decoding failed: {exc}", error_type="internal_error")
        body = {
            "id": rid, "object": "chat.completion", "created": created_at, "model": engine.spec.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": run.detok.text},
                         "logprobs": None, "finish_reason": run.finish_reason}],
            "usage": run.usage(), "switchyard": {"mode": engine.spec.mode, "experts": run.expert_counts()},
        }
        return JSONResponse(body, headers={"x-switchyard-collab-experts": run.experts_header()})

    from expert_registry.collab_responses import install

    install(app, engine)   # /v1/responses over the same decoding
    return app


class _DecodeFailed(RuntimeError):
    pass


class _Run:
    """One request's decode, on a thread, handing text pieces to the event loop."""

    def __init__(self, engine: CollabEngine, prompt: list[int], params, stops: list[str]):
        self.engine, self.prompt, self.params = engine, prompt, params
        self.detok = _Detok(engine.group.tokenizer, stops, params.stop_ids)
        self.experts: Counter[int] = Counter()
        self.generated = 0
        self.cancelled = threading.Event()
        self.finish_reason = "length"

    def _decode(self, emit) -> None:
        with self.engine.lock:
            for step in self.engine.steps(self.prompt, self.params):
                if self.cancelled.is_set():
                    return
                self.generated += 1
                self.experts[step.expert] += 1
                piece = self.detok.push(step.token)
                if piece:
                    emit(piece)
                if self.detok.finish:
                    break
        self.finish_reason = self.detok.finish or "length"
        piece = self.detok.rest()
        if piece:
            emit(piece)

    async def finish(self) -> None:
        try:
            await asyncio.to_thread(self._decode, lambda piece: None)
        except Exception as exc:
            log.exception("decode failed")
            raise _DecodeFailed(str(exc)) from exc

    async def pieces(self):
        """Text pieces as they are decoded; None at the end; an exception object on failure."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def work():
            try:
                self._decode(lambda piece: loop.call_soon_threadsafe(queue.put_nowait, piece))
                loop.call_soon_threadsafe(queue.put_nowait, None)
            except Exception as exc:  # noqa: BLE001 - reported to the client as an error event
                log.exception("decode failed")
                loop.call_soon_threadsafe(queue.put_nowait, _DecodeFailed(str(exc)))

        task = loop.run_in_executor(None, work)
        try:
            while True:
                item = await queue.get()
                yield item
                if item is None or isinstance(item, Exception):
                    break
        finally:
            self.cancelled.set()
            await task

    def usage(self) -> dict:
        return {"prompt_tokens": len(self.prompt), "completion_tokens": self.generated,
                "total_tokens": len(self.prompt) + self.generated}

    def expert_counts(self) -> dict[str, int]:
        names = self.engine.group.names
        return {names[e]: n for e, n in sorted(self.experts.items())}

    def experts_header(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.expert_counts().items())


async def _sse(run: _Run, rid: str, created: int, include_usage: bool, request):
    model = run.engine.spec.name

    def chunk(delta: dict, finish: str | None = None, **extra) -> bytes:
        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}
        if include_usage:
            body.setdefault("usage", None)
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    yield chunk({"role": "assistant", "content": ""})
    async for piece in run.pieces():
        if piece is None:
            break
        if isinstance(piece, Exception):
            err = {"error": {"message": f"decoding failed: {piece}", "type": "internal_error",
                             "param": None, "code": None}}
            yield b"data: " + json.dumps(err).encode() + b"\n\n"
            return
        if await request.is_disconnected():
            return
        yield chunk({"content": piece})
    yield chunk({}, run.finish_reason, switchyard={"mode": run.engine.spec.mode, "experts": run.expert_counts()})
    if include_usage:
        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [], "usage": run.usage()}
        yield b"data: " + json.dumps(body).encode() + b"\n\n"
    yield b"data: [DONE]\n\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m expert_registry.collab_worker",
                                     description="Serve a collaboration group over the OpenAI API.")
    parser.add_argument("--group", required=True, help="the group file (JSON, see the module docstring)")
    parser.add_argument("--served-model-name", help="overrides the group file's name")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-model-len", type=int, help="context window served (default: the model's)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        spec = GroupFile.read(args.group)
    except GroupFileError as exc:
        parser.exit(2, f"error: {exc}\n")
    if args.served_model_name:
        spec = GroupFile(**{**spec.__dict__, "name": args.served_model_name})
    import torch
    import uvicorn

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    engine = CollabEngine(spec, device=args.device, max_model_len=args.max_model_len)
    log.info("group '%s' (%s: %s) loaded in %.1f s; %d of %d layers shared", spec.name, spec.mode,
             ", ".join(spec.experts), time.time() - started, engine.group.trunk_layers, engine.group.n_layers)
    uvicorn.run(create_app(engine), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
