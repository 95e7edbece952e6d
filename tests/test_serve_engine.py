"""The serve engine, store, pages, config and router, in-process (no Ray, no HTTP)."""
from __future__ import annotations

import asyncio
import time

import pytest
import torch
from conftest_serve import document

from bsbr_core import InputError
from serve import errors
from serve.config import (
    DEFAULT_MAX_TOKENS_STANDARD,
    AppConfig,
    ModelSpec,
    SessionConfig,
    discover_models,
)
from serve.engine import apportion, load_engine
from serve.metrics import EngineMetrics
from serve.pages import text_pages, tokenize_document
from serve.router import (
    PREFERRED_PATIENCE_S,
    SessionAffinityRouter,
    rendezvous_rank,
    session_of_request,
    session_ranks,
)
from serve.store import MemorySessionStore

pytest_plugins = ["conftest_serve"]


def run(coro):
    return asyncio.run(coro)


def make_engine(models, name="bsbr", store=None, **spec):
    spec = ModelSpec(name=name, path=str(models / name), page_tokens=64, **spec)
    return load_engine(name, spec, SessionConfig(), store or MemorySessionStore())


def one_shot_logits(engine, pages: list[str]) -> torch.Tensor:
    """The model's parallel form over the whole document (the reference answer)."""
    ids = [i for p in pages for i in engine.tokenizer.encode(p, add_special_tokens=False).ids]
    with torch.no_grad():
        return engine.model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0]


def as_tensor(labels, logits: dict) -> torch.Tensor:
    return torch.tensor([logits[k] for k in labels], dtype=torch.float64)


# --- pages --------------------------------------------------------------------------------


class _Tok:
    """Stand-in tokenizer: one id per character."""

    class _Enc:
        def __init__(self, text):
            self.ids = [ord(c) % 256 for c in text]

    def encode(self, text, add_special_tokens=False):
        return self._Enc(text)

    def encode_batch(self, texts, add_special_tokens=False):
        return [self._Enc(t) for t in texts]


def test_form_feeds_make_pages_and_a_trailing_one_is_dropped():
    assert text_pages("a\fb\f") == ["a", "b"]
    assert text_pages("a\f\fb") == ["a", "", "b"]  # a blank page inside counts
    assert text_pages("no feeds") is None


def test_text_without_form_feeds_is_cut_into_page_tokens():
    pages = tokenize_document(_Tok(), "x" * 150, None, 64)
    assert [len(p) for p in pages] == [64, 64, 22]


@pytest.mark.parametrize("text", ["", "   ", "\n\t ", "\f\f", " \f "])
def test_empty_documents_are_rejected(text):
    with pytest.raises(errors.EmptyDocument):
        tokenize_document(_Tok(), text, None, 64)
    with pytest.raises(errors.EmptyDocument):
        tokenize_document(_Tok(), None, [text], 64)


def test_lone_surrogates_are_rejected():
    with pytest.raises(errors.InvalidEncoding):
        tokenize_document(_Tok(), "ok \ud800 not ok", None, 64)


# --- config -------------------------------------------------------------------------------


def test_standard_gets_the_lower_default_token_limit():
    spec = ModelSpec(name="standard", path="x")
    assert spec.resolved_max_tokens("standard") == DEFAULT_MAX_TOKENS_STANDARD == 32768
    assert spec.resolved_max_tokens("bsbr") > 32768
    assert ModelSpec(name="s", path="x", max_tokens=10).resolved_max_tokens("standard") == 10


def test_config_rejects_bad_values():
    with pytest.raises(ValueError):
        AppConfig.model_validate({"models": [{"name": "api", "path": "x"}]})  # reserved for the ingress
    with pytest.raises(ValueError):
        AppConfig.model_validate({"models": [{"name": "a", "path": "x"}, {"name": "a", "path": "y"}]})
    with pytest.raises(ValueError):
        AppConfig.model_validate({"models": [{"name": "a", "path": "x", "backend": "tensorrt"}]})
    with pytest.raises(ValueError):
        AppConfig.model_validate({"sessoins": {}})  # typo: unknown key
    with pytest.raises(ValueError):
        AppConfig.model_validate({"topology": "mesh"})
    assert AppConfig.model_validate({}).topology == "split"


def test_a_fused_replica_asks_for_the_most_any_model_asks_for():
    from serve.app import fused_resources

    cfg = AppConfig.model_validate({
        "models": [{"name": "a", "path": "x", "ray_actor_options": {"num_cpus": 2, "num_gpus": 0.5}},
                   {"name": "b", "path": "y", "ray_actor_options": {"num_cpus": 1, "num_gpus": 1}}],
        "ingress": {"ray_actor_options": {"num_cpus": 0.5, "memory": 1 << 30}}})
    assert fused_resources(cfg) == {"num_cpus": 2.0, "num_gpus": 1.0, "memory": 1 << 30}


def test_models_are_discovered_bsbr_first(dev_models):
    assert [s.name for s in discover_models(dev_models)] == ["bsbr", "standard"]
    with pytest.raises(FileNotFoundError, match="init-models --random"):
        AppConfig(models_dir=str(dev_models / "nothing-here")).with_discovered_models()


def test_unknown_backend_fails_clearly(dev_models):
    spec = ModelSpec(name="bsbr", path=str(dev_models / "bsbr")).model_copy(update={"backend": "tensorrt"})
    with pytest.raises(errors.BackendUnsupported, match="unknown backend"):
        load_engine("bsbr", spec, SessionConfig(), MemorySessionStore())


