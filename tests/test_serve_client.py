"""serve.client.Client repeats what is safe to repeat, against a real HTTP server
on 127.0.0.1 that misbehaves on purpose: it drops connections mid-request,
answers 503 with Retry-After, a gateway's plain-text 500, or the API's own
JSON 500, in an order each test scripts."""
from __future__ import annotations

import json
import socket
import threading

import httpx
import pytest

from serve.client import ApiError, Client

OK = {"session_id": "s1", "model": "bsbr", "label": "a"}


class ScriptedServer:
    """One request per connection; the n-th request gets script[n] (the last
    entry repeats): "drop" (read the request, close without an answer),
    "503", "500-text", "500-json", "ok"."""

    def __init__(self, script: list[str]):
        self.script = script
        self.requests: list[tuple[str, bytes]] = []  # (request line, body)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                head, body = self._read(conn)
                if head is None:
                    continue
                what = self.script[min(len(self.requests), len(self.script) - 1)]
                self.requests.append((head, body))
                if what == "drop":
                    conn.shutdown(socket.SHUT_RDWR)
                    continue
                status, ctype, payload, extra = {
                    "ok": (200, "application/json", json.dumps(OK), ""),
                    "503": (503, "application/json",
                            json.dumps({"error": {"code": "store_unavailable", "message": "away"}}),
                            "Retry-After: 0\r\n"),
                    "500-text": (500, "text/plain", "Internal Server Error", ""),
                    "500-json": (500, "application/json",
                                 json.dumps({"error": {"code": "internal", "message": "model failed"}}), ""),
                }[what]
                data = payload.encode()
                conn.sendall((f"HTTP/1.1 {status} X\r\nContent-Type: {ctype}\r\nContent-Length: {len(data)}\r\n"
                              f"{extra}Connection: close\r\n\r\n").encode() + data)

    @staticmethod
    def _read(conn: socket.socket) -> tuple[str | None, bytes]:
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = conn.recv(65536)
            if not chunk:
                return None, b""
            buf += chunk
        head, rest = buf.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        length = next((int(v) for k, _, v in (h.partition(": ") for h in lines[1:]) if k.lower() == "content-length"), 0)
        while len(rest) < length:
            rest += conn.recv(65536)
        return lines[0], rest

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def scripted():
    servers = []

    def make(*script: str) -> ScriptedServer:
        servers.append(ScriptedServer(list(script)))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def client(url: str, retries: int = 4) -> Client:
    return Client(url, timeout=10, retries=retries, backoff_s=0.01)


def test_page_is_repeated_with_its_seq_after_dropped_connections(scripted):
    srv = scripted("drop", "drop", "ok")
    with client(srv.url) as c:
        assert c.append("s1", 7, pages=["page seven"]) == OK
        assert c.retried == 2
    assert len(srv.requests) == 3
    assert {line for line, _ in srv.requests} == {"POST /v1/sessions/s1/pages HTTP/1.1"}
    assert {json.loads(body)["seq"] for _, body in srv.requests} == {7}  # the same page, never a new seq


def test_classify_is_repeated_after_503_and_gateway_500(scripted):
    srv = scripted("503", "500-text", "ok")
    with client(srv.url) as c:
        assert c.classify("bsbr", text="a document") == OK
        assert c.retried == 2
    assert len(srv.requests) == 3


def test_the_servers_own_500_is_not_repeated(scripted):
    srv = scripted("500-json", "ok")
    with client(srv.url) as c, pytest.raises(ApiError) as e:
        c.append("s1", 0, text="a page")
    assert e.value.status == 500 and e.value.code == "internal"
    assert len(srv.requests) == 1


def test_creating_a_session_is_not_repeated_once_sent(scripted):
    """A dropped POST /v1/sessions may have created one: a repeat would create another."""
    srv = scripted("drop", "ok")
    with client(srv.url) as c, pytest.raises(httpx.RemoteProtocolError):
        c.create_session("bsbr")
    assert len(srv.requests) == 1


def test_repeats_are_bounded(scripted):
    srv = scripted("503")
    with client(srv.url, retries=2) as c, pytest.raises(ApiError) as e:
        c.classify("bsbr", text="a document")
    assert e.value.status == 503 and e.value.retry_after == "0"
    assert len(srv.requests) == 3  # the first and 2 repeats


def test_refused_connection_is_repeated_then_reported():
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    with client(url, retries=2) as c, pytest.raises(httpx.ConnectError):
        c.create_session("bsbr")  # never sent, so safe to repeat even here
    assert c.retried == 2
