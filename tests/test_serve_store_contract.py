"""The session-store contract (docs/architecture.md 3.2, 6.3), held by every store.

`store_kit` is parametrized over the stores; a new store is a class in
serve/ plus one entry in STORES. Each test runs its whole body in one
event loop (an asyncio Redis client belongs to the loop it was made in).
The stores' clocks are moved by the tests (memory and redis: a fake clock
the store reads; ray_actor: the actor's table clock shifted in the actor),
so TTL tests neither sleep nor depend on the machine's speed.
"""
from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from conftest_serve import document
from test_serve_engine import as_tensor, make_engine, one_shot_logits

from serve import errors
from serve.config import SessionConfig
from serve.redis_store import RedisSessionStore, expand_env
from serve.store import (
    MemorySessionStore,
    RayActorSessionStore,
    SessionStore,
    make_store,
)

pytest_plugins = ["conftest_serve", "redis_helpers"]

# ray_actor: its operations over the TCP channel (the default); ray_actor_ray: over Ray calls.
STORES = ("memory", "ray_actor", "ray_actor_ray", "redis")


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@dataclass
class StoreKit:
    """make(**limits) -> a fresh, empty store; advance(seconds) moves the clock of every store made."""

    kind: str
    make: Callable[..., SessionStore]
    advance: Callable[[float], None]


@pytest.fixture(scope="module")
def ray_local():
    """The tests' shared Ray when it is up; otherwise a small one for this module."""
    import ray

    if ray.is_initialized():
        yield
        return
    ray.init(address="local", num_cpus=1, include_dashboard=False, object_store_memory=100 << 20,
             logging_level="warning", log_to_driver=False)
    yield
    ray.shutdown()


def _memory_kit() -> StoreKit:
    clock = Clock()

    def make(max_sessions=100, max_store_bytes=1 << 20, results_retained=64):
        return MemorySessionStore(max_sessions, max_store_bytes, results_retained, clock=clock)

    def advance(dt):
        clock.t += dt

    return StoreKit("memory", make, advance)


def _redis_kit(server) -> StoreKit:
    clock = Clock()

    def make(max_sessions=100, max_store_bytes=1 << 20, results_retained=64):
        return RedisSessionStore(server.url(), f"contract-{uuid.uuid4().hex[:12]}", max_sessions, max_store_bytes,
                                 results_retained, timeout_s=2.0, clock=clock)

    def advance(dt):
        clock.t += dt

    return StoreKit("redis", make, advance)


class _OverSocketOnly(RayActorSessionStore):
    """The default ray_actor store that fails a call Ray would carry (a fallback
    from the TCP channel would otherwise pass these tests unseen)."""

    async def _socket(self):
        ch = await super()._socket()
        assert ch is not None, "the store's TCP channel did not open"
        return ch


def _ray_actor_kit(request, channel: str) -> StoreKit:
    import ray

    request.getfixturevalue("ray_local")
    made: list[RayActorSessionStore] = []

    def make(max_sessions=100, max_store_bytes=1 << 20, results_retained=64):
        cls = _OverSocketOnly if channel == "socket" else RayActorSessionStore
        store = cls(f"contract-{uuid.uuid4().hex[:12]}", max_sessions, max_store_bytes, results_retained,
                    channel=channel)
        store.connect()
        made.append(store)
        return store

    def advance(dt):
        # Runs inside each actor (a nested function, so Ray ships it by value).
        def shift(actor, dt):
            base = actor.table.clock
            actor.table.clock = lambda: base() + dt

        ray.get([s._handle().__ray_call__.remote(shift, dt) for s in made])

    def kill_all():
        for s in made:
            ray.kill(s._handle(), no_restart=True)

    request.addfinalizer(kill_all)
    return StoreKit("ray_actor" if channel == "socket" else "ray_actor_ray", make, advance)


@pytest.fixture(params=STORES)
def store_kit(request) -> StoreKit:
    if request.param == "memory":
        return _memory_kit()
    if request.param == "redis":
        return _redis_kit(request.getfixturevalue("redis_server"))
    return _ray_actor_kit(request, "socket" if request.param == "ray_actor" else "ray")