@pytest.mark.slow
def test_onnx_backend_gives_the_torch_answer(dev_models, tmp_path):
    pytest.importorskip("onnxruntime")
    import shutil

    shutil.copytree(dev_models / "bsbr", tmp_path / "bsbr")  # the export writes next to the checkpoint
    onnx = make_engine(tmp_path, backend="onnx")
    torch_ = make_engine(dev_models)
    pages = document(6)
    a, b = run(onnx.classify(pages=pages)), run(torch_.classify(pages=pages))
    assert a["logits"] == pytest.approx(b["logits"], abs=1e-4) and onnx.info()["backend"] == "onnx"


# --- store (the store contract itself: tests/test_serve_store_contract.py) ---------------


def test_errors_cross_process_boundaries_as_data():
    e = errors.StoreFull("full", retry_after_s=2.5)
    back = errors.from_wire(e.to_wire())
    assert type(back) is errors.StoreFull and back.status == 429 and back.retry_after_header == "3"


# --- router -------------------------------------------------------------------------------


def test_rendezvous_ranking_is_stable_and_moves_few_sessions():
    replicas = ["r1", "r2", "r3"]
    sessions = [f"{i:032x}" for i in range(300)]
    first = {s: rendezvous_rank(s, replicas)[0] for s in sessions}
    assert first == {s: rendezvous_rank(s, list(reversed(replicas)))[0] for s in sessions}
    assert len(set(first.values())) == 3
    # Losing r3 moves only r3's sessions.
    after = {s: rendezvous_rank(s, ["r1", "r2"])[0] for s in sessions}
    assert all(after[s] == first[s] for s in sessions if first[s] != "r3")


class _FakeReplica:
    """What Serve's routing loop asks of a replica: its id, its limit, its queue length.
    The first `slow_probes` probes answer only after their deadline (a busy machine)."""

    def __init__(self, uid: str, slow_probes: int = 0, queue_len: int = 0, max_ongoing: int = 4):
        from ray.serve._private.common import DeploymentID, ReplicaID

        self.replica_id = ReplicaID(unique_id=uid, deployment_id=DeploymentID(name="bsbr", app_name="t"))
        self.max_ongoing_requests = max_ongoing
        self.slow_probes, self.queue_len, self.probes = slow_probes, queue_len, 0

    async def get_queue_len(self, *, deadline_s: float) -> int:
        self.probes += 1
        if self.probes <= self.slow_probes:
            await asyncio.sleep(deadline_s + 0.05)
        return self.queue_len


def _route(replicas: list[_FakeReplica], session_id: str) -> str:
    """The replica Serve's own routing loop picks with SessionAffinityRouter, every
    queue length unknown (as after 10 s without traffic), so each is probed."""
    from ray.serve._private.common import (
        DeploymentHandleSource,
        DeploymentID,
        RequestMetadata,
    )
    from ray.serve.request_router import PendingRequest

    async def go():
        router = SessionAffinityRouter(deployment_id=DeploymentID(name="bsbr", app_name="t"),
                                       handle_source=DeploymentHandleSource.UNKNOWN, use_replica_queue_len_cache=True)
        slow = [r.slow_probes for r in replicas]
        for r in replicas:
            r.slow_probes = 0
        router.update_replicas(replicas)
        await asyncio.sleep(0.2)  # Serve probes new replicas once
        for r, n in zip(replicas, slow):
            router.replica_queue_len_cache.invalidate_key(r.replica_id)
            r.slow_probes, r.probes = n, 0
        meta = RequestMetadata(request_id="r", internal_request_id="i", session_id=session_id)
        got = await asyncio.wait_for(router._choose_replica_for_request(PendingRequest(args=[], kwargs={}, metadata=meta)),
                                     PREFERRED_PATIENCE_S + 5)
        return got.replica_id.unique_id

    return run(go())


def test_a_session_waits_for_its_replica_when_a_queue_length_probe_is_slow():
    """The cause of a session's pages reaching both replicas: Serve probes a
    replica's queue length with a 0.1 s deadline, and on a busy machine the
    preferred replica answered late; the router then offered the next in rank.
    Now it asks the preferred one again (longer deadlines) and only it."""
    sessions = [f"{i:032x}" for i in range(6)]
    for sid in sessions:
        ids = ["r1", "r2", "r3"]
        preferred = rendezvous_rank(sid, ids)[0]  # the naive rule: rank over every replica
        replicas = [_FakeReplica(u, slow_probes=2 if u == preferred else 0) for u in ids]
        assert _route(replicas, sid) == preferred
        assert replicas[ids.index(preferred)].probes == 3


def test_a_full_preferred_replica_passes_the_session_on_in_rank_order():
    sid = "ab" * 16
    ids = ["r1", "r2", "r3"]
    rank = rendezvous_rank(sid, ids)
    replicas = {u: _FakeReplica(u, queue_len=4 if u == rank[0] else 0) for u in ids}  # max_ongoing 4
    assert _route(list(replicas.values()), sid) == rank[1]


