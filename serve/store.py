"""Session checkpoint store: the durable copy of every session, readable by every replica.

A session's state lives hot on the replica that served its last page; after
every page that replica commits a checkpoint here, so any replica can resume
the session (replica restart, scale-down, node loss). A checkpoint is a
chain: one full `State.to_bytes()` blob, then one delta blob per page
(`State.to_bytes(base=previous)`, only the new chunks). The engine starts a
new chain with a full blob when the deltas outgrow it, so a page costs
O(page) bytes amortised and the chain holds at most about twice the state.

`SessionStore` is the interface (async, so a network store fits). The
default, `RayActorSessionStore`, talks to one named, detached Ray actor
(`SessionStoreActor`) that every replica on every node can reach by name,
and then talks to it over a TCP connection (serve.store_channel).
`MemorySessionStore` is the same table in-process (one replica, tests,
benchmarks). `serve.redis_store.RedisSessionStore` keeps everything in Redis,
so sessions outlive every Ray process. tests/test_serve_store_contract.py
holds every store to the same contract.

Consistency: `commit` is a compare-and-set on the session's `next_seq`, so a
page is applied at most once even when two replicas race for one session
(e.g. a client retry routed elsewhere while the first attempt still runs).
"""
from __future__ import annotations

import abc
import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from serve.errors import (
    SeqExpired,
    ServeError,
    SessionIncompatible,
    SessionNotFound,
    StoreFull,
    StoreUnavailable,
    TooManySessions,
    from_wire,
    is_wire_error,
)
from serve.store_channel import OPS as STORE_OPS

if TYPE_CHECKING:
    from serve.config import SessionConfig

logger = logging.getLogger("ray.serve")


def new_session_id() -> str:
    """128 random bits, hex."""
    return secrets.token_hex(16)


# The store errors, one wording for every store.


def not_found(sid: str) -> SessionNotFound:
    return SessionNotFound(f"session {sid} not found (unknown, deleted or expired)")


def no_answer(sid: str, seq: int) -> SessionNotFound:
    return SessionNotFound(f"session {sid} has no answer for seq {seq}")


def not_retained(seq: int, retained: int, next_seq: int) -> SeqExpired:
    return SeqExpired(f"seq {seq} was applied but its answer is no longer retained "
                      f"(the last {retained} are); the session is at seq {next_seq - 1}")


def delta_needs_full(sid: str) -> SessionIncompatible:
    return SessionIncompatible(f"session {sid}: a delta checkpoint needs a full one before it")


def too_many_sessions(live: int, limit: int, retry_after_s: float) -> TooManySessions:
    return TooManySessions(f"{live} live sessions (limit {limit}); delete finished sessions or retry later",
                           retry_after_s=retry_after_s)


def store_full(held: int, limit: int, retry_after_s: float) -> StoreFull:
    return StoreFull(f"checkpoint store holds {held} bytes (limit {limit}); this page was not applied, "
                     "retry it later", retry_after_s=retry_after_s)


@dataclass
class SessionRecord:
    session_id: str
    model: str
    ttl_s: float
    last_access: float
    next_seq: int = 0
    chain: list[bytes] | None = None  # [full blob, delta, delta, ...]
    results: OrderedDict[int, dict] = field(default_factory=OrderedDict)

    def meta(self, now: float) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "model": self.model,
            "next_seq": self.next_seq,
            "expires_in_s": max(0.0, self.last_access + self.ttl_s - now),
            "ttl_s": self.ttl_s,
            "chain_bytes": [len(b) for b in self.chain] if self.chain else [],
            "last_result": next(reversed(self.results.values())) if self.results else None,
        }


