"""The engine of one model: tokenising, pages, batched steps, sessions. No HTTP.

One `Engine` runs in each model replica (and in-process for benchmarks).
Everything a client sends arrives as plain values; everything it answers is
a plain dict shaped like `serve.schemas`; every failure is a `ServeError`.

Reading a document is always the streaming form (`model.step`), so a
one-shot classification, a session and a stream compute the same thing and
docs/architecture.md 1.4 makes their logits equal. A session or a stream
steps page by page (each page is a request's answer); a one-shot classify
reads its whole document in steps of `oneshot_segment_tokens` tokens
(default 4096), whatever its pages, since stepping a long document page by
page through the batcher costs far more than a few long steps. Its
`per_page_ms` then divides each step's time among the pages it holds, by
their tokens (`apportion`): the figures add up to the model's time and are
no per-page measurement.

Batching: every page step of every request goes through `StepBatcher`,
which collects the steps that arrive while the model is busy (or within
`batch_wait_ms` while other requests are in flight) and runs them with
`model.step_many`, which packs the documents' pieces into one pass. When
step_many raises for a batch of several documents, the batch is re-run one
document at a time so only the document at fault fails; that is logged and
counted (bsbr_batch_fallbacks_total).

Errors: bsbr_core's `InputError` (ids outside the vocabulary, a foreign
state, ...) is the one model exception a request can cause: it becomes 422
validation_error. Any other exception out of the model is the server's
fault: logged here with its traceback, answered 500 internal_error.

Sessions: the state after each page stays hot here (LRU, `hot_max_bytes`)
and is committed to the `SessionStore` with a compare-and-set on `seq`
before the answer is returned, so a page is never lost once answered and
never applied twice.

Threads: all of an engine's torch work (loading its model, every step,
every checkpoint and every restore of a state) runs on the engine's one
torch thread, so a process that holds one engine (a split model replica)
holds one OpenMP team. libgomp, the OpenMP of torch's CPU builds, gives
each thread that opens a parallel region a team of worker threads of its
own, and once a process holds more OpenMP threads than cores it cuts their
spin-wait to about a hundred spins, so each of a step's parallel regions
then pays futex wake-ups. One other thread that had run a single parallel
copy (a checkpoint, the model's load) was enough: the shipped bsbr model's
512-token step took 10-13 ms in the engine instead of 6-7 ms
(bench/omp_teams.py, docs/architecture.md 3.9). A fused replica holds
several engines, hence several teams while they work: a long step of one
model never holds up another model's pages. An engine's thread ends after
TORCH_THREAD_IDLE_S without work, so an idle model's team does not throttle
a busy one's; `bsbr-serve up`'s libgomp settings (serve.cli.RAY_ENV_DEFAULTS)
soften the throttle where both are busy. The torch thread's team size is set
by the batcher (torch_threads), and a one-shot classify's steps may ask for
a bigger one (ModelSpec.oneshot_torch_threads): on CPU, replicas of one
thread each then read a lone long document with every core (and compete for
cores with each other's pages under load: README, "Replicas and threads").
"""
from __future__ import annotations

import asyncio
import bisect
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bsbr_core import InputError
from serve.config import ModelSpec, SessionConfig, is_trained, model_card
from serve.errors import (
    BackendUnsupported,
    InternalError,
    SeqGap,
    ServeError,
    SessionIncompatible,
    SessionNotFound,
    TooManyTokens,
    ValidationFailed,
)
from serve.metrics import EngineMetrics, PeakMemory, malloc_trim
from serve.pages import tokenize_document
from serve.store import SessionStore, new_session_id

logger = logging.getLogger("ray.serve")


# An engine's torch thread ends after this long without work, and its OpenMP
# team with it; the next piece of work starts a new one. In a fused replica an
# idle model's team otherwise keeps the process over one OpenMP thread per core,
# so libgomp throttles the busy model's spin-wait (module docstring).
TORCH_THREAD_IDLE_S = 2.0