def test_session_ranks_wait_for_the_preferred_replica_then_fall_back():
    reps = [_FakeReplica(u) for u in ("a", "b", "c")]
    ids = {"a", "b", "c"}
    assert session_ranks(reps, ids, preferred_full=False, waited_s=0.0) == [[reps[0]]]
    assert session_ranks(reps, ids, preferred_full=True, waited_s=0.0) == [[r] for r in reps]
    assert session_ranks(reps, ids, preferred_full=False, waited_s=PREFERRED_PATIENCE_S) == [[r] for r in reps]
    # The preferred one is not offered right now: nothing this round (Serve backs off and asks again) ...
    assert session_ranks(reps, {"b", "c"}, preferred_full=False, waited_s=0.0) == []
    # ... until the patience is spent; then the others, in rank order.
    assert session_ranks(reps, {"b", "c"}, preferred_full=False, waited_s=60.0) == [[reps[1]], [reps[2]]]


def _proxy_request(path: str, headers: list[tuple[bytes, bytes]] = (), session_header: str = ""):
    """What Serve's HTTP proxy hands an ingress replica's router: its own request
    serialisation of the ASGI scope (ray.serve._private.proxy_request_response)."""
    from types import SimpleNamespace

    from ray.serve._private.proxy_request_response import ASGIProxyRequest

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "server": ("127.0.0.1", 8000),
             "client": ("127.0.0.1", 5555), "scheme": "http", "method": "POST", "root_path": "",
             "path": path, "raw_path": path.encode(), "query_string": b"", "headers": list(headers)}
    arg = ASGIProxyRequest(scope, None, None).serialized_replica_arg(proxy_actor_name="SERVE_PROXY_ACTOR-x")
    return SimpleNamespace(args=[arg], kwargs={}, metadata=SimpleNamespace(session_id=session_header))


def test_the_router_reads_the_session_of_a_proxied_http_request_from_its_path():
    sid, other = "0123456789abcdef" * 2, "fedcba9876543210" * 2
    assert session_of_request(_proxy_request(f"/v1/sessions/{sid}/pages")) == sid
    assert session_of_request(_proxy_request(f"/fused/v1/sessions/{sid}")) == sid  # under a route prefix
    # The path, not a header that names another session.
    assert session_of_request(_proxy_request(f"/v1/sessions/{sid}", [(b"referer", f"/v1/sessions/{other}".encode())])) == sid
    assert session_of_request(_proxy_request("/v1/classify", [(b"referer", f"/v1/sessions/{other}".encode())])) == ""
    long_prefix = "/" + "p" * 300  # a path too long for pickle's short string
    assert session_of_request(_proxy_request(f"{long_prefix}/v1/sessions/{sid}/pages")) == sid
    assert session_of_request(_proxy_request("/v1/sessions")) == ""
    assert session_of_request(_proxy_request(f"/v1/sessions/{sid}0")) == ""  # not a session id
    # A call from the split topology's ingress names it in the metadata.
    assert session_of_request(_proxy_request("/v1/classify", session_header=other)) == other


# --- engine -------------------------------------------------------------------------------


def test_a_new_sessions_first_page_needs_no_store_read_and_gives_the_same_answer(dev_models):
    """create_session keeps the empty state hot on the replica that made it (the
    ingress routes the call by the id it drew); its first page then skips the
    store's load, and answers as a session resumed from the store does."""
    eng = make_engine(dev_models)
    page = document(1, seed=8)[0]
    loads = []
    real = eng.store.load

    async def counted(sid):
        loads.append(sid)
        return await real(sid)

    eng.store.load = counted

    async def go():
        hot = (await eng.create_session(session_id="c" * 32))["session_id"]
        a = await eng.append(hot, 0, pages=[page])
        cold = (await eng.create_session())["session_id"]
        eng._drop_hot(cold)  # as if its first page reached another replica
        b = await eng.append(cold, 0, pages=[page])
        return hot, a, cold, b

    hot, a, cold, b = run(go())
    assert hot == "c" * 32 and loads == [cold]
    assert a["logits"] == b["logits"] and a["num_tokens"] == b["num_tokens"] and a["num_pages"] == b["num_pages"] == 1


def test_all_torch_work_of_an_engine_runs_on_its_one_torch_thread(dev_models, monkeypatch):
    """Loading, steps, checkpoints and restores of an engine run on one thread of
    its own: libgomp gives each thread that opens a parallel region an OpenMP
    team, and a second team throttles the first one's spin-wait (serve.engine
    module docstring; bench/omp_teams.py measures it). Two engines (a fused
    replica) have a thread each, so one model's long step never holds up the other."""
    import threading

    import bsbr_core.backends
    from bsbr_core import State

    threads: dict[str, set[str]] = {}
    ran_on: dict[str, threading.Thread] = {}

    def on_thread(what, fn):
        def wrapper(*a, **k):
            me = threading.current_thread()
            threads.setdefault(what, set()).add(me.name.rsplit("_", 1)[0])
            ran_on[me.name.rsplit("_", 1)[0]] = me
            return fn(*a, **k)
        return wrapper

    monkeypatch.setattr(bsbr_core.backends, "load_backend", on_thread("load", bsbr_core.backends.load_backend))
    monkeypatch.setattr(State, "to_bytes", on_thread("checkpoint", State.to_bytes))
    monkeypatch.setattr(State, "from_bytes", classmethod(on_thread("restore", State.from_bytes.__func__)))
    pages = document(3, seed=5)

    async def go(eng):
        sid = (await eng.create_session())["session_id"]
        await eng.append(sid, 0, pages=pages[:2])
        eng._drop_hot(sid)  # the next page resumes from the store's checkpoint chain
        await eng.append(sid, 1, pages=pages[2:])
        await eng.classify(pages=pages)

    engines = []
    for name in ("bsbr", "standard"):  # both alive at once, as in a fused replica
        threads.clear()
        eng = make_engine(dev_models, name)
        eng.model.step_many = on_thread("step", eng.model.step_many)
        engines.append(eng)
        run(go(eng))
        assert set(threads) == {"load", "step", "checkpoint", "restore"}, threads
        assert set().union(*threads.values()) == {f"torch-{eng.name}"}, threads
    assert engines[0].batcher.executor is not engines[1].batcher.executor
    for eng in engines:  # shutdown ends the thread, and its OpenMP team with it
        eng.shutdown()
        assert not ran_on[f"torch-{eng.name}"].is_alive()


