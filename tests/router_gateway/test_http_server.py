"""The gateway's uvicorn protocol (``router_gateway.http_server``): hot routes answered
without ASGI must behave on the wire exactly like the ASGI path, HTTP/1.1 details
included. Real gateway, real Redis, real scripted upstream, raw sockets on loopback."""

from __future__ import annotations

import json
import logging
import socket
import time
from pathlib import Path
from typing import Iterator

import httptools
import httpx
import pytest

from expert_registry.spec import ExpertSpec
from expert_registry.store import ExpertStore
from router_gateway import http_server
from router_gateway.app import create_app
from router_gateway.http_server import GatewayProtocol, http_protocol
from tests.router_gateway import scripted_upstream
from tests.router_gateway.conftest import CLIENT_KEY, make_settings, scripted_experts, serve_in_thread

AUTH = f"authorization: Bearer {CLIENT_KEY}\r\n"


def chat_request(model: str = "up-echo", extra: str = "", stream: bool = False, http: str = "1.1") -> bytes:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}],
                       "stream": stream}).encode()
    return (f"POST /v1/chat/completions HTTP/{http}\r\nhost: t\r\ncontent-type: application/json\r\n{AUTH}"
            f"content-length: {len(body)}\r\n{extra}\r\n").encode() + body


class Responses:
    """Parses the HTTP/1.1 responses arriving on one socket (chunked or not)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.done: list[dict] = []
        self.closed = False
        self._cur: dict = {}
        self.parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        self._cur = {"headers": {}, "body": b""}

    def on_header(self, name: bytes, value: bytes) -> None:
        self._cur["headers"][name.decode().lower()] = value.decode()

    def on_headers_complete(self) -> None:
        self._cur["status"] = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self._cur["body"] += body

    def on_message_complete(self) -> None:
        self.done.append(self._cur)

    def read(self, n: int, timeout: float = 10.0) -> list[dict]:
        """Until ``n`` responses are complete (or the server closed the connection)."""
        self.sock.settimeout(timeout)
        while len(self.done) < n:
            data = self.sock.recv(65536)
            if not data:
                self.closed = True
                break
            self.parser.feed_data(data)
        return self.done

    def server_closed(self, timeout: float = 5.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except (socket.timeout, ConnectionResetError):
            return False


@pytest.fixture(params=["gateway-protocol", "httptools"])
def served(request, store: ExpertStore, data_dir: Path, scripted_upstream: str) -> Iterator[str]:
    """The gateway on the protocol ``switchyard serve`` uses, and on uvicorn's own (where the
    hot routes go through ``FastPath`` as ASGI): every test here must pass on both."""
    for spec in scripted_experts(scripted_upstream):
        store.put(spec)
    store.put(ExpertSpec(name="up-slowstream", backend="openai", base_url=scripted_upstream,
                         served_model="slowstream"))
    http = GatewayProtocol if request.param == "gateway-protocol" else "httptools"
    # up-slowstream sends a chunk every 0.5 s: with the tests' usual 2 s read timeout, a
    # stall of this process (a full collection of its heap, a busy machine) could end the
    # stream as timed out before a test has looked at it.
    settings = make_settings(data_dir, upstream_timeout_s=30.0)
    with serve_in_thread(create_app(settings, store), http=http) as url:
        yield url


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def test_serve_uses_the_gateway_protocol_on_this_uvicorn():
    # If a uvicorn upgrade moved what the protocol needs, serving would silently fall
    # back to the slower ASGI path: fail here instead.
    assert http_protocol() is GatewayProtocol


def test_uvicorn_older_than_the_tested_releases_is_refused():
    assert http_server.too_old("0.52.0") == "uvicorn 0.52.0 is older than 0.53"
    assert http_server.too_old("0.45.0rc1") is not None
    for version in ("0.53.0", "0.55.0", "0.60.0.dev1", "1.0"):
        assert http_server.too_old(version) is None


def test_missing_uvicorn_internals_fall_back_to_plain_httptools(monkeypatch, caplog):
    monkeypatch.setattr(http_server, "_MISSING", "uvicorn's HttpToolsProtocol lacks ['flow']")
    with caplog.at_level(logging.WARNING, logger="router_gateway.http_server"):
        assert http_protocol() == "httptools"
    assert "lacks ['flow']" in caplog.text


def test_answers_keep_alive_pipelining_and_close(served: str):
    with connect(served) as sock:
        wire = Responses(sock)
        sock.sendall(chat_request() + chat_request(extra="x-request-id: second-one\r\n"))  # pipelined
        first, second = wire.read(2)
        for r in (first, second):
            assert r["status"] == 200
            assert r["headers"]["content-type"] == "application/json"
            assert int(r["headers"]["content-length"]) == len(r["body"])
            assert r["headers"]["x-switchyard-expert"] == "up-echo"
            assert json.loads(r["body"])["choices"][0]["message"]["content"] == "hello there"
        assert second["headers"]["x-request-id"] == "second-one"
        assert first["headers"]["x-request-id"] != "second-one"
        assert json.loads(second["body"])["received_request_id"] == "second-one"
        sock.sendall(chat_request(extra="connection: close\r\n"))   # the same connection, kept alive
        third = wire.read(3)[2]
        assert third["status"] == 200 and third["headers"]["connection"] == "close"
        assert wire.server_closed()


def test_health_answers_head_for_load_balancer_checks(served: str):
    with httpx.Client(base_url=served, timeout=10) as c:
        head, get = c.head("/health"), c.get("/health")
    assert head.status_code == get.status_code == 200 and get.json()["status"] == "ok"
    assert head.content == b"" and head.headers["content-type"] == "application/json"


def test_http10_client_gets_its_answer_and_a_closed_connection(served: str):
    with connect(served) as sock:
        wire = Responses(sock)
        sock.sendall(chat_request(http="1.0"))
        (r,) = wire.read(1)
        assert r["status"] == 200 and r["headers"]["connection"] == "close"
        assert json.loads(r["body"])["model"] == "up-echo"
        assert wire.server_closed()


def test_expect_100_continue_body_sent_after_the_go_ahead(served: str):
    req = chat_request(extra="expect: 100-continue\r\n")
    head, body = req.split(b"\r\n\r\n", 1)
    with connect(served) as sock:
        sock.sendall(head + b"\r\n\r\n")
        sock.settimeout(10)
        assert sock.recv(64).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        wire = Responses(sock)
        (r,) = wire.read(1)
        assert r["status"] == 200 and json.loads(r["body"])["received"]["messages"][0]["content"] == "hi"


def test_body_in_pieces_and_errors_keep_the_connection(served: str):
    req = chat_request()
    with connect(served) as sock:
        wire = Responses(sock)
        for i in range(0, len(req), 7):      # the body arrives after the handler started
            sock.sendall(req[i:i + 7])
            time.sleep(0.002)
        bad = b"{not json"
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\n" + AUTH.encode()
                     + b"content-length: %d\r\n\r\n%s" % (len(bad), bad))
        sock.sendall(chat_request(model="no-such-model"))
        ok, invalid, unknown = wire.read(3)
        assert ok["status"] == 200
        assert invalid["status"] == 400 and "not valid JSON" in json.loads(invalid["body"])["error"]["message"]
        assert unknown["status"] == 404 and json.loads(unknown["body"])["error"]["param"] == "model"
        assert not wire.closed


def test_stream_is_chunked_and_ends_cleanly(served: str):
    with connect(served) as sock:
        wire = Responses(sock)
        sock.sendall(chat_request(stream=True) + chat_request())
        stream, plain = wire.read(2)
        assert stream["status"] == 200 and stream["headers"]["transfer-encoding"] == "chunked"
        assert stream["headers"]["content-type"].startswith("text/event-stream")
        events = [e for e in stream["body"].decode().split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        text = "".join(json.loads(e[6:])["choices"][0]["delta"].get("content", "") for e in events[:-1])
        assert text == "hello there"
        assert plain["status"] == 200      # the connection carries on after the stream


def test_client_leaving_a_stream_closes_the_upstream_stream(served: str):
    with httpx.Client(base_url=served, timeout=10) as client:
        before = scripted_upstream.open_streams()
        with client.stream("POST", "/v1/chat/completions", headers={"authorization": f"Bearer {CLIENT_KEY}"},
                           json={"model": "up-slowstream", "stream": True,
                                 "messages": [{"role": "user", "content": "go on"}]}) as r:
            assert r.status_code == 200
            first = next(r.iter_bytes())
            assert scripted_upstream.open_streams() == before + 1, first
        # the client hung up: within a chunk or two the gateway must hang up on the expert
        deadline = time.monotonic() + 5
        while scripted_upstream.open_streams() > before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert scripted_upstream.open_streams() == before
        assert client.get("/health").json()["status"] == "ok"


# ---- how a stream is written: an in-memory transport stands in for the client's socket ----
class _Wire:
    """Records each ``write`` (one system call on a real socket) with the time it came."""

    def __init__(self) -> None:
        self.writes: list[tuple[float, bytes]] = []

    def write(self, data: bytes) -> None:
        self.writes.append((time.monotonic(), bytes(data)))

    def is_closing(self) -> bool:
        return False


def _write_stream(pieces: list, pause_s: float = 0.0) -> tuple[list[tuple[float, bytes]], BaseException | None]:
    """``send_response`` of a StreamingResponse whose body yields ``pieces`` (an exception
    is raised where one stands), waiting ``pause_s`` before the second one."""
    import asyncio
    from types import SimpleNamespace

    from starlette.responses import StreamingResponse

    from router_gateway.http_server import send_response

    async def body():
        for i, piece in enumerate(pieces):
            if i == 1 and pause_s:
                await asyncio.sleep(pause_s)
            if isinstance(piece, BaseException):
                raise piece
            yield piece

    wire = _Wire()
    cycle = SimpleNamespace(transport=wire, flow=SimpleNamespace(write_paused=False), disconnected=False,
                            default_headers=[], keep_alive=True, response_started=False,
                            waiting_for_100_continue=False, response_complete=False,
                            message_event=asyncio.Event(), on_response=lambda: None)
    trace = SimpleNamespace(rid="r1", ended=None, read_response_headers=lambda status, headers: None)
    error = None

    async def run():
        nonlocal error
        cycle.message_event = asyncio.Event()
        try:
            await send_response(cycle, StreamingResponse(body(), media_type="text/event-stream"), trace)
        except RuntimeError as exc:
            error = exc
        await asyncio.sleep(0.01)   # a flush still scheduled would land here

    asyncio.run(run())
    return wire.writes, error


def test_a_stream_goes_out_in_as_few_writes_as_its_timing_allows():
    # Ready together: head, both chunks and the terminator in one write.
    writes, _ = _write_stream([b"data: 1\n\n", b"data: 2\n\n"])
    assert len(writes) == 1
    head, _, body = writes[0][1].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head
    assert body == b"9\r\ndata: 1\n\n\r\n9\r\ndata: 2\n\n\r\n0\r\n\r\n"
    # A chunk that comes later: the head and the first chunk leave at once, before it.
    writes, _ = _write_stream([b"data: 1\n\n", b"data: 2\n\n"], pause_s=0.2)
    assert len(writes) == 2 and writes[1][0] - writes[0][0] >= 0.15
    assert writes[0][1].endswith(b"9\r\ndata: 1\n\n\r\n") and writes[1][1] == b"9\r\ndata: 2\n\n\r\n0\r\n\r\n"


def test_a_stream_whose_body_fails_is_left_cut_off():
    """No terminating chunk after a failure: the client must not take a broken answer
    for a whole one (the caller then closes the connection)."""
    writes, error = _write_stream([b"data: 1\n\n", RuntimeError("boom")], pause_s=0.05)
    assert isinstance(error, RuntimeError)
    sent = b"".join(w for _, w in writes)
    assert sent.endswith(b"9\r\ndata: 1\n\n\r\n") and b"0\r\n\r\n" not in sent


@pytest.mark.parametrize("http", ["gateway-protocol", "httptools"])
def test_clients_that_leave_before_their_stream_starts_give_its_upstream_connection_back(
        http, store: ExpertStore, data_dir: Path, scripted_upstream: str):
    """A client that hangs up while its streamed answer is still starting must not keep the
    upstream connection: with a pool of 2, after 4 such clients the next request is still
    answered (each used to keep its slot for good, and the fifth waited forever)."""
    from tests.router_gateway.scripted_upstream import open_streams

    for name in ("slowstart", "echo"):
        store.put(ExpertSpec(name=f"up-{name}", backend="openai", base_url=scripted_upstream, served_model=name))
    settings = make_settings(data_dir, upstream_max_connections=2, upstream_connect_timeout_s=2.0)
    with serve_in_thread(create_app(settings, store), http=GatewayProtocol if http == "gateway-protocol"
                         else "httptools") as url:
        for _ in range(4):
            with connect(url) as sock:
                sock.sendall(chat_request("up-slowstart", stream=True))
                time.sleep(0.1)        # gone 0.4 s before the upstream starts answering
        time.sleep(0.5)
        body = {"model": "up-echo", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=10,
                       headers={"authorization": f"Bearer {CLIENT_KEY}"})
        assert r.status_code == 200, r.text
        assert r.text.rstrip().endswith("data: [DONE]")
        deadline = time.monotonic() + 5
        while open_streams() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert open_streams() == 0