def run(coro):
    return asyncio.run(coro)


# --- the table: compare-and-set, chains, TTL, limits ------------------------------------


def test_commit_is_compare_and_set_on_seq(store_kit):
    async def go():
        s = store_kit.make()
        await s.create("s", "bsbr", 60)
        assert await s.commit("s", 0, b"a", {"seq": 0}) is None
        assert await s.commit("s", 0, b"b", {"seq": 0, "again": True}) == 1  # a repeat changes nothing
        assert (await s.load("s"))[1] == [b"a"]
        assert await s.commit("s", 5, b"c", {"seq": 5}) == 1  # a gap changes nothing
        assert await s.result("s", 0) == {"seq": 0}
        # Deltas extend the chain, a full blob restarts it; the byte count follows.
        assert await s.commit("s", 1, b"dd", {"seq": 1}, True) is None
        meta, chain = await s.load("s")
        assert chain == [b"a", b"dd"] and meta["chain_bytes"] == [1, 2] and (await s.stats())["bytes"] == 3
        assert await s.commit("s", 2, b"full", {"seq": 2}) is None
        meta, chain = await s.load("s")
        assert chain == [b"full"] and (await s.stats())["bytes"] == 4
        assert meta["next_seq"] == 3 and meta["last_result"] == {"seq": 2} and meta["model"] == "bsbr"
        await s.create("fresh", "bsbr", 60)
        assert (await s.load("fresh"))[1] is None
        with pytest.raises(errors.SessionIncompatible):
            await s.commit("fresh", 0, b"d", {}, True)  # a delta needs a full blob before it

    run(go())


def test_concurrent_commits_of_one_seq_apply_it_once(store_kit):
    async def go():
        s = store_kit.make()
        await s.create("s", "bsbr", 60)
        outs = await asyncio.gather(*[s.commit("s", 0, bytes([i]) * 8, {"by": i}) for i in range(6)])
        winners = [i for i, o in enumerate(outs) if o is None]
        assert len(winners) == 1 and all(o == 1 for o in outs if o is not None)
        assert (await s.load("s"))[1] == [bytes([winners[0]]) * 8]
        assert await s.result("s", 0) == {"by": winners[0]} and (await s.stats())["bytes"] == 8

    run(go())


def test_blobs_and_answers_come_back_exactly(store_kit):
    blob = bytes(range(256)) * 3 + b"\x00"
    answer = {"seq": 0, "label": "bsbr \u00e9\u4e2d", "scores": {"a": 0.1 + 0.2, "b": 1e-300, "c": 2.0 / 3.0},
              "timing": {"page_ms": [1.5, 2.25]}, "final": False, "x": None}

    async def go():
        s = store_kit.make()
        await s.create("s", "bsbr", 60)
        await s.commit("s", 0, blob, answer)
        meta, chain = await s.load("s")
        return chain, await s.result("s", 0), meta, await s.head("s")

    chain, got, meta, head = run(go())
    assert chain == [blob] and got == answer and meta["last_result"] == answer == head["last_result"]
    assert head["session_id"] == "s" and head["ttl_s"] == 60 and head["expires_in_s"] == pytest.approx(60)


def test_sessions_expire_after_idle_ttl(store_kit):
    async def go():
        s = store_kit.make()
        await s.create("s", "bsbr", 60)
        await s.commit("s", 0, b"12345", {"seq": 0})
        store_kit.advance(59)
        await s.head("s")  # any access renews the TTL
        store_kit.advance(59)
        await s.load("s")
        store_kit.advance(59)
        assert await s.result("s", 0) == {"seq": 0}
        assert (await s.stats())["sessions"] == 1
        store_kit.advance(61)
        for op in (s.head("s"), s.load("s"), s.result("s", 0), s.commit("s", 1, b"x", {}), s.delete("s")):
            with pytest.raises(errors.SessionNotFound):
                await op
        stats = await s.stats()
        assert stats["sessions"] == 0 and stats["bytes"] == 0  # its bytes went with it

    run(go())