def test_an_idle_torch_thread_ends_and_the_next_work_starts_a_new_one():
    """TorchThread ends its thread after idle_s without work (the OpenMP team of an
    idle model in a fused replica goes with it), never while work is queued or
    running, and runs the next work on a new thread, one piece at a time in order."""
    import threading

    from serve.engine import TorchThread

    t = TorchThread("m", idle_s=0.3)
    first = t.submit(threading.current_thread).result(5)
    assert first.name.startswith("torch-m") and first is not threading.current_thread()
    # Work that outlasts idle_s, then more queued behind it: no retirement meanwhile.
    gate = threading.Event()
    order: list[int] = []
    slow = t.submit(lambda: (gate.wait(5), order.append(0), threading.current_thread())[2])
    rest = [t.submit(lambda i=i: (order.append(i), threading.current_thread())[1]) for i in (1, 2, 3)]
    time.sleep(0.8)
    assert first.is_alive() and t.retired == 0
    gate.set()
    assert {slow.result(5), *(f.result(5) for f in rest)} == {first} and order == [0, 1, 2, 3]
    # Idle past idle_s: the thread ends.
    deadline = time.monotonic() + 5
    while first.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not first.is_alive() and t.retired == 1
    second = t.submit(threading.current_thread).result(5)
    assert second is not first and second.name.startswith("torch-m")
    # Work submitted just as the timer would fire keeps the thread.
    for _ in range(6):
        time.sleep(0.2)
        assert t.submit(threading.current_thread).result(5) is second
    assert t.retired == 1
    t.shutdown(wait=True)
    assert not second.is_alive()
    with pytest.raises(RuntimeError, match="shut down"):
        t.submit(int)
    never = TorchThread("n", idle_s=None)  # idle_s None: the thread stays
    th = never.submit(threading.current_thread).result(5)
    time.sleep(0.5)
    assert th.is_alive() and never.retired == 0
    never.shutdown()
    assert not th.is_alive()


def test_a_retired_torch_thread_changes_no_answer(dev_models):
    """An engine whose torch thread ended between pages goes on on a new one with
    the same answers as one that kept its thread."""
    pages = document(4, seed=9)

    async def read(eng):
        sid = (await eng.create_session())["session_id"]
        out = [await eng.append(sid, 0, pages=pages[:2])]
        if eng.batcher.executor.idle_s is not None:
            deadline = time.monotonic() + 10
            while eng.batcher.executor.retired == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert eng.batcher.executor.retired >= 1
        out.append(await eng.append(sid, 1, pages=pages[2:]))
        return [o["logits"] for o in out]

    eng = make_engine(dev_models, "bsbr")
    eng.batcher.executor.idle_s = 0.2
    kept = make_engine(dev_models, "bsbr")
    kept.batcher.executor.idle_s = None
    try:
        assert run(read(eng)) == run(read(kept))
    finally:
        eng.shutdown()
        kept.shutdown()


def test_a_long_text_is_tokenised_in_pieces_to_the_ids_of_one_encode(dev_models):
    """Text without form feeds goes through bsbr_core's piecewise encode (encode_batch,
    which lets go of the GIL), and its pages hold exactly the ids of one encode()."""
    from bsbr_core.tokenizer import PIECE_CHARS, load_tokenizer

    tok = load_tokenizer(dev_models / "bsbr" / "tokenizer.json")
    text = "\n".join(document(400, words_per_page=12, seed=21))
    assert len(text) > 3 * PIECE_CHARS  # several pieces
    pages = tokenize_document(tok, text, None, 64)
    assert [i for p in pages for i in p] == tok.encode(text, add_special_tokens=False).ids
    assert all(len(p) == 64 for p in pages[:-1])


def test_long_documents_are_tokenised_off_the_event_loop_with_the_same_answer(dev_models):
    """Over tokenize_inline_chars a document is tokenised in the engine's tokenize
    thread, so the event loop serves other requests meanwhile; a short one stays on
    the loop. Either way the answer is the same."""
    import threading

    eng = make_engine(dev_models)
    seen = []
    real = eng.tokenize

    def recorded(text, pages):
        seen.append(threading.current_thread().name)
        return real(text, pages)

    eng.tokenize = recorded
    doc = document(12, seed=22)
    size = sum(len(p) for p in doc)  # of the pages; the text has 11 form feeds more

    async def go():
        eng.tokenize_inline_chars = size + 11  # at the limit: inline
        inline = await eng.classify(pages=doc)
        text_inline = await eng.classify(text="\f".join(doc))
        eng.tokenize_inline_chars = size - 1  # one character over: off the loop
        off = await eng.classify(pages=doc)
        sid = (await eng.create_session())["session_id"]
        page = await eng.append(sid, 0, pages=doc)
        return inline, text_inline, off, page, threading.current_thread().name

    inline, text_inline, off, page, loop_thread = run(go())
    assert seen[:2] == [loop_thread, loop_thread]
    assert seen[2:] == ["tokenize-bsbr_0", "tokenize-bsbr_0"]
    assert inline["logits"] == text_inline["logits"] == off["logits"]
    assert inline["num_tokens"] == off["num_tokens"] == page["num_tokens"] and page["num_pages"] == 12
    eng.shutdown()