class SessionTable:
    """The store's logic, shared by every implementation: TTL, limits, CAS.

    Limits: at most `max_sessions` live sessions and `max_store_bytes` of
    checkpoints; beyond either, TooManySessions / StoreFull carry a
    Retry-After of the time until the next session expires.
    """

    def __init__(self, max_sessions: int, max_store_bytes: int, results_retained: int = 64, clock=time.monotonic):
        self.max_sessions = max_sessions
        self.max_store_bytes = max_store_bytes
        self.results_retained = results_retained
        self.clock = clock
        self.sessions: dict[str, SessionRecord] = {}
        self.total_bytes = 0

    # --- housekeeping ---------------------------------------------------------

    def _expired(self, rec: SessionRecord, now: float) -> bool:
        return now >= rec.last_access + rec.ttl_s

    def sweep(self) -> int:
        """Drop expired sessions; return how many."""
        now = self.clock()
        dead = [sid for sid, r in self.sessions.items() if self._expired(r, now)]
        for sid in dead:
            self._drop(sid)
        return len(dead)

    def _drop(self, sid: str) -> SessionRecord | None:
        rec = self.sessions.pop(sid, None)
        if rec is not None and rec.chain:
            self.total_bytes -= sum(len(b) for b in rec.chain)
        return rec

    def _retry_after(self) -> float:
        now = self.clock()
        if not self.sessions:
            return 1.0
        return max(1.0, min(r.last_access + r.ttl_s - now for r in self.sessions.values()))

    def _get(self, sid: str) -> SessionRecord:
        rec = self.sessions.get(sid)
        now = self.clock()
        if rec is None or self._expired(rec, now):
            if rec is not None:
                self._drop(sid)
            raise not_found(sid)
        rec.last_access = now
        return rec

    # --- operations -------------------------------------------------------------

    def create(self, session_id: str, model: str, ttl_s: float) -> dict[str, Any]:
        if len(self.sessions) >= self.max_sessions:
            self.sweep()
            if len(self.sessions) >= self.max_sessions:
                raise too_many_sessions(len(self.sessions), self.max_sessions, self._retry_after())
        now = self.clock()
        rec = SessionRecord(session_id, model, ttl_s, now)
        self.sessions[session_id] = rec
        return rec.meta(now)

    def head(self, session_id: str) -> dict[str, Any]:
        return self._get(session_id).meta(self.clock())

    def load(self, session_id: str) -> tuple[dict[str, Any], list[bytes] | None]:
        rec = self._get(session_id)
        return rec.meta(self.clock()), list(rec.chain) if rec.chain else None

    def result(self, session_id: str, seq: int) -> dict[str, Any]:
        rec = self._get(session_id)
        if seq >= rec.next_seq:
            raise no_answer(session_id, seq)
        if seq not in rec.results:
            raise not_retained(seq, self.results_retained, rec.next_seq)
        return rec.results[seq]

    def commit(self, session_id: str, seq: int, blob: bytes, result: dict[str, Any], delta: bool = False) -> int | None:
        """Apply seq if the session expects it: None. Otherwise the session's
        next_seq (someone else applied it first; nothing changes).

        delta: `blob` extends the chain (it was made against the state after
        seq - 1, which is what the chain holds, since commits go in seq order);
        otherwise it replaces the chain."""
        rec = self._get(session_id)
        if rec.next_seq != seq:
            return rec.next_seq
        if delta and not rec.chain:
            raise delta_needs_full(session_id)
        old = 0 if delta or not rec.chain else sum(len(b) for b in rec.chain)
        if self.total_bytes - old + len(blob) > self.max_store_bytes:
            self.sweep()
            if self.total_bytes - old + len(blob) > self.max_store_bytes:
                raise store_full(self.total_bytes, self.max_store_bytes, self._retry_after())
        self.total_bytes += len(blob) - old
        rec.chain = rec.chain + [blob] if delta else [blob]
        rec.next_seq = seq + 1
        rec.results[seq] = result
        while len(rec.results) > self.results_retained:
            rec.results.popitem(last=False)
        return None

    def delete(self, session_id: str) -> dict[str, Any]:
        rec = self._get(session_id)
        meta = rec.meta(self.clock())
        self._drop(session_id)
        return meta

    def fill(self) -> dict[str, int]:
        """{sessions, bytes} as held now (expired sessions not swept yet included)."""
        return {"sessions": len(self.sessions), "bytes": self.total_bytes}

    def stats(self) -> dict[str, Any]:
        """Live sessions (expired ones are swept first), their checkpoint bytes, sessions per model."""
        self.sweep()
        per_model: dict[str, int] = {}
        for r in self.sessions.values():
            per_model[r.model] = per_model.get(r.model, 0) + 1
        return {**self.fill(), "per_model": per_model}