def test_limits_answer_429_with_retry_after(store_kit):
    async def go():
        s = store_kit.make(max_sessions=2, max_store_bytes=10)
        await s.create("a", "bsbr", 30)
        store_kit.advance(10)
        await s.create("b", "bsbr", 30)
        with pytest.raises(errors.TooManySessions) as e:
            await s.create("c", "bsbr", 30)
        assert e.value.status == 429 and e.value.retry_after_s == pytest.approx(20, abs=0.5)
        assert e.value.retry_after_header == "20"
        await s.commit("a", 0, b"12345678", {})
        with pytest.raises(errors.StoreFull) as full:
            await s.commit("b", 0, b"12345", {})
        assert full.value.status == 429 and full.value.retry_after_s >= 1
        assert (await s.stats())["bytes"] == 8
        # A full blob replacing a session's chain counts only the difference.
        assert await s.commit("a", 1, b"123456789", {}) is None
        await s.delete("a")
        assert (await s.stats())["bytes"] == 0
        assert await s.commit("b", 0, b"12345", {}) is None
        await s.create("c", "bsbr", 30)
        store_kit.advance(31)
        await s.create("d", "bsbr", 30)  # b and c expired: room again
        stats = await s.stats()
        assert stats["sessions"] == 1 and stats["bytes"] == 0

    run(go())


def test_old_answers_are_dropped_beyond_results_retained(store_kit):
    async def go():
        s = store_kit.make(results_retained=2)
        await s.create("s", "bsbr", 60)
        for seq in range(3):
            await s.commit("s", seq, b"x", {"seq": seq})
        with pytest.raises(errors.SeqExpired):
            await s.result("s", 0)
        assert [await s.result("s", q) for q in (1, 2)] == [{"seq": 1}, {"seq": 2}]
        with pytest.raises(errors.SessionNotFound):
            await s.result("s", 3)  # not applied yet

    run(go())


def test_delete_returns_the_last_answer_and_forgets_the_session(store_kit):
    async def go():
        s = store_kit.make()
        await s.create("s", "bsbr", 60)
        await s.create("t", "standard", 60)
        await s.commit("s", 0, b"abc", {"seq": 0})
        assert (await s.stats())["per_model"] == {"bsbr": 1, "standard": 1}
        meta = await s.delete("s")
        assert meta["last_result"] == {"seq": 0} and meta["next_seq"] == 1
        for op in (s.head("s"), s.delete("s"), s.commit("s", 1, b"x", {})):
            with pytest.raises(errors.SessionNotFound):
                await op
        assert await s.stats() == {"sessions": 1, "bytes": 0, "per_model": {"standard": 1}}

    run(go())


# --- the engine on every store --------------------------------------------------------------


@pytest.mark.parametrize("name", ["bsbr", "standard"])
def test_checkpoints_are_delta_chains_that_resume_exactly(store_kit, dev_models, name):
    """After each page the store gets only the page's delta (a full blob when the
    deltas would outgrow the last one), and a replica that never saw the
    session resumes it from the chain with the same answer."""
    store = store_kit.make(max_store_bytes=1 << 30)
    a, b = make_engine(dev_models, name, store), make_engine(dev_models, name, store)
    pages = document(41)

    async def go():
        chain_lengths, written = [], 0
        sid = (await a.create_session())["session_id"]
        for i, p in enumerate(pages[:40]):
            await a.append(sid, i, pages=[p])
            meta = await store.head(sid)
            chain_lengths.append(len(meta["chain_bytes"]))
            written += meta["chain_bytes"][-1]
        state_bytes = len(a.hot[sid].state.to_bytes())
        chain_bytes = sum((await store.head(sid))["chain_bytes"])
        on_b = await b.append(sid, 40, pages=[pages[40]])  # b resumes from the store's chain
        return chain_lengths, written, state_bytes, chain_bytes, on_b

    chain_lengths, written, state_bytes, chain_bytes, on_b = run(go())
    assert max(chain_lengths) > 5                      # deltas were appended
    assert chain_lengths.count(1) <= 8                 # full blobs only now and then (geometric)
    assert chain_bytes <= 2.5 * state_bytes            # the chain stays about the state's size
    assert written < 40 * state_bytes / 4              # far less than a full blob per page
    assert (as_tensor(a.labels, on_b["logits"]) - one_shot_logits(a, pages).double()).abs().max() <= 1e-4