def test_dropped_states_trim_the_heap_at_most_once_per_interval(dev_models, monkeypatch):
    """Closed and replaced states count towards a malloc_trim, which runs once
    enough was dropped, and not again within the interval."""
    import serve.engine as engine_mod

    calls = []
    monkeypatch.setattr(engine_mod, "malloc_trim", lambda: calls.append(1) or True)
    eng = make_engine(dev_models)
    eng.trim_min_bytes, eng.trim_interval_s = 1, 3600.0

    async def go():
        assert not await eng.release_memory()  # nothing dropped yet
        sid = (await eng.create_session())["session_id"]
        for i, p in enumerate(document(3, seed=9)):
            await eng.append(sid, i, pages=[p])
        held = eng.hot[sid].nbytes
        await eng.close(sid)
        assert eng.dropped_bytes >= held > 0
        first = await eng.release_memory()
        assert eng.dropped_bytes == 0
        sid = (await eng.create_session())["session_id"]
        await eng.append(sid, 0, pages=["another page"])
        await eng.close(sid)
        second = await eng.release_memory()  # within the interval
        eng.trim_interval_s = 0.0
        third = await eng.release_memory()
        return first, second, third

    assert run(go()) == (True, False, True)
    assert len(calls) == 2 and eng.trims == 2


def test_malloc_trim_runs_here():
    from serve.metrics import malloc_trim

    assert malloc_trim() is True  # glibc on the machines this runs on


def test_apportion_divides_each_step_among_its_pages_by_tokens():
    # pages of 3, 0, 5, 2 tokens read in steps of 4: steps [0,4) [4,8) [8,10)
    got = apportion([3, 0, 5, 2], 4, [40.0, 80.0, 10.0])
    want = [3 * 10.0, 0.0, 1 * 10.0 + 4 * 20.0, 2 * 5.0]  # naive: per token, then summed per page
    assert got == pytest.approx(want)
    assert sum(got) == pytest.approx(130.0)


@pytest.mark.parametrize("name", ["bsbr", "standard"])
@pytest.mark.parametrize("segment", [16, 48, 4096])
def test_one_shot_in_segments_gives_the_streaming_and_the_parallel_logits(dev_models, name, segment):
    """A one-shot classify reads the document in steps of oneshot_segment_tokens
    (ending inside pages); its logits equal the page-by-page session's and the
    model's parallel form, and per_page_ms adds up the steps' times."""
    eng = make_engine(dev_models, name, oneshot_segment_tokens=segment)
    pages = document(40, words_per_page=9, seed=5)
    ref = one_shot_logits(eng, pages).double()
    steps = []
    real = eng.batcher.step

    async def counted(ids, state, checkpoint_of=None, threads=None):
        steps.append(len(ids))
        return await real(ids, state, checkpoint_of, threads)

    eng.batcher.step = counted

    async def go():
        one = await eng.classify(pages=pages)
        n_one = len(steps)
        sid = (await eng.create_session())["session_id"]
        for i, p in enumerate(pages):
            last = await eng.append(sid, i, pages=[p])
        return one, n_one, last

    one, n_one, last = run(go())
    n_tokens = one["num_tokens"]
    assert steps[:n_one] == [min(segment, n_tokens - k) for k in range(0, n_tokens, segment)]
    assert len(steps) - n_one == 40  # the session: page by page
    assert (as_tensor(eng.labels, one["logits"]) - ref).abs().max() <= 1e-4
    assert (as_tensor(eng.labels, one["logits"]) - as_tensor(eng.labels, last["logits"])).abs().max() <= 1e-4
    assert one["num_pages"] == 40 and len(one["timing"]["per_page_ms"]) == 40
    assert all(ms > 0 for ms in one["timing"]["per_page_ms"])
    assert sum(one["timing"]["per_page_ms"]) <= one["timing"]["total_ms"]


def test_a_one_shot_steps_on_its_own_torch_threads_and_sessions_on_the_engines(dev_models):
    """oneshot_torch_threads: a one-shot classify's batches run with that many
    torch threads, a session's pages with torch_threads, on the one torch
    thread, whose count is set back after the one-shot; the answers are the
    model's. Another thread's count is left alone (libgomp keeps it per thread)."""
    import threading

    seen: list[tuple[int, int]] = []  # (steps in the batch, the torch thread's count)
    here = torch.get_num_threads()
    eng = make_engine(dev_models, "bsbr", torch_threads=1, oneshot_torch_threads=2, oneshot_segment_tokens=128)
    real = eng.model.step_many

    def recording(ids, states):
        seen.append((len(ids), torch.get_num_threads()))
        return real(ids, states)

    eng.model.step_many = recording
    pages = document(12, words_per_page=20, seed=3)
    ref = one_shot_logits(eng, pages).double()

    async def go():
        sid = (await eng.create_session())["session_id"]
        first = await eng.append(sid, 0, pages=pages[:1])
        n_session = len(seen)
        one = await eng.classify(pages=pages)
        n_one = len(seen) - n_session
        for i, p in enumerate(pages[1:], start=1):
            last = await eng.append(sid, i, pages=[p])
        return first, one, n_session, n_one, last

    try:
        first, one, n_session, n_one, last = run(go())
    finally:
        eng.shutdown()
        torch.set_num_threads(here)  # the count a new thread starts with, as the other tests expect
    assert n_one > 1 and [t for _, t in seen[n_session:n_session + n_one]] == [2] * n_one
    assert [t for _, t in seen[:n_session]] == [1] * n_session
    assert [t for _, t in seen[n_session + n_one:]] == [1] * (len(pages) - 1)
    assert torch.get_num_threads() == here and threading.current_thread() is threading.main_thread()
    assert (as_tensor(eng.labels, one["logits"]) - ref).abs().max() <= 1e-4
    assert (as_tensor(eng.labels, last["logits"]) - ref).abs().max() <= 1e-4
    assert first["num_pages"] == 1 and last["num_pages"] == one["num_pages"] == 12