class TorchThread(Executor):
    """The one thread of an engine's torch work (module docstring: one OpenMP
    team per engine), ended after `idle_s` seconds without work and started
    again by the next submit. Work runs one piece at a time, in order; at most
    one thread runs it at any moment (a retired thread has nothing left to run
    and ends). `retired` counts the threads ended for idleness."""

    def __init__(self, name: str, idle_s: float | None = TORCH_THREAD_IDLE_S):
        self.name = name
        self.idle_s = idle_s
        self.retired = 0
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pending = 0
        self._timer: threading.Timer | None = None
        self._last_done = 0.0
        self._closed = False

    def submit(self, fn, /, *args, **kwargs) -> Future:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"the torch thread of {self.name} was shut down")
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"torch-{self.name}")
            self._pending += 1
            fut = self._pool.submit(fn, *args, **kwargs)
        fut.add_done_callback(self._finished)
        return fut

    def _finished(self, _fut: Future) -> None:
        # Per piece of work only a count and a clock: at most one timer is armed
        # at a time, and it re-arms itself for what is left of idle_s.
        with self._lock:
            self._pending -= 1
            self._last_done = time.monotonic()
            if self._pending == 0 and self._timer is None and self.idle_s is not None and self._pool is not None:
                self._arm(self.idle_s)

    def _arm(self, delay: float) -> None:
        self._timer = threading.Timer(delay, self._retire)
        self._timer.daemon = True
        self._timer.start()

    def _retire(self) -> None:
        with self._lock:
            self._timer = None
            if self._closed or self._pool is None or self._pending:
                return  # busy again: the work's end arms a new timer
            left = self._last_done + self.idle_s - time.monotonic()
            if left > 0:
                self._arm(left)  # work came and went meanwhile
                return
            pool, self._pool = self._pool, None
            self.retired += 1
        pool.shutdown(wait=False)  # idle: its thread ends now

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=wait, cancel_futures=cancel_futures)


def torch_thread(name: str, idle_s: float | None = TORCH_THREAD_IDLE_S) -> TorchThread:
    """The thread for one engine's torch work (TorchThread)."""
    return TorchThread(name, idle_s)


class CheckpointFailed(RuntimeError):
    """Checkpointing a session's new state failed (the server's fault, a 500)."""


@dataclass
class StepOutcome:
    logits: torch.Tensor  # (1, num_labels), on CPU
    state: Any  # bsbr_core.State
    seconds: float  # enqueue -> the end of its batch's step: what this page cost its request
    peak_bytes: int
    checkpoint: tuple[bytes, bool] | None = None  # (blob, is_delta), when the step was asked for one


@dataclass
class _StepJob:
    ids: torch.Tensor  # (1, n) long
    state: Any
    future: asyncio.Future
    # (the state the request started from, its chain's sizes): checkpoint the new state
    # against it on the torch thread right after the step (_checkpoint).
    checkpoint_of: tuple[Any, list[int]] | None = None
    # torch intra-op threads this step wants (None: the batcher's base_threads).
    threads: int | None = None
    enqueued: float = field(default_factory=time.perf_counter)