class StoreFillGauges:
    """bsbr_session_store_{bytes,max_bytes,sessions}, for the BsbrSessionStore*
    alerts (deploy/prometheus), which sum them over exporters: each store's
    fill must be exported once (the store actor; each replica for its own
    memory table; one lease holder for Redis)."""

    def __init__(self, max_store_bytes: int):
        from ray.util import metrics

        self.max_store_bytes = max_store_bytes
        self._bytes = metrics.Gauge("bsbr_session_store_bytes", description="checkpoint bytes held")
        self._max_bytes = metrics.Gauge("bsbr_session_store_max_bytes", description="sessions.max_store_bytes")
        self._sessions = metrics.Gauge("bsbr_session_store_sessions", description="live sessions in the store")

    def set(self, stats: dict[str, Any]) -> None:
        self._max_bytes.set(self.max_store_bytes)
        self._bytes.set(stats["bytes"])
        self._sessions.set(stats["sessions"])


class SessionStore(abc.ABC):
    """What the engine needs from a checkpoint store. Errors are ServeErrors
    (StoreUnavailable, 503, when the store cannot be reached)."""

    def connect(self) -> None:
        """Reach (or create) the backing store now rather than on first use."""

    async def report_fill(self) -> None:
        """Refresh the store-fill gauges; every model replica calls it once a
        second (serve/deployments.py). A no-op where someone else exports them."""

    @abc.abstractmethod
    async def create(self, session_id: str, model: str, ttl_s: float) -> dict[str, Any]: ...

    @abc.abstractmethod
    async def head(self, session_id: str) -> dict[str, Any]:
        """{session_id, model, next_seq, expires_in_s, ttl_s, last_result}; renews the TTL."""

    @abc.abstractmethod
    async def load(self, session_id: str) -> tuple[dict[str, Any], list[bytes] | None]:
        """(head, checkpoint chain [full, delta, ...] or None before the first page)."""

    @abc.abstractmethod
    async def result(self, session_id: str, seq: int) -> dict[str, Any]: ...

    @abc.abstractmethod
    async def commit(
        self, session_id: str, seq: int, blob: bytes, result: dict[str, Any], delta: bool = False,
    ) -> int | None:
        """Compare-and-set: None if applied, else the store's next_seq.
        delta=True appends blob to the session's chain, else it replaces it."""

    @abc.abstractmethod
    async def delete(self, session_id: str) -> dict[str, Any]: ...

    @abc.abstractmethod
    async def stats(self) -> dict[str, Any]: ...

    async def warm(self) -> None:
        """Open what this event loop's first operation would open (a replica's
        start calls it, so its first session page does not pay for it); failures
        are left to that first operation. A no-op where nothing is opened lazily."""


class MemorySessionStore(SessionStore):
    """The table in this process: for one replica, tests and benchmarks.
    Each replica exports its own table's fill (the alerts sum them)."""

    def __init__(self, max_sessions: int = 10_000, max_store_bytes: int = 4 << 30, results_retained: int = 64,
                 clock=time.monotonic):
        self.table = SessionTable(max_sessions, max_store_bytes, results_retained, clock)
        self._gauges: StoreFillGauges | None = None

    async def report_fill(self):
        if self._gauges is None:
            self._gauges = StoreFillGauges(self.table.max_store_bytes)
        self._gauges.set(self.table.stats())

    async def create(self, session_id, model, ttl_s):
        return self.table.create(session_id, model, ttl_s)

    async def head(self, session_id):
        return self.table.head(session_id)

    async def load(self, session_id):
        return self.table.load(session_id)

    async def result(self, session_id, seq):
        return self.table.result(session_id, seq)

    async def commit(self, session_id, seq, blob, result, delta=False):
        return self.table.commit(session_id, seq, blob, result, delta)

    async def delete(self, session_id):
        return self.table.delete(session_id)

    async def stats(self):
        return self.table.stats()