def test_a_page_resumes_from_the_fused_ingress_load_and_a_stale_one_is_caught_by_the_commit(dev_models):
    """Engine.preloaded: the store load a fused ingress made to find a session's model
    (a page on a replica that does not hold the session hot) is the one the page
    resumes from, with the answer of a page read where the session was created;
    one older than preloaded_fresh_s is not used; a hot page drops it; and one that
    another replica's commit made stale gives that replica's stored answer (the
    commit's compare-and-set), nothing applied twice."""
    store = MemorySessionStore()
    loads = []
    real_load = store.load

    async def counted_load(sid):
        loads.append(sid)
        return await real_load(sid)

    store.load = counted_load
    a = make_engine(dev_models, "bsbr", store=store)  # the replica that creates the sessions
    b = make_engine(dev_models, "bsbr", store=store)  # the one their pages are hashed to
    pages = document(3, seed=11)

    async def go():
        ref = (await a.create_session())["session_id"]
        want = await a.append(ref, 0, pages=[pages[0]])
        sid = (await a.create_session())["session_id"]
        b.preloaded(sid, await real_load(sid))
        n = len(loads)
        got = await b.append(sid, 0, pages=[pages[0]])
        no_second_load = len(loads) == n
        b.preloaded(sid, await real_load(sid))
        await b.append(sid, 1, pages=[pages[1]])  # hot here: the preload is dropped unused
        dropped = sid not in b._preloaded

        old = (await a.create_session())["session_id"]
        b.preloaded_fresh_s = 0.0
        b.preloaded(old, await real_load(old))
        n = len(loads)
        await b.append(old, 0, pages=[pages[0]])
        loaded_itself = loads[n:] == [old]
        b.preloaded_fresh_s = 1.0

        raced = (await a.create_session())["session_id"]
        b.preloaded(raced, await real_load(raced))  # next_seq 0 ...
        first = await a.append(raced, 0, pages=[pages[2]])  # ... then a commits seq 0
        again = await b.append(raced, 0, pages=[pages[2]])
        head = await store.head(raced)
        return want, got, no_second_load, dropped, loaded_itself, first, again, head

    try:
        want, got, no_second_load, dropped, loaded_itself, first, again, head = run(go())
    finally:
        a.shutdown()
        b.shutdown()
    assert no_second_load and got["logits"] == want["logits"] and got["num_pages"] == 1
    assert dropped and loaded_itself
    assert again == first and head["next_seq"] == 1


def test_the_torch_threads_count_is_set_by_a_threads_first_batch_and_on_changes_only(dev_models, monkeypatch):
    """A new torch thread (each after an idle spell) sets its count before its first
    batch, whatever count torch would start it with; later batches set nothing
    while the count they want stays the same."""
    here = torch.get_num_threads()
    eng = make_engine(dev_models, "bsbr", oneshot_torch_threads=here)  # the same as the engine's
    eng.batcher.executor.idle_s = 0.2
    calls = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), real(n)))
    pages = document(3, seed=2)

    async def go():
        await eng.classify(pages=pages)
        sid = (await eng.create_session())["session_id"]
        for i, p in enumerate(pages):
            await eng.append(sid, i, pages=[p])
        before = list(calls)
        deadline = time.monotonic() + 10
        while eng.batcher.executor.retired == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await eng.classify(pages=pages)  # on a new thread
        return before

    try:
        before = run(go())
    finally:
        eng.shutdown()
    assert eng.oneshot_threads is None and eng.batcher.base_threads == here
    assert before == [here] and eng.batcher.executor.retired >= 1 and calls == [here, here]


@pytest.mark.parametrize("name", ["bsbr", "standard"])
def test_session_pages_give_the_one_shot_logits(dev_models, name):
    eng = make_engine(dev_models, name)
    pages = document(50)
    ref = one_shot_logits(eng, pages).double()

    async def go():
        one = await eng.classify(pages=pages)
        sid = (await eng.create_session())["session_id"]
        for i, p in enumerate(pages):
            last = await eng.append(sid, i, pages=[p])
        return one, last

    one, last = run(go())
    assert (as_tensor(eng.labels, one["logits"]) - ref).abs().max() <= 1e-4
    assert (as_tensor(eng.labels, last["logits"]) - ref).abs().max() <= 1e-4
    assert last["num_pages"] == one["num_pages"] == 50
    assert last["num_tokens"] == one["num_tokens"]
    assert len(one["timing"]["per_page_ms"]) == 50
    assert one["state_bytes"] > 0 and one["peak_memory_bytes"] > 0


