"""Model deployments: one Serve deployment per model, each replica one Engine.

Every method answers `{"result": ..., "replica": <actor name>}` or a wire
error (`ServeError.to_wire()` plus the replica), so typed errors cross the
process boundary as data. The replica's actor name lets operators (and the
failover test) find the replica that served a session.
"""
from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from ray import serve

from serve.config import ModelSpec, SessionConfig
from serve.errors import ServeError
from serve.metrics import RayServeMetrics

logger = logging.getLogger("ray.serve")

SWEEP_INTERVAL_S = 10.0
# Ray forgets a gauge nobody sets for two export intervals: refresh it well within one.
GAUGE_REFRESH_S = 1.0


async def engine_upkeep(engine) -> None:
    """Warm the engine up first (Engine.warm_up); then forever: expire idle hot
    sessions every SWEEP_INTERVAL_S; every GAUGE_REFRESH_S refresh the engine's
    gauges (sessions active, store fill) and give freed heap back when enough
    was freed (Engine.release_memory)."""
    since_sweep = 0.0
    try:
        await engine.warm_up()
    except Exception as e:  # noqa: BLE001 - a warm-up is no reason to stop the upkeep; the first page redoes it
        logger.warning("model %s: warm-up failed (%s: %s)", engine.name, type(e).__name__, e)
    while True:
        await asyncio.sleep(GAUGE_REFRESH_S)
        since_sweep += GAUGE_REFRESH_S
        if since_sweep >= SWEEP_INTERVAL_S:
            engine.sweep()
            since_sweep = 0.0
        engine.metrics.sessions_active(len(engine.hot))
        await engine.release_memory()
        try:
            await engine.store.report_fill()
        except ServeError:  # the store is down: its fill is unknown until it returns
            pass


def make_engine(name: str, spec: ModelSpec, sessions: SessionConfig):
    """The model `spec` in this process, with its own connection to the session store."""
    from serve.engine import load_engine
    from serve.store import make_store

    store = make_store(sessions)
    store.connect()
    return load_engine(name, spec, sessions, store, RayServeMetrics(name))


def replica_name() -> str:
    try:
        return serve.get_replica_context().replica_id.to_full_id_str()
    except Exception:  # noqa: BLE001 - outside Serve (direct construction in tests)
        return f"local:{os.getpid()}"


def torch_threads(spec: ModelSpec) -> int:
    if spec.torch_threads:
        return spec.torch_threads
    cpus = (spec.ray_actor_options or {}).get("num_cpus", 1) or 1
    return max(1, min(int(cpus), os.cpu_count() or 1))


@serve.deployment(max_ongoing_requests=32, health_check_period_s=5)
class ModelServer:
    def __init__(self, name: str, spec: dict[str, Any], sessions: dict[str, Any]):
        import torch

        spec_m = ModelSpec.model_validate(spec)
        torch.set_num_threads(torch_threads(spec_m))
        self.engine = make_engine(name, spec_m, SessionConfig.model_validate(sessions))
        self.replica = replica_name()
        self._sweeper: asyncio.Task | None = None
        try:
            self._start_sweeper()
        except RuntimeError:  # no event loop here: the first request starts it
            pass
        logger.info("model %s loaded on %s (%s)", name, self.engine.model.device, self.replica)

    def _start_sweeper(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def _answer(self, coro) -> dict[str, Any]:
        self._start_sweeper()
        try:
            return {"result": await coro, "replica": self.replica}
        except ServeError as e:
            return {**e.to_wire(), "replica": self.replica}

    async def _sweep_forever(self):
        await engine_upkeep(self.engine)

    async def ready(self) -> bool:
        self._start_sweeper()
        return True

    async def info(self) -> dict[str, Any]:
        return {"result": self.engine.info(), "replica": self.replica}

    async def classify(self, text: str | None, pages: list[str] | None) -> dict[str, Any]:
        return await self._answer(self.engine.classify(text, pages))

    async def create_session(self, ttl_s: float | None = None, session_id: str | None = None) -> dict[str, Any]:
        return await self._answer(self.engine.create_session(ttl_s, session_id))

    async def append(self, session_id: str, seq: int, text: str | None, pages: list[str] | None,
                     mode: str = "session") -> dict[str, Any]:
        return await self._answer(self.engine.append(session_id, seq, text, pages, mode))

    async def get(self, session_id: str) -> dict[str, Any]:
        return await self._answer(self.engine.get(session_id))

    async def close(self, session_id: str) -> dict[str, Any]:
        return await self._answer(self.engine.close(session_id))

    async def stats(self) -> dict[str, Any]:
        b = self.engine.batcher
        return {"result": {"hot_sessions": len(self.engine.hot), "hot_bytes": self.engine.hot_bytes,
                           "batches": b.batches, "batched_steps": b.batched_steps,
                           "batch_fallbacks": b.fallbacks}, "replica": self.replica}