class SessionStoreActor:
    """Ray actor around a SessionTable (see RayActorSessionStore).

    Sweeps expired sessions and refreshes its gauges every `sweep_s`.
    Answers are plain values or wire errors (dicts), never pickled exceptions.
    Reached by Ray calls (`call`) and, once a client asks for its address, by
    the TCP channel of serve.store_channel. Both run each operation whole on
    the actor's event loop (no await inside one), so each is atomic.
    """

    def __init__(self, max_sessions: int, max_store_bytes: int, results_retained: int, sweep_s: float = 1.0):
        self.table = SessionTable(max_sessions, max_store_bytes, results_retained)
        self._max_store_bytes = max_store_bytes
        self._sweep_s = sweep_s
        self._sweeper: asyncio.Task | None = None
        self._gauges = StoreFillGauges(max_store_bytes)
        self._server: asyncio.AbstractServer | None = None
        self._server_lock: asyncio.Lock | None = None
        self._token = secrets.token_hex(16)
        self._report()
        try:
            self._ensure_sweeper()
        except RuntimeError:  # no event loop yet: the first call starts it
            pass

    def _report(self):
        # Set every second by the sweeper, so Ray keeps exporting them while idle.
        self._gauges.set(self.table.fill())

    def _ensure_sweeper(self):
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def _sweep_forever(self):
        while True:
            await asyncio.sleep(self._sweep_s)
            self.table.sweep()
            self._report()

    def _op(self, op: str, args) -> dict[str, Any]:
        try:
            return {"ok": getattr(self.table, op)(*args)}
        except ServeError as e:
            return e.to_wire()
        finally:
            if op in ("create", "commit", "delete"):
                self._report()

    async def call(self, op: str, *args):
        self._ensure_sweeper()
        if op not in STORE_OPS:
            raise ValueError(f"not a session store operation: {op!r}")
        return self._op(op, args)

    async def data_address(self) -> dict[str, Any]:
        """Where the TCP channel listens (started by the first ask) and its token."""
        import ray

        from serve.store_channel import serve_peer

        self._ensure_sweeper()
        if self._server_lock is None:
            self._server_lock = asyncio.Lock()
        async with self._server_lock:
            if self._server is None:
                host = ray.util.get_node_ip_address()
                max_blobs = self._max_store_bytes + (64 << 20)
                self._server = await asyncio.start_server(
                    lambda r, w: serve_peer(r, w, self._token, self._op, max_blobs), host, 0)
        host, port = self._server.sockets[0].getsockname()[:2]
        return {"host": host, "port": port, "token": self._token}

    async def ping(self) -> str:
        return "ok"