class StepBatcher:
    """Runs the page steps of concurrent requests on one model, batched.

    The engine's torch thread runs the model (torch ops release the GIL, so the
    event loop keeps accepting requests while a batch runs and the next
    batch fills up meanwhile). A failing batch of several documents is
    retried step by step so one bad document fails alone (a fallback:
    logged, counted in `fallbacks` and bsbr_batch_fallbacks_total); a
    failing batch of one is that document's answer.
    """

    def __init__(self, model, max_batch_size: int = 16, batch_wait_s: float = 0.002, peak: PeakMemory | None = None,
                 metrics: EngineMetrics | None = None, name: str = "", executor: Executor | None = None,
                 base_threads: int | None = None):
        """`base_threads`: the torch thread's intra-op threads for a batch whose
        steps ask for none (`step(threads=)`); None: its count is never set here."""
        self.model = model
        self.base_threads = base_threads
        self._threads = threading.local()  # the torch thread's count as last set here
        self.name = name
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.peak = peak or PeakMemory(model.device)
        self.metrics = metrics or EngineMetrics()
        self.executor = executor or torch_thread(name)
        self.active_requests = 0  # documents being read right now (set by Engine)
        self.batches = 0
        self.batched_steps = 0
        self.fallbacks = 0
        self._queue: asyncio.Queue[_StepJob] | None = None
        self._worker: asyncio.Task | None = None

    async def step(self, ids: Sequence[int], state, checkpoint_of: tuple[Any, list[int]] | None = None,
                   threads: int | None = None) -> StepOutcome:
        """One step; with `checkpoint_of` (base state, its chain's sizes) the outcome
        also carries the new state's checkpoint, made on the torch thread right after
        the batch's step: a session page's checkpoint then costs no second trip to
        the torch thread and back (its time is not in `seconds`). `threads`: the
        torch intra-op threads the step's batch runs with (the most any of its
        steps asks for; those that ask for none count as `base_threads`)."""
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._run())
        fut = asyncio.get_running_loop().create_future()
        await self._queue.put(_StepJob(torch.tensor([list(ids)], dtype=torch.long), state, fut, checkpoint_of,
                                       threads))
        return await fut

    def _set_threads(self, batch: list[_StepJob]) -> None:
        """On the torch thread: its OpenMP team's size for this batch. libgomp keeps
        the size per thread (torch.set_num_threads here touches no other engine's
        thread), and a new torch thread (TorchThread retires idle ones) starts
        unset here, so it is set before its first batch."""
        asked = [j.threads for j in batch if j.threads is not None]
        if not asked and self.base_threads is None:
            return
        want = max(asked + ([self.base_threads] if self.base_threads is not None else []))
        if getattr(self._threads, "n", None) != want:
            torch.set_num_threads(want)
            self._threads.n = want

    async def _collect(self) -> list[_StepJob]:
        q = self._queue
        batch = [await q.get()]
        deadline = time.perf_counter() + self.batch_wait_s
        while len(batch) < self.max_batch_size:
            if not q.empty():
                batch.append(q.get_nowait())
                continue
            # Waiting only helps when other documents are being read.
            left = deadline - time.perf_counter()
            if left <= 0 or self.active_requests <= len(batch):
                break
            try:
                batch.append(await asyncio.wait_for(q.get(), left))
            except asyncio.TimeoutError:
                break
        return batch

    def _run_batch(self, batch: list[_StepJob]) -> tuple[list, int, Exception | None, float, list]:
        """(per job: (logits, state) or its exception, peak bytes, the
        step_many exception if the batch fell back to one step per job, the
        time the steps ended, per job: its checkpoint or None or the exception
        that made it)."""
        self._set_threads(batch)
        out, fallback = self._step_batch(batch)
        peak, stepped = self.peak.peak(), time.perf_counter()
        checkpoints: list = []
        for j, res in zip(batch, out):
            blob = None
            if j.checkpoint_of is not None and not isinstance(res, Exception):
                try:
                    blob = _checkpoint(res[1], *j.checkpoint_of)
                except Exception as e:  # noqa: BLE001 - reported to that request only
                    blob = CheckpointFailed(f"{type(e).__name__}: {e}")
                    blob.__cause__ = e
            checkpoints.append(blob)
        return out, peak, fallback, stepped, checkpoints

    def _step_batch(self, batch: list[_StepJob]) -> tuple[list, Exception | None]:
        self.peak.reset()
        try:
            return self.model.step_many([j.ids for j in batch], [j.state for j in batch]), None
        except Exception as e:  # noqa: BLE001 - find the document at fault, step by step below
            if len(batch) == 1:
                return [e], None
            out = []
            for j in batch:
                try:
                    out.append(self.model.step(j.ids, j.state))
                except Exception as e_j:  # noqa: BLE001 - reported to that request only
                    out.append(e_j)
            return out, e

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            try:
                results, peak, fallback, stepped, checkpoints = await loop.run_in_executor(
                    self.executor, self._run_batch, batch)
            except Exception as e:  # noqa: BLE001 - never let the worker die
                results, peak, fallback, stepped, checkpoints = [e] * len(batch), 0, None, 0.0, [None] * len(batch)
            if fallback is not None:
                self.fallbacks += 1
                self.metrics.batch_fallback()
                failed = sum(isinstance(r, Exception) for r in results)
                logger.warning("model %s: step_many failed for a batch of %d steps (%s: %s); stepped them one by "
                               "one, %d failed", self.name, len(batch), type(fallback).__name__, fallback, failed)
            self.batches += 1
            self.batched_steps += len(batch)
            for job, res, blob in zip(batch, results, checkpoints):
                if job.future.done():
                    continue
                if isinstance(res, Exception):
                    job.future.set_exception(res)
                elif isinstance(blob, Exception):
                    job.future.set_exception(blob)
                else:
                    logits, state = res
                    job.future.set_result(StepOutcome(logits.detach().float().cpu(), state, stepped - job.enqueued,
                                                      peak, blob))


@dataclass
class HotSession:
    state: Any
    next_seq: int
    num_pages: int
    ttl_s: float
    last_used: float
    nbytes: int
    chain_bytes: list[int] = field(default_factory=list)  # sizes of the store's checkpoint chain


def wants_full_checkpoint(chain_bytes: list[int], delta_bytes: int) -> bool:
    """Start a new checkpoint chain when its deltas would outgrow its full blob:
    full blobs then come at geometrically spaced pages (amortised O(page) bytes
    per page) and the chain never holds much more than twice the state."""
    return not chain_bytes or sum(chain_bytes[1:]) + delta_bytes > chain_bytes[0]


def page_starts(pages: list[list[int]]) -> list[int]:
    """Offset of each page's first token in the document."""
    out, at = [], 0
    for p in pages:
        out.append(at)
        at += len(p)
    return out