def test_text_with_form_feeds_equals_the_same_pages(dev_models):
    eng = make_engine(dev_models)
    pages = document(5)

    async def go():
        return await eng.classify(text="\f".join(pages) + "\f"), await eng.classify(pages=pages)

    a, b = run(go())
    assert a["num_pages"] == b["num_pages"] == 5 and a["logits"] == b["logits"]


def test_seq_repeat_returns_the_stored_answer_and_gap_is_409(dev_models):
    eng = make_engine(dev_models)
    pages = document(3)

    async def go():
        sid = (await eng.create_session())["session_id"]
        r0 = await eng.append(sid, 0, pages=[pages[0]])
        r1 = await eng.append(sid, 1, pages=[pages[1]])
        again = await eng.append(sid, 1, text="something else entirely")
        with pytest.raises(errors.SeqGap):
            await eng.append(sid, 3, pages=[pages[2]])
        now = await eng.get(sid)
        return r0, r1, again, now

    r0, r1, again, now = run(go())
    assert again == r1
    assert now["seq"] == 1 and now["num_tokens"] == r1["num_tokens"] > r0["num_tokens"]


def test_too_many_tokens_is_413_and_nothing_is_applied(dev_models):
    eng = make_engine(dev_models, "standard", max_tokens=200)
    pages = document(20)

    async def go():
        with pytest.raises(errors.TooManyTokens):
            await eng.classify(pages=pages)
        sid = (await eng.create_session())["session_id"]
        r = await eng.append(sid, 0, pages=[pages[0]])
        with pytest.raises(errors.TooManyTokens):
            await eng.append(sid, 1, pages=pages[1:])
        return r, await eng.get(sid)

    r, now = run(go())
    assert now["num_tokens"] == r["num_tokens"] and now["seq"] == 0


def test_concurrent_sessions_are_batched(dev_models):
    eng = make_engine(dev_models)
    # Pages of exactly page_tokens tokens keep the documents aligned, so step_many batches them.
    text = " ".join(document(40, 30))

    async def reader():
        sid = (await eng.create_session())["session_id"]
        ids = eng.tokenize(text, None)[:6]
        return sid, ids

    async def go():
        sessions = await asyncio.gather(*(reader() for _ in range(8)))
        tok = eng.tokenizer

        async def feed(sid, pages):
            for i, ids in enumerate(pages):
                await eng.append(sid, i, text=tok.decode(ids))

        await asyncio.gather(*(feed(sid, pages) for sid, pages in sessions))

    run(go())
    b = eng.batcher
    assert b.batched_steps >= 48
    assert b.batches < b.batched_steps  # some steps shared a batch


def test_a_failing_document_does_not_fail_its_batch(dev_models):
    eng = make_engine(dev_models)

    async def go():
        good_state = eng.model.init_state(1)
        bad_ids = [eng.model.config.vocab_size + 5]  # out of the vocabulary
        eng.batcher.active_requests = 2
        return await asyncio.gather(
            eng.batcher.step([1, 2, 3], good_state), eng.batcher.step(bad_ids, good_state), return_exceptions=True,
        )

    good, bad = run(go())
    assert not isinstance(good, Exception) and isinstance(bad, ValueError)


def test_untrained_models_say_so(dev_models):
    info = make_engine(dev_models).info()
    assert info["trained"] is False and info["arch"] == "bsbr" and info["labels"]


# --- model failures: bad input (422), batch fallbacks, internal errors (500) ---------------


class RecordingMetrics(EngineMetrics):
    def __init__(self):
        self.fallbacks = 0

    def batch_fallback(self):
        self.fallbacks += 1


async def two_steps_in_one_batch(eng, pieces, state):
    """Step documents at once: all are queued before the worker runs, so one batch."""
    eng.batcher.active_requests = len(pieces)
    return await asyncio.gather(*(eng.batcher.step(p, state) for p in pieces), return_exceptions=True)


# An engine's batcher lives on the event loop of its first step: one run(...) per engine.


def test_ids_outside_the_vocabulary_are_the_typed_input_error_and_422(dev_models):
    eng = make_engine(dev_models)
    bad = [[eng.cfg.vocab_size + 5]]  # what a tokenizer larger than its model would produce

    async def go():
        with pytest.raises(InputError):
            await eng.batcher.step(bad[0], eng.model.init_state(1))
        eng.tokenize = lambda text, pages: bad
        with pytest.raises(errors.ValidationFailed, match="token ids must lie") as e:
            await eng.classify(text="anything")
        return e.value

    assert run(go()).status == 422


def test_a_failing_step_many_falls_back_is_counted_and_answers_as_stepping_alone(dev_models, monkeypatch, caplog):
    metrics = RecordingMetrics()
    eng = load_engine("bsbr", ModelSpec(name="bsbr", path=str(dev_models / "bsbr")), SessionConfig(),
                      MemorySessionStore(), metrics)
    real, calls = eng.model.step_many, []

    def fails_once(pieces, states):
        calls.append(len(pieces))
        if len(calls) == 1:
            raise RuntimeError("packed pass broke")
        return real(pieces, states)

    monkeypatch.setattr(eng.model, "step_many", fails_once)
    state = eng.model.init_state(1)
    pieces = [[1, 2, 3, 4, 5], list(range(7, 40))]

    async def go():
        first = await two_steps_in_one_batch(eng, pieces, state)
        counted = eng.batcher.fallbacks
        await two_steps_in_one_batch(eng, pieces, state)  # step_many again, no fallback
        return first, counted

    with caplog.at_level("WARNING"):
        outcomes, counted = run(go())
    assert calls == [2, 2]
    assert counted == eng.batcher.fallbacks == 1 and metrics.fallbacks == 1
    assert "step_many failed" in caplog.text and "packed pass broke" in caplog.text
    for piece, out in zip(pieces, outcomes):
        alone_logits, alone_state = eng.model.step(torch.tensor([piece]), state)
        assert torch.equal(out.logits, alone_logits) and out.state.num_tokens == alone_state.num_tokens