def test_stale_hot_state_is_never_used(store_kit, dev_models):
    """Two replicas share a store; one serves a page while the other holds an
    older hot copy: the other must resume from the store, not from its copy."""
    store = store_kit.make(max_store_bytes=1 << 30)
    a, b = make_engine(dev_models, store=store), make_engine(dev_models, store=store)
    pages = document(4)

    async def go():
        sid = (await a.create_session())["session_id"]
        await a.append(sid, 0, pages=[pages[0]])
        await b.append(sid, 1, pages=[pages[1]])  # b resumes from the store
        await b.append(sid, 2, pages=[pages[2]])
        last = await a.append(sid, 3, pages=[pages[3]])  # a's hot copy is at seq 1: stale
        # A retry of seq 1 routed to a, whose hot copy expects exactly seq 1:
        repeat = await a.append(sid, 1, pages=[pages[1]])
        return last, repeat, await b.append(sid, 1, pages=[pages[1]])

    last, repeat, repeat_b = run(go())
    assert (as_tensor(a.labels, last["logits"]) - one_shot_logits(a, pages).double()).abs().max() <= 1e-4
    assert last["num_pages"] == 4 and repeat["seq"] == 1 and repeat == repeat_b


def test_store_full_is_429_and_the_session_continues(store_kit, dev_models):
    """A page the store has no room for is refused (nothing applied); once
    another session is deleted, the same page goes through."""
    async def first_blob_bytes():
        probe = make_engine(dev_models)
        sid = (await probe.create_session())["session_id"]
        await probe.append(sid, 0, text="a page")
        return probe.hot[sid].chain_bytes[0]

    limit = run(first_blob_bytes()) + 10
    store = store_kit.make(max_store_bytes=limit)
    eng = make_engine(dev_models, store=store)

    async def go():
        first = (await eng.create_session())["session_id"]
        await eng.append(first, 0, text="a page")
        second = (await eng.create_session())["session_id"]
        with pytest.raises(errors.StoreFull) as e:
            await eng.append(second, 0, text="a page")
        assert (await eng.get(second))["seq"] is None  # nothing applied
        await eng.close(first)
        return e.value, await eng.append(second, 0, text="a page")

    err, ok = run(go())
    assert err.retry_after_s and ok["seq"] == 0 and ok["num_pages"] == 1


def test_sessions_of_another_model_are_not_found(store_kit, dev_models):
    store = store_kit.make()
    a, b = make_engine(dev_models, "bsbr", store), make_engine(dev_models, "standard", store)

    async def go():
        sid = (await a.create_session())["session_id"]
        with pytest.raises(errors.SessionNotFound):
            await b.append(sid, 0, text="x y z")
        with pytest.raises(errors.SessionNotFound):
            await b.get(sid)

    run(go())


# --- choosing a store; what only Redis has ------------------------------------------------


def test_the_config_names_the_store():
    assert type(make_store(SessionConfig(store="memory"))) is MemorySessionStore
    assert type(make_store(SessionConfig(store="ray_actor"))) is RayActorSessionStore
    assert make_store(SessionConfig(store="ray_actor")).channel == "socket"
    assert make_store(SessionConfig(store="ray_actor", store_channel="ray")).channel == "ray"
    store = make_store(SessionConfig(store="redis", redis_url="redis://127.0.0.1:1/3", store_name="x"))
    assert type(store) is RedisSessionStore and store.prefix == "{x}:"
    with pytest.raises(ValueError, match="redis_url"):
        SessionConfig(store="redis")
    with pytest.raises(ValueError):
        SessionConfig(store="redis", redis_url="http://127.0.0.1:6379")