def apportion(page_tokens: list[int], segment_tokens: int, segment_ms: list[float]) -> list[float]:
    """Each page's share of the steps' times, when the document (pages of
    these token counts) was read in steps of `segment_tokens` tokens taking
    `segment_ms`: a step's time divided among its tokens, summed per page.
    The shares add up to the steps' total; a page of no tokens gets 0."""
    total = sum(page_tokens)
    out, start = [], 0
    for n in page_tokens:
        ms, at, end = 0.0, start, start + n
        while at < end:
            k = at // segment_tokens
            seg_lo, seg_hi = k * segment_tokens, min((k + 1) * segment_tokens, total)
            take = min(end, seg_hi) - at
            ms += segment_ms[k] * take / (seg_hi - seg_lo)
            at += take
        out.append(ms)
        start = end
    return out


def prediction(labels: list[str], logits: torch.Tensor | None) -> dict[str, Any]:
    """label / scores / logits of one document from (1, L) logits (None: no tokens yet)."""
    if logits is None:
        return {"label": None, "scores": {}, "logits": {}}
    row = logits.reshape(-1).double()
    probs = torch.softmax(row, dim=0).tolist()
    raw = row.tolist()
    best = int(torch.argmax(row))
    return {
        "label": labels[best],
        "scores": {lab: float(p) for lab, p in zip(labels, probs)},
        "logits": {lab: float(v) for lab, v in zip(labels, raw)},
    }


# Engine._tokenized: documents of more characters than this are tokenised off the event loop.
TOKENIZE_INLINE_CHARS = 16384

# Engine.release_memory: trim the heap once this much hot state was dropped, at most this often.
TRIM_MIN_BYTES = 64 << 20
TRIM_INTERVAL_S = 10.0
# How long a store load that a fused ingress made for a session's page
# (Engine.preloaded) stands in for the engine's own; the page's request uses
# it within microseconds, so anything older belongs to a request that went
# elsewhere (or failed before reaching the engine).
PRELOADED_FRESH_S = 1.0