class RayActorSessionStore(SessionStore):
    """Client of the named detached `SessionStoreActor`, created on first use.

    Every replica on every node reaches the same actor by name; it outlives
    the Serve application (detached) until `ray.kill` or the cluster ends.
    With `channel="socket"` (the default, `sessions.store_channel`) the
    operations go over a TCP connection to the actor (serve.store_channel),
    one per event loop, and Ray calls only find it; one it cannot open
    (a firewall between nodes) is logged and Ray calls carry the operations
    for the next RETRY_SOCKET_S. A connection lost with calls in flight is
    503 `store_unavailable` for them, as a lost actor is over Ray: their
    clients repeat them, and the compare-and-set on seq makes a commit that
    did land answer its stored result.
    """

    NAMESPACE = "bsbr"
    RETRY_SOCKET_S = 30.0

    def __init__(self, name: str, max_sessions: int, max_store_bytes: int, results_retained: int = 64,
                 channel: str = "socket"):
        if channel not in ("socket", "ray"):
            raise ValueError(f"unknown store channel {channel!r}")
        self.name = name
        self.channel = channel
        self._args = (max_sessions, max_store_bytes, results_retained)
        self._actor = None
        self._channels: dict[asyncio.AbstractEventLoop, Any] = {}
        self._opening: dict[asyncio.AbstractEventLoop, asyncio.Future] = {}
        self._socket_off_until = 0.0
        self._socket_failures = 0  # in a row: the first is a warning, the next ones (every RETRY_SOCKET_S) info

    def connect(self) -> None:
        self._handle()

    def _handle(self):
        if self._actor is None:
            import ray

            cls = ray.remote(SessionStoreActor)
            self._actor = cls.options(
                name=self.name, namespace=self.NAMESPACE, lifetime="detached", get_if_exists=True,
                num_cpus=0, max_concurrency=1000,
            ).remote(*self._args)
        return self._actor

    def _lost(self, why: str) -> StoreUnavailable:
        self._actor = None
        return StoreUnavailable(f"session store unavailable: {why}", retry_after_s=1.0)

    async def _data_address(self) -> dict[str, Any] | None:
        """The channel's address; None from a store actor made by a version of
        bsbr-serve without one (a detached actor outlives the app's code)."""
        import ray

        actor = self._handle()
        if not hasattr(actor, "data_address"):
            return None
        try:
            return await actor.data_address.remote()
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
            raise self._lost(type(e).__name__) from None

    async def _socket(self):
        """This loop's channel to the actor; None while Ray calls carry the operations."""
        from serve.store_channel import Channel, ChannelClosed

        if self.channel != "socket" or time.monotonic() < self._socket_off_until:
            return None
        loop = asyncio.get_running_loop()
        ch = self._channels.get(loop)
        if ch is not None and not ch.closed:
            return ch
        for dead in [lp for lp in self._channels if lp.is_closed()]:  # loops of finished asyncio.run()s
            del self._channels[dead]
        opening = self._opening.get(loop)
        if opening is not None:
            return await asyncio.shield(opening)
        opening = self._opening[loop] = loop.create_future()
        try:
            addr = await self._data_address()
            try:
                if addr is None:
                    raise ChannelClosed("the store actor has no TCP channel (made by an older bsbr-serve)")
                ch = await Channel.open(addr["host"], addr["port"], addr["token"])
            except (OSError, asyncio.TimeoutError, ChannelClosed) as e:
                where = f"{addr['host']}:{addr['port']}" if addr else "its actor"
                logger.log(logging.WARNING if self._socket_failures == 0 else logging.INFO,
                           "session store %s: no TCP channel to %s (%s); Ray calls for the next %g s",
                           self.name, where, e, self.RETRY_SOCKET_S)
                self._socket_failures += 1
                self._socket_off_until = time.monotonic() + self.RETRY_SOCKET_S
                ch = None
            else:
                if self._socket_failures:
                    logger.info("session store %s: TCP channel open again", self.name)
                self._socket_failures = 0
                self._channels[loop] = ch
            opening.set_result(ch)
            return ch
        except BaseException as e:
            opening.set_exception(e)
            opening.exception()  # retrieved: the callers waiting on it re-raise it
            raise
        finally:
            self._opening.pop(loop, None)

    async def warm(self) -> None:
        """This loop's TCP channel, opened now: the first operation of a replica
        paid 20 ms for it (the actor's address over Ray, connect, token)."""
        try:
            await self._socket()
        except Exception:  # noqa: BLE001 - the first operation tries again and answers for it
            pass

    async def _call(self, op: str, *args):
        import ray

        from serve.store_channel import ChannelClosed

        ch = await self._socket()
        if ch is not None:
            try:
                out = await ch.call(op, args)
            except ChannelClosed as e:
                raise self._lost(f"its connection dropped ({e})") from None
        else:
            try:
                out = await self._handle().call.remote(op, *args)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                raise self._lost(type(e).__name__) from None
        if is_wire_error(out):
            raise from_wire(out)
        return out["ok"]

    async def create(self, session_id, model, ttl_s):
        return await self._call("create", session_id, model, ttl_s)

    async def head(self, session_id):
        return await self._call("head", session_id)

    async def load(self, session_id):
        meta, chain = await self._call("load", session_id)
        return meta, chain

    async def result(self, session_id, seq):
        return await self._call("result", session_id, seq)

    async def commit(self, session_id, seq, blob, result, delta=False):
        return await self._call("commit", session_id, seq, blob, result, delta)

    async def delete(self, session_id):
        return await self._call("delete", session_id)

    async def stats(self):
        return await self._call("stats")


def make_store(cfg: SessionConfig) -> SessionStore:
    """The store `sessions.store` names (serve.config.SessionConfig)."""
    args = (cfg.max_sessions, cfg.max_store_bytes, cfg.results_retained)
    if cfg.store == "ray_actor":
        return RayActorSessionStore(cfg.store_name, *args, channel=cfg.store_channel)
    if cfg.store == "memory":
        return MemorySessionStore(*args)
    if cfg.store == "redis":
        from serve.redis_store import RedisSessionStore

        return RedisSessionStore(cfg.redis_url, cfg.store_name, *args, timeout_s=cfg.redis_timeout_s)
    raise ValueError(f"unknown session store {cfg.store!r}")
