"""The TCP channel to the session store actor (serve/store_channel.py).

The store's contract over it is tests/test_serve_store_contract.py (the
`ray_actor` kit, which fails a call that Ray would carry instead). Here: the
wire format, what the actor's side refuses, and what a client does when the
connection drops or cannot be opened. The peers are real sockets on
127.0.0.1 and a real store actor.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import uuid

import pytest
from test_serve_store_contract import ray_local  # noqa: F401 - a fixture

from serve import errors
from serve.store import RayActorSessionStore
from serve.store_channel import (
    Channel,
    ChannelClosed,
    ProtocolError,
    pack,
    read_frame,
    serve_peer,
    unpack,
    write_frame,
)

pytest_plugins = ["conftest_serve"]

TOKEN = "t" * 32


def run(coro):
    return asyncio.run(coro)


def test_bytes_anywhere_cross_as_blobs_and_come_back_exactly():
    value = {"a": [b"\x00\x01", {"b": b""}, (b"xyz", 1.0 / 3.0)], "n": None, "f": 1e-300, "s": "\u00e9\u4e2d"}
    blobs: list[bytes] = []
    wire = json.loads(json.dumps(pack(value, blobs)))
    assert blobs == [b"\x00\x01", b"", b"xyz"]
    back = unpack(wire, blobs)
    assert back == {"a": [b"\x00\x01", {"b": b""}, [b"xyz", 1.0 / 3.0]], "n": None, "f": 1e-300, "s": "\u00e9\u4e2d"}
    assert back["a"][2][1] == 1.0 / 3.0  # the same double, not a close one
    with pytest.raises(ValueError, match=r"\$b"):
        pack({"$b": 0}, [])
    with pytest.raises(ProtocolError):
        unpack({"$b": 3}, [b"x"])


async def _peer_server(call, max_blob_total=1 << 20):
    server = await asyncio.start_server(lambda r, w: serve_peer(r, w, TOKEN, call, max_blob_total), "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _closed_by_peer(reader: asyncio.StreamReader) -> bool:
    """The peer closed (a reset when it closed with our bytes still unread)."""
    try:
        return await asyncio.wait_for(reader.read(), 5) == b""
    except ConnectionResetError:
        return True


def test_the_actor_side_answers_in_order_and_refuses_what_breaks_the_wire():
    seen: list[tuple[str, list]] = []

    def call(op, args):
        seen.append((op, args))
        return {"ok": {"op": op, "blob": args[0] if args else None}}

    async def go():
        server, port = await _peer_server(call)
        try:
            # Requests sent without waiting are answered in order, their blobs intact.
            ch = await Channel.open("127.0.0.1", port, TOKEN)
            outs = await asyncio.gather(*[ch.call("head", [bytes([i]) * (i * 1000)]) for i in range(8)])
            assert [o["ok"]["blob"] for o in outs] == [bytes([i]) * (i * 1000) for i in range(8)]
            ch.close()

            async def raw(hello: dict):
                r, w = await asyncio.open_connection("127.0.0.1", port)
                write_frame(w, hello)
                await w.drain()
                return r, w

            # The wrong token: closed, no answer, nothing run.
            n = len(seen)
            r, w = await raw({"token": "x" * 32})
            assert await _closed_by_peer(r) and len(seen) == n
            with pytest.raises(ChannelClosed):
                await Channel.open("127.0.0.1", port, "y" * 32)
            # An operation that is not the table's, a header over the limit, a frame
            # that is not JSON: closed, nothing run.
            for bad in (lambda w: write_frame(w, {"id": 0, "op": "__init__", "args": []}),
                        lambda w: w.write(struct.pack("!I", 1 << 30)),
                        lambda w: w.write(struct.pack("!I", 3) + b"{{{"),
                        lambda w: write_frame(w, {"id": 0, "op": "commit", "args": [b"z" * (2 << 20)]})):
                r, w = await raw({"token": TOKEN})
                assert await read_frame(r, 4096, 0) == {"ok": True}
                bad(w)
                with contextlib.suppress(ConnectionResetError):
                    await w.drain()
                assert await _closed_by_peer(r)
            assert len(seen) == n
        finally:
            server.close()

    run(go())


def test_a_connection_dropped_with_calls_waiting_fails_them_as_closed():
    """The actor side reads a request and goes away without answering: the
    waiting call raises ChannelClosed (its outcome unknown), it does not hang."""
    async def go():
        got = asyncio.Event()

        async def vanish(r, w):
            await read_frame(r, 4096, 0)
            write_frame(w, {"ok": True})
            await w.drain()
            await read_frame(r, 1 << 20, 1 << 20)
            got.set()
            w.transport.abort()

        server = await asyncio.start_server(vanish, "127.0.0.1", 0)
        try:
            ch = await Channel.open("127.0.0.1", server.sockets[0].getsockname()[1], TOKEN)
            with pytest.raises(ChannelClosed):
                await asyncio.wait_for(ch.call("commit", ["s", 0, b"x", {}]), 10)
            assert got.is_set() and ch.closed
            with pytest.raises(ChannelClosed):
                await ch.call("head", ["s"])
        finally:
            server.close()

    run(go())


def _store(**kw) -> RayActorSessionStore:
    s = RayActorSessionStore(f"channel-{uuid.uuid4().hex[:12]}", 100, 1 << 20, 64, **kw)
    s.connect()
    return s


def _kill(s: RayActorSessionStore) -> None:
    import ray

    ray.kill(s._handle(), no_restart=True)


def test_the_store_actor_refuses_a_peer_without_its_token_and_other_ops(ray_local):  # noqa: F811
    import ray

    s = _store()
    try:
        addr = ray.get(s._handle().data_address.remote())
        assert addr["port"] > 0 and len(addr["token"]) == 32

        async def go():
            with pytest.raises(ChannelClosed):
                await Channel.open(addr["host"], addr["port"], "0" * 32)
            ch = await Channel.open(addr["host"], addr["port"], addr["token"])
            assert (await ch.call("create", ["s", "bsbr", 60]))["ok"]["session_id"] == "s"
            ch.close()

        run(go())
        # Over Ray too, only the table's operations.
        with pytest.raises(ray.exceptions.RayTaskError, match="not a session store operation"):
            ray.get(s._handle().call.remote("sweep"))
    finally:
        _kill(s)


def test_a_dropped_channel_is_store_unavailable_then_the_next_call_reconnects(ray_local):  # noqa: F811
    s = _store()
    try:
        async def go():
            await s.create("s", "bsbr", 60)
            ch = await s._socket()
            # A commit in flight when its connection drops: 503, its outcome unknown ...
            task = asyncio.ensure_future(s.commit("s", 0, b"x", {"seq": 0}))
            await asyncio.sleep(0)  # the request is written; its answer cannot be read before the abort
            ch._writer.transport.abort()
            with pytest.raises(errors.StoreUnavailable) as e:
                await task
            assert e.value.status == 503 and e.value.retry_after_header
            # ... so the client repeats it: a new connection, and the page applied once.
            assert await s.commit("s", 0, b"x", {"seq": 0}) in (None, 1)
            assert await s._socket() is not ch and (await s._socket()) is not None
            meta, chain = await s.load("s")
            assert chain == [b"x"] and meta["next_seq"] == 1 and (await s.stats())["bytes"] == 1

        run(go())
    finally:
        _kill(s)


def test_a_channel_that_cannot_be_opened_leaves_the_operations_to_ray_calls(ray_local, caplog):  # noqa: F811
    """A firewall between nodes, here a port nobody listens on: logged once,
    and the store works over Ray calls until RETRY_SOCKET_S has passed."""
    from conftest_serve import free_port

    class Firewalled(RayActorSessionStore):
        async def _data_address(self):
            addr = await super()._data_address()
            return {**addr, "host": "127.0.0.1", "port": free_port()}

    s = Firewalled(f"channel-{uuid.uuid4().hex[:12]}", 100, 1 << 20, 64)
    s.connect()
    try:
        async def go():
            with caplog.at_level("WARNING", logger="ray.serve"):
                await s.create("s", "bsbr", 60)
                assert await s.commit("s", 0, b"abc", {"seq": 0}) is None
                assert (await s.load("s"))[1] == [b"abc"]
            assert await s._socket() is None
            assert sum("no TCP channel" in r.getMessage() for r in caplog.records) == 1
            # RETRY_SOCKET_S later it is tried again: still closed, said at INFO, not WARNING again.
            s._socket_off_until = 0.0
            with caplog.at_level("INFO", logger="ray.serve"):
                assert await s.head("s") and await s._socket() is None
            again = [r for r in caplog.records if "no TCP channel" in r.getMessage()]
            assert [r.levelname for r in again] == ["WARNING", "INFO"]

        run(go())
    finally:
        _kill(s)


def test_the_ray_channel_never_opens_a_socket(ray_local):  # noqa: F811
    s = _store(channel="ray")
    try:
        async def go():
            await s.create("s", "bsbr", 60)
            assert await s._socket() is None and not s._channels

        run(go())
    finally:
        _kill(s)


def test_a_store_actor_of_an_older_bsbr_serve_is_used_over_ray_calls(ray_local, caplog):  # noqa: F811
    """A detached store actor outlives the app's code: one made before the
    channel existed (Ray calls only) still serves a new replica's sessions."""
    import ray

    from serve.store import SessionTable

    class OldStoreActor:  # what SessionStoreActor was: `call`, and no data_address
        def __init__(self, *args):
            self.table = SessionTable(*args)

        async def call(self, op, *args):
            return {"ok": getattr(self.table, op)(*args)}

    name = f"channel-old-{uuid.uuid4().hex[:12]}"
    old = ray.remote(OldStoreActor).options(name=name, namespace=RayActorSessionStore.NAMESPACE,
                                            lifetime="detached", num_cpus=0).remote(100, 1 << 20, 64)
    try:
        ray.get(old.call.remote("stats"))
        s = RayActorSessionStore(name, 100, 1 << 20, 64)

        async def go():
            with caplog.at_level("WARNING", logger="ray.serve"):
                await s.create("s", "bsbr", 60)
                assert await s.commit("s", 0, b"abc", {"seq": 0}) is None
                assert (await s.load("s"))[1] == [b"abc"] and await s.result("s", 0) == {"seq": 0}
            assert sum("older bsbr-serve" in r.getMessage() for r in caplog.records) == 1

        run(go())
        assert ray.get(old.call.remote("stats"))["ok"]["sessions"] == 1  # the old actor holds it
    finally:
        ray.kill(old, no_restart=True)


def test_warm_opens_this_loops_channel_before_any_operation(ray_local):  # noqa: F811
    """SessionStore.warm (a replica's start, Engine.warm_up): the channel is open
    before the first operation, which then uses it; with the ray channel it opens nothing."""
    s, over_ray = _store(), _store(channel="ray")
    try:
        async def go():
            assert not s._channels
            await s.warm()
            ch = s._channels.get(asyncio.get_running_loop())
            assert ch is not None and not ch.closed
            await s.create("s", "bsbr", 60)
            assert await s._socket() is ch
            await over_ray.warm()
            assert not over_ray._channels

        run(go())
    finally:
        _kill(s)
        _kill(over_ray)
