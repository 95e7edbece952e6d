"""How the ingress talks to a model: one typed interface, two implementations.

`EngineClient` is what the HTTP layer (serve.api) calls for a model:
classify, create_session, append, get, close, info, ready. Every call
answers a `Reply` (the engine's plain-dict result and the replica that
computed it) or raises a `ServeError`.

- `RayEngineClient` calls the model's Serve deployment (serve.deployments)
  through its handle: a handle per method, made once (`handle.append`, not
  a method name looked up per request), the session id in the request
  metadata so `serve.router` sends the call to the replica holding the
  session, a deadline for getting a replica at all (`http.replica_timeout_s`:
  no replica running or none taking requests is 503 `unavailable` with
  Retry-After, not a request that waits forever), and retries while
  replicas die (`http.retry_s`: appends are idempotent by seq,
  classification is stateless).
- `InProcessEngineClient` wraps a `serve.engine.Engine` in this process, so
  the HTTP layer runs under FastAPI's TestClient with no Ray
  (tests/test_serve_api_inprocess.py) and benchmarks can compare the two.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from serve.errors import Overloaded, Unavailable, from_wire, is_wire_error
from serve.store import new_session_id

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class Reply:
    result: dict[str, Any]
    replica: str | None = None  # which replica computed it (the X-Bsbr-Replica header)


@runtime_checkable
class EngineClient(Protocol):
    """One model, as the ingress sees it (serve.engine.Engine's operations)."""

    async def info(self) -> Reply: ...

    async def ready(self) -> bool: ...

    async def classify(self, text: str | None, pages: list[str] | None) -> Reply: ...

    async def create_session(self, ttl_s: float | None = None) -> Reply: ...

    async def append(self, session_id: str, seq: int, text: str | None, pages: list[str] | None,
                     mode: str = "session") -> Reply: ...

    async def get(self, session_id: str) -> Reply: ...

    async def close(self, session_id: str) -> Reply: ...


class InProcessEngineClient:
    """An Engine in this process: the same results and errors, no Ray, no copies."""

    def __init__(self, engine, replica: str | None = None):
        self.engine = engine
        self.replica = replica or f"local:{os.getpid()}"

    async def info(self) -> Reply:
        return Reply(self.engine.info(), self.replica)

    async def ready(self) -> bool:
        return True

    async def classify(self, text, pages) -> Reply:
        return Reply(await self.engine.classify(text, pages), self.replica)

    async def create_session(self, ttl_s=None) -> Reply:
        return Reply(await self.engine.create_session(ttl_s), self.replica)

    async def append(self, session_id, seq, text, pages, mode="session") -> Reply:
        return Reply(await self.engine.append(session_id, seq, text, pages, mode), self.replica)

    async def get(self, session_id) -> Reply:
        return Reply(await self.engine.get(session_id), self.replica)

    async def close(self, session_id) -> Reply:
        return Reply(await self.engine.close(session_id), self.replica)


class RayEngineClient:
    """A model's Serve deployment (serve.deployments.ModelServer) through its handle."""

    def __init__(self, name: str, handle, replica_timeout_s: float, retry_s: float):
        self.name = name
        self.replica_timeout_s = replica_timeout_s
        self.retry_s = retry_s
        # One handle per method, made once: `handle.<method>` builds a new
        # handle object on every access. They share the deployment's router.
        self._info = handle.info
        self._ready = handle.ready
        self._classify = handle.classify
        self._create = handle.create_session
        self._append = handle.append
        self._get = handle.get
        self._close = handle.close

    async def info(self) -> Reply:
        return await self._call(self._info)

    async def ready(self) -> bool:
        return bool(await self._send(self._ready, ()))

    async def classify(self, text, pages) -> Reply:
        return await self._call(self._classify, text, pages)

    async def create_session(self, ttl_s=None) -> Reply:
        # The id is drawn here, so the call is routed by it to the replica that will
        # hold the session (serve.router), which keeps its empty state hot.
        session_id = new_session_id()
        return await self._call(self._create.options(session_id=session_id), ttl_s, session_id)

    async def append(self, session_id, seq, text, pages, mode="session") -> Reply:
        return await self._call(self._append.options(session_id=session_id), session_id, seq, text, pages, mode)

    async def get(self, session_id) -> Reply:
        return await self._call(self._get.options(session_id=session_id), session_id)

    async def close(self, session_id) -> Reply:
        return await self._call(self._close.options(session_id=session_id), session_id)

    async def _send(self, handle, args: tuple) -> Any:
        """One call: a replica within replica_timeout_s (else Unavailable), then its answer."""
        from ray.serve.exceptions import BackPressureError

        response = handle.remote(*args)
        try:
            # The request is assigned to a replica first (Serve's router waits
            # while the deployment has none); only that wait has the deadline,
            # a long document then takes as long as it takes.
            await asyncio.wait_for(response._fetch_future_result_async(), self.replica_timeout_s)
        except asyncio.CancelledError:  # the caller gave up (e.g. /readyz's own deadline)
            response.cancel()
            raise
        except asyncio.TimeoutError:
            response.cancel()
            raise Unavailable(f"model {self.name!r} has no replica taking requests (none within "
                              f"{self.replica_timeout_s:g} s); retry shortly", retry_after_s=2.0) from None
        except BackPressureError:
            raise Overloaded(f"model {self.name!r} is at capacity; retry shortly", retry_after_s=1.0) from None
        try:
            return await response
        except BackPressureError:
            raise Overloaded(f"model {self.name!r} is at capacity; retry shortly", retry_after_s=1.0) from None

    async def _call(self, handle, *args) -> Reply:
        """Call a model replica; retry while replicas die or restart; raise its typed errors."""
        import ray

        deadline = time.monotonic() + self.retry_s
        delay = 0.1
        while True:
            try:
                out = await self._send(handle, args)
                break
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                if time.monotonic() + delay > deadline:
                    raise Unavailable(f"model {self.name!r} has no live replica ({type(e).__name__})",
                                      retry_after_s=2.0) from None
                logger.warning("replica of %s unavailable (%s); retrying", self.name, type(e).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        if is_wire_error(out):
            raise from_wire(out)
        return Reply(out["result"], out.get("replica"))