def test_redis_url_takes_the_password_from_the_environment(monkeypatch):
    monkeypatch.setenv("BSBR_TEST_REDIS_PW", "p@ss/word")
    assert expand_env("redis://:${BSBR_TEST_REDIS_PW}@redis:6379/1") == "redis://:p%40ss%2Fword@redis:6379/1"
    monkeypatch.delenv("BSBR_TEST_REDIS_PW")
    with pytest.raises(ValueError, match="BSBR_TEST_REDIS_PW"):
        expand_env("redis://:${BSBR_TEST_REDIS_PW}@redis:6379/1")


def _all_ops(s: SessionStore):
    return [s.create("s", "bsbr", 60), s.head("s"), s.load("s"), s.result("s", 0),
            s.commit("s", 0, b"x", {}), s.delete("s"), s.stats()]


def test_an_unreachable_redis_is_store_unavailable_with_retry_after():
    from conftest_serve import free_port

    s = RedisSessionStore(f"redis://127.0.0.1:{free_port()}/0", "down", 10, 1 << 20, timeout_s=0.5)

    async def go():
        for op in _all_ops(s):
            with pytest.raises(errors.StoreUnavailable) as e:
                await op
            assert e.value.status == 503 and e.value.retry_after_header

    run(go())


def test_a_hung_redis_times_out_as_store_unavailable(redis_server):
    """A Redis that accepts connections but never answers (SIGSTOP): every call
    ends within the socket timeout (and its one retry), never hangs."""
    s = RedisSessionStore(redis_server.url(), f"hung-{uuid.uuid4().hex[:8]}", 10, 1 << 20, timeout_s=0.3)

    async def go():
        await s.create("s", "bsbr", 60)  # connected while it answers
        os.kill(redis_server.proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(errors.StoreUnavailable):
                # A hang would end here, in wait_for's TimeoutError, and fail the test.
                await asyncio.wait_for(s.commit("s", 0, b"x", {"seq": 0}), 20)
        finally:
            os.kill(redis_server.proc.pid, signal.SIGCONT)
        # Redis now runs the commands it had queued: the page may have been
        # applied after all. The retry of the same seq applies it at most once.
        assert await s.commit("s", 0, b"x", {"seq": 0}) in (None, 1)
        assert (await s.load("s"))[1] == [b"x"] and await s.result("s", 0) == {"seq": 0}
        assert (await s.stats())["bytes"] == 1

    run(go())


def test_one_redis_client_exports_the_fill_gauges(redis_server):
    name = f"lease-{uuid.uuid4().hex[:8]}"
    a, b = (RedisSessionStore(redis_server.url(), name, 10, 1 << 20) for _ in range(2))

    async def go():
        return [await a.holds_gauge_lease(), await b.holds_gauge_lease(), await a.holds_gauge_lease(),
                await b.holds_gauge_lease()]

    assert run(go()) == [True, False, True, False]


def test_redis_keys_carry_the_session_ttl(redis_server):
    """Without a test clock: every key of a session expires with it (Redis frees an
    abandoned session by itself), and an access renews them all."""
    import redis

    name = f"ttl-{uuid.uuid4().hex[:8]}"
    s = RedisSessionStore(redis_server.url(), name, 10, 1 << 20)
    raw = redis.Redis.from_url(redis_server.url())

    async def go():
        await s.create("s", "bsbr", 30)
        await s.commit("s", 0, b"blob", {"seq": 0})
        keys = [f"{{{name}}}:{k}:s" for k in "mcr"]
        first = [raw.pttl(k) for k in keys]
        raw.pexpire(keys[0], 1000)  # as if most of the TTL had passed ...
        await s.head("s")  # ... an access renews every key
        return first, [raw.pttl(k) for k in keys]

    try:
        first, renewed = run(go())
    finally:
        raw.close()
    assert all(25_000 < t <= 30_000 for t in first + renewed), (first, renewed)