class Engine:
    """One model: classify documents and run sessions. See module docstring."""

    def __init__(
        self,
        name: str,
        model,
        tokenizer,
        spec: ModelSpec,
        sessions: SessionConfig,
        store: SessionStore,
        metrics: EngineMetrics | None = None,
        torch_executor: Executor | None = None,
    ):
        """`torch_executor`: the thread the model was loaded on (load_engine), for all its torch work
        (steps, checkpoints, restores: module docstring); without one, the batcher makes its own."""
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec
        self.cfg = model.config
        self.sessions_cfg = sessions
        self.store = store
        self.metrics = metrics or EngineMetrics()
        self.labels = list(self.cfg.labels)
        self.max_tokens = spec.resolved_max_tokens(self.cfg.arch)
        self.page_tokens = spec.page_tokens
        # One-shot steps: whole chunks (no unfinished chunk carried between them).
        c = self.cfg.chunk_size
        self.segment_tokens = max(c, spec.oneshot_segment_tokens // c * c)
        vocab = tokenizer.get_vocab_size()
        if vocab > self.cfg.vocab_size:
            raise ValueError(f"{name}: tokenizer has {vocab} ids but the model only {self.cfg.vocab_size}")
        # The torch thread's intra-op threads, set by the batcher when a batch needs another
        # count than the last: torch_threads (else this process's count), a one-shot's steps
        # ModelSpec.oneshot_torch_threads. Set, not inherited: torch.set_num_threads also
        # changes the count a thread that has not run torch yet starts with, and a torch
        # thread is new after each idle spell (TorchThread).
        base_threads = self.oneshot_threads = None
        if spec.backend == "torch":
            base_threads = spec.torch_threads or torch.get_num_threads()
            if spec.oneshot_torch_threads not in (None, base_threads):
                self.oneshot_threads = spec.oneshot_torch_threads
        self.batcher = StepBatcher(model, spec.max_batch_size, spec.batch_wait_ms / 1000.0,
                                   metrics=self.metrics, name=name, executor=torch_executor,
                                   base_threads=base_threads)
        self.io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="state-io")  # malloc_trim
        self.text = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"tokenize-{name}")  # _tokenized
        self.tokenize_inline_chars = TOKENIZE_INLINE_CHARS
        self.hot: OrderedDict[str, HotSession] = OrderedDict()
        # session id -> (when, (meta, chain)): store loads made for a page by the fused ingress.
        self._preloaded: OrderedDict[str, tuple[float, tuple[dict[str, Any], list[bytes] | None]]] = OrderedDict()
        self.preloaded_fresh_s = PRELOADED_FRESH_S
        self.hot_bytes = 0
        self._locks: dict[str, asyncio.Lock] = {}
        self._card = model_card(spec.path)
        # Heap given back after states were dropped (release_memory).
        self.dropped_bytes = 0  # hot states dropped or replaced since the last trim
        self.trims = 0
        self.trim_min_bytes = TRIM_MIN_BYTES
        self.trim_interval_s = TRIM_INTERVAL_S
        self._last_trim = float("-inf")

    # --- description ------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "name": self.name, "arch": c.arch, "labels": self.labels, "chunk_size": c.chunk_size,
            "max_tokens": self.max_tokens, "page_tokens": self.page_tokens, "max_length": c.max_length,
            "hidden_dim": c.hidden_dim, "num_layers": c.num_layers, "num_heads": c.num_heads,
            "vocab_size": c.vocab_size, "backend": self.spec.backend, "device": str(self.model.device),
            "trained": is_trained(self.spec.path),
            "parameters": self.model.parameter_count(),
            "card": self._card,
        }

    # --- reading pages ------------------------------------------------------------

    def tokenize(self, text: str | None, pages: Sequence[str] | None) -> list[list[int]]:
        return tokenize_document(self.tokenizer, text, pages, self.page_tokens)

    async def _tokenized(self, text: str | None, pages: Sequence[str] | None) -> list[list[int]]:
        """`tokenize`, in a thread for a document of over `tokenize_inline_chars`
        characters: tokenizers' encode_batch lets go of the GIL, so the event loop
        serves the replica's other requests meanwhile (a 100-page document takes
        tens of ms). A page or a few stay on the loop, where no thread hop is paid."""
        size = len(text) if text is not None else sum(len(p) for p in pages or ())
        if size <= self.tokenize_inline_chars:
            return self.tokenize(text, pages)
        return await asyncio.get_running_loop().run_in_executor(self.text, self.tokenize, text, pages)

    def _check_length(self, have: int, pages: list[list[int]]) -> None:
        total = have + sum(len(p) for p in pages)
        if total > self.max_tokens:
            raise TooManyTokens(
                f"the document would have {total} tokens; model {self.name!r} accepts at most {self.max_tokens}"
            )

    async def _step(self, ids: Sequence[int], state, index: int,
                    checkpoint_of: tuple[Any, list[int]] | None = None, threads: int | None = None) -> StepOutcome:
        """One step through the batcher; its failures as the request's typed errors
        (`index`: the document's page the step starts in; `checkpoint_of`, `threads`: StepBatcher.step)."""
        try:
            return await self.batcher.step(ids, state, checkpoint_of, threads)
        except ServeError:
            raise
        except CheckpointFailed as e:
            logger.error("model %s could not checkpoint the state after page %d", self.name, index, exc_info=e)
            raise InternalError(f"model {self.name!r} could not checkpoint the session's state") from None
        except InputError as e:  # e.g. token ids outside the model's vocabulary
            raise ValidationFailed(f"model {self.name!r} cannot read this page: {e}") from None
        except Exception as e:  # the model failed on a page it accepted: our fault
            logger.error("model %s failed on page %d (%d tokens)", self.name, index, len(ids), exc_info=e)
            raise InternalError(f"model {self.name!r} failed on this page ({type(e).__name__})") from None

    async def _read(self, state, pages: list[list[int]], mode: str, first_page: int = 1,
                    chain_bytes: list[int] | None = None):
        """Step through pages (the first is page `first_page` of its document);
        return (logits, state, per-page ms, peak bytes, checkpoint). With
        `chain_bytes` (the sizes of the store's chain that ends at `state`) the
        last step also makes the new state's checkpoint against `state`
        (_checkpoint: (blob, is_delta)); else the checkpoint is None."""
        logits, page_ms, peak, base, checkpoint = None, [], 0, state, None
        last = first_page + len(pages) - 1
        self.batcher.active_requests += 1
        try:
            for index, ids in enumerate(pages, start=first_page):
                ask = (base, chain_bytes) if chain_bytes is not None and index == last else None
                out = await self._step(ids, state, index, ask)
                checkpoint = out.checkpoint
                logits, state = out.logits, out.state
                page_ms.append(out.seconds * 1000.0)
                peak = max(peak, out.peak_bytes)
                self.metrics.page(mode, out.seconds, index)
                self.metrics.state_bytes(state.nbytes)
        finally:
            self.batcher.active_requests -= 1
        self.metrics.pages(len(pages))
        self.metrics.tokens(sum(len(p) for p in pages))
        self.metrics.peak_memory(peak)
        return logits, state, page_ms, peak, checkpoint

    async def _read_segments(self, pages: list[list[int]]):
        """A whole document from a fresh state in steps of `segment_tokens`
        tokens (the pages' tokens run on across page ends); return (logits,
        state, per-page ms apportioned by tokens, peak bytes)."""
        flat = [i for p in pages for i in p]
        seg = self.segment_tokens
        state, logits, peak, seg_ms = self.model.init_state(1), None, 0, []
        starts = page_starts(pages)
        self.batcher.active_requests += 1
        try:
            for lo in range(0, len(flat), seg):
                out = await self._step(flat[lo : lo + seg], state, bisect.bisect_right(starts, lo),
                                       threads=self.oneshot_threads)
                logits, state = out.logits, out.state
                seg_ms.append(out.seconds * 1000.0)
                peak = max(peak, out.peak_bytes)
        finally:
            self.batcher.active_requests -= 1
        page_ms = apportion([len(p) for p in pages], seg, seg_ms)
        for index, ms in enumerate(page_ms, start=1):
            self.metrics.page("oneshot", ms / 1000.0, index)
        self.metrics.state_bytes(state.nbytes)
        self.metrics.pages(len(pages))
        self.metrics.tokens(len(flat))
        self.metrics.peak_memory(peak)
        return logits, state, page_ms, peak

    async def classify(self, text: str | None = None, pages: Sequence[str] | None = None) -> dict[str, Any]:
        t0 = time.perf_counter()
        token_pages = await self._tokenized(text, pages)
        self._check_length(0, token_pages)
        if any(token_pages):
            logits, state, page_ms, peak = await self._read_segments(token_pages)
        else:  # pages of no tokens: nothing to read, but each page is still a step of its own
            logits, state, page_ms, peak, _ = await self._read(self.model.init_state(1), token_pages, "oneshot")
        return {
            "model": self.name,
            **prediction(self.labels, logits),
            "num_tokens": state.num_tokens,
            "num_pages": len(token_pages),
            "state_bytes": state.nbytes,
            "timing": {"total_ms": (time.perf_counter() - t0) * 1000.0, "per_page_ms": page_ms},
            "peak_memory_bytes": peak,
        }

    # --- sessions -----------------------------------------------------------------

    async def create_session(self, ttl_s: float | None = None, session_id: str | None = None) -> dict[str, Any]:
        """A new session (`session_id`: one the caller drew with new_session_id, so
        the call was routed by it to the replica its pages will go to)."""
        ttl = self.sessions_cfg.ttl_s if ttl_s is None else min(float(ttl_s), self.sessions_cfg.ttl_s)
        meta = await self.store.create(session_id or new_session_id(), self.name, ttl)
        sid = meta["session_id"]
        # Its empty state is hot here, so its first page needs no read of the store
        # (a page that lands elsewhere resumes from the store as any other).
        state = self.model.init_state(1)
        self._put_hot(sid, HotSession(state, 0, 0, ttl, time.monotonic(), state.nbytes, []))
        return {"session_id": sid, "model": self.name, "expires_in_s": meta["expires_in_s"]}

    def _lock(self, sid: str) -> asyncio.Lock:
        lock = self._locks.get(sid)
        if lock is None:
            lock = self._locks[sid] = asyncio.Lock()
        return lock

    def _check_owner(self, meta: dict[str, Any]) -> None:
        if meta["model"] != self.name:
            raise SessionNotFound(f"session {meta['session_id']} belongs to model {meta['model']!r}, not {self.name!r}")

    def _empty_result(self, sid: str, meta: dict[str, Any]) -> dict[str, Any]:
        return {
            "session_id": sid, "model": self.name, "seq": None, **prediction(self.labels, None),
            "num_tokens": 0, "num_pages": 0, "state_bytes": 0,
            "timing": {"page_ms": [], "total_ms": 0.0}, "expires_in_s": meta["expires_in_s"], "final": False,
        }

    def preloaded(self, sid: str, loaded: tuple[dict[str, Any], list[bytes] | None]) -> None:
        """`store.load(sid)`'s answer, just made by the fused ingress of this replica to
        find the session's model for a page request: the page resumes from it
        (`_resume`) instead of loading again, so a page that reaches a replica that
        does not hold its session hot (a new session's first page, hashed to the other
        replica than the one that created it) pays one store round trip, not two. Used
        once, within `preloaded_fresh_s`; a concurrent commit elsewhere is caught by
        the commit's compare-and-set as with any load."""
        now = time.monotonic()
        self._expire_preloaded(now)
        self._preloaded.pop(sid, None)
        self._preloaded[sid] = (now, loaded)

    def _expire_preloaded(self, now: float) -> None:
        """Forget preloads older than preloaded_fresh_s (oldest first: they are kept in insertion order)."""
        while self._preloaded and now - next(iter(self._preloaded.values()))[0] >= self.preloaded_fresh_s:
            self._preloaded.popitem(last=False)

    async def _resume(self, sid: str, seq: int):
        """(state, num_pages, ttl, stored answer if seq is a repeat, resume source, chain sizes) from the store."""
        got = self._preloaded.pop(sid, None)
        if got is not None and time.monotonic() - got[0] < self.preloaded_fresh_s:
            meta, chain = got[1]
        else:
            meta, chain = await self.store.load(sid)
        self._check_owner(meta)
        ttl_s = meta["ttl_s"]
        if seq < meta["next_seq"]:
            return None, 0, ttl_s, await self.store.result(sid, seq), None, []
        if seq > meta["next_seq"]:
            raise SeqGap(f"session {sid} expects seq {meta['next_seq']}, got {seq}")
        if not chain:
            return self.model.init_state(1), 0, ttl_s, None, None, []
        from bsbr_core import StateError

        try:
            state = await asyncio.get_running_loop().run_in_executor(self.batcher.executor, _replay_chain, chain)
            self.model.check_state(state)
        except StateError as e:
            raise SessionIncompatible(f"session {sid} cannot be resumed by this model: {e}") from None
        last = meta["last_result"] or {}
        return state, int(last.get("num_pages", 0)), ttl_s, None, "store", [len(b) for b in chain]

    async def append(
        self, session_id: str, seq: int, text: str | None = None, pages: Sequence[str] | None = None,
        mode: str = "session",
    ) -> dict[str, Any]:
        """Apply the pages of request `seq` to a session and return its running result."""
        t0 = time.perf_counter()
        token_pages = await self._tokenized(text, pages)
        async with self._lock(session_id):
            hot = self.hot.get(session_id)
            source: str | None = "hot"
            if hot is not None and hot.next_seq == seq:
                self._preloaded.pop(session_id, None)  # not needed: the state is here
                state, num_pages, ttl_s, chain_bytes = hot.state, hot.num_pages, hot.ttl_s, hot.chain_bytes
            else:
                state, num_pages, ttl_s, repeat, source, chain_bytes = await self._resume(session_id, seq)
                if repeat is not None:
                    return repeat
            self._check_length(state.num_tokens, token_pages)
            # A request holds at least one page (tokenize_document refuses none), so its
            # last step made the checkpoint.
            logits, new_state, page_ms, _, (blob, delta) = await self._read(
                state, token_pages, mode, num_pages + 1, chain_bytes)
            nbytes = new_state.nbytes
            result = {
                "session_id": session_id, "model": self.name, "seq": seq,
                **prediction(self.labels, logits),
                "num_tokens": new_state.num_tokens, "num_pages": num_pages + len(token_pages),
                "state_bytes": nbytes,
                "timing": {"page_ms": page_ms, "total_ms": (time.perf_counter() - t0) * 1000.0},
                "expires_in_s": ttl_s, "final": False,
            }
            try:
                ahead = await self.store.commit(session_id, seq, blob, result, delta)
            except SessionNotFound:
                self._drop_hot(session_id)
                raise
            if ahead is not None:
                # Another replica applied this seq first (our hot copy was stale).
                self._drop_hot(session_id)
                if ahead > seq:
                    return await self.store.result(session_id, seq)
                raise SeqGap(f"session {session_id} expects seq {ahead}, got {seq}")
            if source is not None and seq > 0:
                self.metrics.resume(source)
            chain_bytes = chain_bytes + [len(blob)] if delta else [len(blob)]
            self._put_hot(session_id, HotSession(new_state, seq + 1, result["num_pages"], ttl_s, time.monotonic(),
                                                  nbytes, chain_bytes))
            return result

    async def get(self, session_id: str) -> dict[str, Any]:
        meta = await self.store.head(session_id)
        self._check_owner(meta)
        last = meta["last_result"]
        if last is None:
            return self._empty_result(session_id, meta)
        return {**last, "expires_in_s": meta["expires_in_s"], "final": False}

    async def close(self, session_id: str) -> dict[str, Any]:
        async with self._lock(session_id):
            meta = await self.store.head(session_id)
            self._check_owner(meta)
            meta = await self.store.delete(session_id)
            self._drop_hot(session_id)
            self._locks.pop(session_id, None)
        last = meta["last_result"] or self._empty_result(session_id, meta)
        return {**last, "expires_in_s": 0.0, "final": True}

    # --- hot states -----------------------------------------------------------------

    def _put_hot(self, sid: str, hot: HotSession) -> None:
        self._drop_hot(sid)
        self.hot[sid] = hot
        self.hot_bytes += hot.nbytes
        while self.hot and self.hot_bytes > self.sessions_cfg.hot_max_bytes:
            old, _ = next(iter(self.hot.items()))
            self._drop_hot(old)  # the store still has it
        self.metrics.sessions_active(len(self.hot))

    def _drop_hot(self, sid: str) -> None:
        hot = self.hot.pop(sid, None)
        if hot is not None:
            self.hot_bytes -= hot.nbytes
            self.dropped_bytes += hot.nbytes
            self.metrics.sessions_active(len(self.hot))

    async def warm_up(self) -> None:
        """What a replica's first session page would run for the first time, run
        before it comes: a step of a few tokens with its checkpoint and a restore
        of that checkpoint on the torch thread, then the store's connection for
        this event loop (SessionStore.warm). Nothing is stored or recorded. The
        first session page after a replica's start was 15-30 ms dearer than the
        next ones, about 20 ms of it the store channel's opening (an ad-hoc probe
        with per-phase timestamps)."""
        await asyncio.get_running_loop().run_in_executor(self.batcher.executor, _warm_torch_paths, self.model)
        await self.store.warm()

    async def release_memory(self) -> bool:
        """Trim the C heap (serve.metrics.malloc_trim) once hot states of
        `trim_min_bytes` were dropped or replaced since the last trim, at most
        every `trim_interval_s`; in the state-io thread, off the event loop.
        Without it a replica keeps the peak of its past sessions' states: the
        soak's standard replica grew 441 MiB in 8 minutes while it held a flat
        number of sessions (bench/results/rss_retention.json)."""
        now = time.monotonic()
        if self.dropped_bytes < self.trim_min_bytes or now - self._last_trim < self.trim_interval_s:
            return False
        self.dropped_bytes, self._last_trim = 0, now
        done = await asyncio.get_running_loop().run_in_executor(self.io, malloc_trim)
        self.trims += int(done)
        return done

    def shutdown(self) -> None:
        """End the engine's threads once what they run is done (its torch thread's
        OpenMP team goes with it; a team left behind would slow the next engine's
        steps in this process, module docstring)."""
        self.batcher.executor.shutdown(wait=True)
        self.io.shutdown(wait=True)
        self.text.shutdown(wait=True)

    def sweep(self) -> int:
        """Forget hot states idle longer than the TTL (the store expires them too)."""
        now = time.monotonic()
        dead = [sid for sid, h in self.hot.items() if now - h.last_used >= h.ttl_s]
        for sid in dead:
            self._drop_hot(sid)
        for sid in [s for s, lock in self._locks.items() if s not in self.hot and not lock.locked()]:
            self._locks.pop(sid, None)
        self._expire_preloaded(now)
        return len(dead)