def test_a_batch_of_one_does_not_fall_back(dev_models, monkeypatch):
    eng = make_engine(dev_models)
    monkeypatch.setattr(eng.model, "step_many", lambda pieces, states: (_ for _ in ()).throw(RuntimeError("x")))
    with pytest.raises(RuntimeError):
        run(eng.batcher.step([1, 2, 3], eng.model.init_state(1)))
    assert eng.batcher.fallbacks == 0


@pytest.mark.parametrize("exc", [RuntimeError("CUDA error: an illegal memory access"), ValueError("a bug, not input")])
def test_a_model_failure_that_is_not_bad_input_is_an_internal_error(dev_models, monkeypatch, caplog, exc):
    eng = make_engine(dev_models)

    def broken(*args, **kwargs):
        raise exc

    monkeypatch.setattr(eng.model, "step_many", broken)
    monkeypatch.setattr(eng.model, "step", broken)
    with caplog.at_level("ERROR"), pytest.raises(errors.ServeError) as e:
        run(eng.classify(text="a page of words"))
    assert not isinstance(e.value, errors.ValidationFailed) and e.value.status != 422
    assert type(e.value) is errors.InternalError and e.value.status == 500 and e.value.code == "internal_error"
    assert type(exc).__name__ in e.value.message and str(exc) not in e.value.message  # no internals leak
    assert "failed on page 1" in caplog.text
    back = errors.from_wire(e.value.to_wire())
    assert type(back) is errors.InternalError and back.status == 500


def test_a_pages_checkpoint_rides_its_step_and_a_failing_one_fails_that_request_alone(dev_models, monkeypatch, caplog):
    """A session page's checkpoint is made on the torch thread in the same trip as
    its step (StepBatcher.step's checkpoint_of). When making it fails for one of
    two sessions stepped at once, that request is a 500 and applies nothing (the
    store's seq stays, the same seq later gives the answer of a clean run), and
    the other session's page is committed."""
    import serve.engine as engine_mod

    eng = make_engine(dev_models)
    pages = document(3, seed=11)
    real = engine_mod._checkpoint
    broken: set[int] = set()

    def checkpoint(new_state, base_state, chain_bytes):
        if id(base_state) in broken:
            raise RuntimeError("disk on fire")
        return real(new_state, base_state, chain_bytes)

    monkeypatch.setattr(engine_mod, "_checkpoint", checkpoint)

    async def go():
        a = (await eng.create_session())["session_id"]
        b = (await eng.create_session())["session_id"]
        await eng.append(a, 0, pages=[pages[0]])
        await eng.append(b, 0, pages=[pages[0]])
        broken.add(id(eng.hot[b].state))
        ra, rb = await asyncio.gather(eng.append(a, 1, pages=[pages[1]]), eng.append(b, 1, pages=[pages[1]]),
                                      return_exceptions=True)
        meta_b, chain_b = await eng.store.load(b)
        broken.clear()
        again = await eng.append(b, 1, pages=[pages[1]])
        meta_a, _ = await eng.store.load(a)
        return ra, rb, meta_b, chain_b, again, meta_a

    with caplog.at_level("ERROR"):
        ra, rb, meta_b, chain_b, again, meta_a = run(go())
    assert type(rb) is errors.InternalError and rb.status == 500 and "disk on fire" not in rb.message
    assert "could not checkpoint" in caplog.text
    assert meta_b["next_seq"] == 1 and len(chain_b) == 1  # nothing of the failed page was applied
    assert not isinstance(ra, Exception) and meta_a["next_seq"] == 2
    # a's page was batched with b's failed one, b's again alone: equal up to the packing's float error
    assert (as_tensor(eng.labels, again["logits"]) - as_tensor(eng.labels, ra["logits"])).abs().max() < 1e-5
    assert again["num_pages"] == ra["num_pages"] == 2


def test_warm_up_runs_a_pages_torch_work_and_keeps_nothing(dev_models, monkeypatch):
    """Engine.warm_up (a replica's start): a step, its checkpoint and a restore on the
    torch thread, then the store's warm; no session, no hot state, no page counted."""
    import threading

    import serve.engine as engine_mod

    eng = make_engine(dev_models)
    ran: list[str] = []
    warmed: list[bool] = []
    real = engine_mod._checkpoint

    def checkpoint(*a):
        ran.append(threading.current_thread().name.rsplit("_", 1)[0])
        return real(*a)

    async def warm():
        warmed.append(True)

    monkeypatch.setattr(engine_mod, "_checkpoint", checkpoint)
    monkeypatch.setattr(eng.store, "warm", warm)

    async def go():
        await eng.warm_up()
        return await eng.store.stats()

    stats = run(go())
    assert ran == ["torch-bsbr"] and warmed == [True]
    assert stats["sessions"] == 0 and not eng.hot and eng.batcher.batches == 0
    eng.shutdown()
