"""Session-affinity request router for the model deployments.

The ingress calls a model deployment with `handle.options(session_id=...)`
for every session request. This router ranks the replicas for that session
by rendezvous (highest-random-weight) hashing of (session id, replica id):
every router in every process ranks them the same way, so all pages of a
session go to the same replica, which holds its state hot. When that
replica is full (max_ongoing_requests) the next in rank takes the request
and resumes the session from the store; when replicas come or go, only the
sessions of the replicas that changed move.

Requests without a session (classify) take the less loaded of two random
replicas, as Serve's default router does.

`bsbr_session_resumes_total{source="hot"|"store"}` measures how often the
preference holds.
"""
from __future__ import annotations

import hashlib
import random

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

ROUTER_PATH = "serve.router.SessionAffinityRouter"


def rendezvous_rank(key: str, replica_ids: list[str]) -> list[str]:
    """replica_ids ordered by preference for `key` (stable across processes)."""

    def weight(rid: str) -> bytes:
        return hashlib.blake2b(f"{key}\0{rid}".encode(), digest_size=8).digest()

    return sorted(replica_ids, key=weight, reverse=True)


class SessionAffinityRouter(RequestRouter):
    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is None:
            return [candidate_replicas]
        # Back off between rounds when every ranked replica is full, instead of spinning.
        pending_request.routing_context.should_backoff = True
        session_id = pending_request.metadata.session_id
        if not session_id:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        return [[by_id[rid]] for rid in rendezvous_rank(session_id, list(by_id))]