def _checkpoint(new_state, base_state, chain_bytes: list[int]) -> tuple[bytes, bool]:
    """(blob, is_delta) for the store: a delta against the state this page was
    applied to, or a full blob when the chain should restart."""
    if chain_bytes:
        delta = new_state.to_bytes(base=base_state)
        if not wants_full_checkpoint(chain_bytes, len(delta)):
            return delta, True
    return new_state.to_bytes(), False


def _warm_torch_paths(model) -> None:
    """A session page's torch work, once, on nothing that is kept (Engine.warm_up)."""
    from bsbr_core import State

    state = model.init_state(1)
    (_, new_state), = model.step_many([torch.zeros(1, 4, dtype=torch.long)], [state])
    blob, _ = _checkpoint(new_state, state, [])
    model.check_state(State.from_bytes(blob))


def _replay_chain(chain: list[bytes]):
    """The state a checkpoint chain [full, delta, ...] describes."""
    from bsbr_core import State

    state = State.from_bytes(chain[0])
    for delta in chain[1:]:
        state = State.from_bytes(delta, base=state)
    return state


def load_engine(
    name: str, spec: ModelSpec, sessions: SessionConfig, store: SessionStore, metrics: EngineMetrics | None = None,
) -> Engine:
    """Load the checkpoint at spec.path on its backend and wrap it in an Engine.

    The backend comes from bsbr_core's registry by name (bsbr_core.backends):
    torch on CUDA when the replica has a GPU (device auto); onnx on ONNX
    Runtime graphs exported next to the checkpoint on first use (CUDA provider
    when onnxruntime-gpu and a GPU are present). Either way states are
    bsbr_core States, so they move between backends. A backend nobody
    registered, or one whose dependencies are missing here, is BackendUnsupported."""
    from bsbr_core.backends import UnknownBackend, load_backend
    from bsbr_core.tokenizer import load_tokenizer

    thread = torch_thread(name)
    try:
        # On the engine's torch thread: loading copies weights in parallel regions, whose
        # OpenMP team would otherwise stay with the calling thread (module docstring).
        model = thread.submit(load_backend, spec.backend, spec.path, device=spec.device,
                              threads=spec.torch_threads).result()
    except BaseException as e:
        thread.shutdown(wait=False)
        if isinstance(e, UnknownBackend):
            raise BackendUnsupported(f"model {name!r}: {e}") from None
        if isinstance(e, ImportError):
            raise BackendUnsupported(f"model {name!r}: backend {spec.backend} is not available here: {e}") from None
        raise
    tokenizer = load_tokenizer(Path(spec.path) / "tokenizer.json")
    return Engine(name, model, tokenizer, spec, sessions, store, metrics, torch_executor=thread)
