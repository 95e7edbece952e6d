"""A TCP channel to the session store actor, beside Ray's actor calls.

Why: a Ray actor call costs 1.5 ms of round trip on this 2-core machine
even when it carries nothing, and a page's commit (a 135 KB delta) 2.6 ms;
over a plain TCP connection to the actor the same commit takes 0.33 ms
(`python bench/store_channel.py`, bench/results/store_channel.json;
docs/architecture.md 3.2). Every session page pays one commit.

How: `SessionStoreActor` listens on its node's address at a port of the
kernel's choosing once a client asks for it (`data_address`, a Ray call, so
only a caller Ray lets in learns the port and the actor's random token).
A client opens one connection per event loop, says the token, and then
sends requests without waiting for the answers of earlier ones; the actor
answers each in order, the table operation run whole between two reads of
the socket, so each is as atomic as a Ray call to the actor is.

The wire: a frame is a 4-byte big-endian length, that many bytes of JSON
(a header), then the header's `blobs` (a list of lengths) as raw bytes. A
`bytes` value anywhere in a request or an answer is sent as a blob and
written `{"$b": index}` in the JSON. JSON carries floats exactly (Python
writes the shortest repr that reads back the same double), so an answer
stored and sent back is the answer that was computed. No pickle: a peer
that has the token can only ask for the table's operations by name.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import struct
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("ray.serve")

# The table's operations a peer may ask for (serve.store.SessionTable).
OPS = frozenset({"create", "head", "load", "result", "commit", "delete", "stats", "fill"})

HELLO_MAX_BYTES = 4096  # before the token: nothing bigger is read
HEADER_MAX_BYTES = 16 << 20  # a header: op, ids, an answer (a retained result), blob lengths
CONNECT_TIMEOUT_S = 2.0

_LEN = struct.Struct("!I")


class ChannelClosed(ConnectionError):
    """The connection to the store actor is gone (its answer, if any, unknown)."""


class ProtocolError(ValueError):
    """A frame that breaks the wire format (the connection is closed)."""


def pack(obj: Any, blobs: list[bytes]) -> Any:
    """`obj` with every bytes value moved to `blobs` and replaced by {"$b": i}."""
    if isinstance(obj, (bytes, bytearray, memoryview)):
        blobs.append(bytes(obj) if not isinstance(obj, bytes) else obj)
        return {"$b": len(blobs) - 1}
    if isinstance(obj, dict):
        if "$b" in obj:
            raise ValueError("a dict key '$b' cannot cross the store channel")
        return {k: pack(v, blobs) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [pack(v, blobs) for v in obj]
    return obj


def unpack(obj: Any, blobs: list[bytes]) -> Any:
    if isinstance(obj, dict):
        if len(obj) == 1 and "$b" in obj:
            i = obj["$b"]
            if not isinstance(i, int) or not 0 <= i < len(blobs):
                raise ProtocolError(f"blob reference {i!r} out of range")
            return blobs[i]
        return {k: unpack(v, blobs) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unpack(v, blobs) for v in obj]
    return obj


def write_frame(writer: asyncio.StreamWriter, header: dict[str, Any]) -> None:
    blobs: list[bytes] = []
    body = pack(header, blobs)
    body["blobs"] = [len(b) for b in blobs]
    raw = json.dumps(body, separators=(",", ":")).encode()
    writer.writelines([_LEN.pack(len(raw)), raw, *blobs])


async def read_frame(reader: asyncio.StreamReader, max_header: int, max_blob_total: int) -> dict[str, Any]:
    """One frame, its blobs put back in place; ProtocolError past the limits."""
    (n,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    if n > max_header:
        raise ProtocolError(f"header of {n} bytes over the limit of {max_header}")
    try:
        header = json.loads(await reader.readexactly(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"header is not JSON: {e}") from None
    sizes = header.pop("blobs", []) if isinstance(header, dict) else None
    if not isinstance(sizes, list) or not all(isinstance(s, int) and s >= 0 for s in sizes):
        raise ProtocolError("header without a list of blob lengths")
    if sum(sizes) > max_blob_total:
        raise ProtocolError(f"blobs of {sum(sizes)} bytes over the limit of {max_blob_total}")
    blobs = [await reader.readexactly(s) for s in sizes]
    return unpack(header, blobs)


# --- the actor's side --------------------------------------------------------------------------


async def serve_peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, token: str,
                     call: Callable[[str, list], dict[str, Any]], max_blob_total: int) -> None:
    """One client connection: the token first, then requests answered in order.

    `call(op, args)` runs one table operation and returns its answer (a value
    or a wire error), as SessionStoreActor.call does for a Ray call."""
    peer = writer.get_extra_info("peername")
    try:
        hello = await read_frame(reader, HELLO_MAX_BYTES, 0)
        if not isinstance(hello.get("token"), str) or not hmac.compare_digest(hello["token"], token):
            logger.warning("session store channel: a peer %s without the token; closed", peer)
            return
        write_frame(writer, {"ok": True})
        while True:
            req = await read_frame(reader, HEADER_MAX_BYTES, max_blob_total)
            op, args, rid = req.get("op"), req.get("args"), req.get("id")
            if op not in OPS or not isinstance(args, list) or not isinstance(rid, int):
                raise ProtocolError(f"not a request: op {op!r}")
            write_frame(writer, {"id": rid, "out": call(op, args)})
            if writer.transport.get_write_buffer_size() > (1 << 20):
                await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass  # the client went away
    except ProtocolError as e:
        logger.warning("session store channel: %s from %s; closed", e, peer)
    except Exception:  # e.g. an operation given the wrong arguments: that peer only
        logger.exception("session store channel: a request from %s failed; closed", peer)
    finally:
        writer.close()


# --- a client's side ---------------------------------------------------------------------------


class Channel:
    """One connection to the store actor, on the event loop that opened it.

    Requests are sent as they come and their answers matched by id; if the
    connection drops, every call still waiting raises ChannelClosed."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader, self._writer = reader, writer
        self._next_id = 0
        self._waiting: dict[int, asyncio.Future] = {}
        self.closed = False
        self._task = asyncio.get_running_loop().create_task(self._read_answers())

    @classmethod
    async def open(cls, host: str, port: int, token: str, timeout_s: float = CONNECT_TIMEOUT_S) -> Channel:
        async def go():
            reader, writer = await asyncio.open_connection(host, port)
            write_frame(writer, {"token": token})
            await writer.drain()
            ack = await read_frame(reader, HELLO_MAX_BYTES, 0)
            if ack != {"ok": True}:
                writer.close()
                raise ChannelClosed(f"the store actor at {host}:{port} refused the channel")
            return cls(reader, writer)

        try:
            return await asyncio.wait_for(go(), timeout_s)
        except (asyncio.IncompleteReadError, ProtocolError) as e:
            raise ChannelClosed(f"the store actor at {host}:{port} closed the channel ({e})") from None

    async def call(self, op: str, args: tuple | list) -> Any:
        if self.closed:
            raise ChannelClosed("the store channel is closed")
        rid = self._next_id
        self._next_id += 1
        fut = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        try:
            write_frame(self._writer, {"id": rid, "op": op, "args": list(args)})
            await self._writer.drain()
        except (ConnectionError, RuntimeError) as e:
            self._waiting.pop(rid, None)
            self._fail(e)
            raise ChannelClosed(f"the store channel broke while sending ({e})") from None
        return await fut

    async def _read_answers(self) -> None:
        try:
            while True:
                ans = await read_frame(self._reader, HEADER_MAX_BYTES, 1 << 62)
                fut = self._waiting.pop(ans.get("id"), None)
                if fut is not None and not fut.done():  # a caller that gave up leaves a done future
                    fut.set_result(ans.get("out"))
        except asyncio.CancelledError:
            self._fail(None)
            raise
        except Exception as e:  # noqa: BLE001 - a dropped connection or a bad frame: fail every waiting call
            self._fail(e)

    def _fail(self, why: BaseException | None) -> None:
        self.closed = True
        waiting, self._waiting = self._waiting, {}
        for fut in waiting.values():
            if not fut.done():
                fut.set_exception(ChannelClosed(f"the store channel closed ({why or 'closed'})"))
        self._writer.close()

    def close(self) -> None:
        if not self.closed:
            self._task.cancel()
            self._fail(None)
