"""Session-affinity request router for the model deployments.

The ingress calls a model deployment with the session id in the request
metadata (`handle.options(session_id=...)`) for every session request. This
router ranks the replicas for that session by rendezvous
(highest-random-weight) hashing of (session id, replica id), over every
replica the router knows: every router in every process ranks them the same
way, so all pages of a session go to the same replica, which holds its state
hot. When replicas come or go, only the sessions of the replicas that
changed move.

The preferred replica is left only when it is known to be full
(max_ongoing_requests, by the queue length it last reported) or when it has
not taken the request within `PREFERRED_PATIENCE_S` (2.5 s); then the next in rank
takes it and resumes the session from the store. A replica that merely did
not answer Serve's queue-length probe in time (0.1 s at first, a common
thing on a busy machine) is asked again, with the longer deadlines of
Serve's later rounds, instead of being passed over: passing over it moved a
session's pages to the other replica (docs/architecture.md 3.2). A dead
replica leaves the router's set at once (Serve drops it on ActorDiedError),
so its sessions move without waiting.

Requests without a session (classify) take the less loaded of two random
replicas, as Serve's default router does.

`bsbr_session_resumes_total{source="hot"|"store"}` measures how often the
preference holds.

With Serve's HAProxy ingress (`bsbr-serve up --ingress haproxy`), HAProxy
sends HTTP requests to the ingress replicas itself and Serve refuses a
custom router on the ingress deployment. In topology split nothing changes
(this router runs between the ingress and the models). In topology fused,
where the ingress replicas hold the sessions, the affinity moves into
HAProxy: `HAPROXY_SESSION_BALANCE` hashes the session id in the path, and a
request without one is balanced round robin.
"""
from __future__ import annotations

import hashlib
import os
import random
import re
import time

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

ROUTER_PATH = "serve.router.SessionAffinityRouter"

# Serve's HAProxy ingress: on when this is "1" in the environment of Ray's processes.
HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"
# Its balance algorithm (RAY_SERVE_HAPROXY_BALANCE_ALGORITHM) for affinity: the
# 4th field of the path, the session id in /v1/sessions/<id>/... under route
# prefix "/"; a path without one (classify, a new session, /healthz) has no
# value, and HAProxy then balances round robin. The hash is HAProxy's default
# map-based one: when the replicas change, sessions move and resume from the store.
HAPROXY_SESSION_BALANCE = "hash path,field(4,/)"


def haproxy_ingress() -> bool:
    """Whether this process runs under Serve's HAProxy ingress."""
    return os.environ.get(HAPROXY_ENV) == "1"

# How long a session request waits for its preferred replica (alive, not
# known to be full) before the next in rank takes it: time for Serve to probe
# it about five times (deadlines 0.1, 0.2, 0.4, 0.8, 1 s), and well within
# http.replica_timeout_s (default 5 s), after which the request is 503.
PREFERRED_PATIENCE_S = 2.5


_SESSION_PATH = re.compile(rb"/v1/sessions/([0-9a-f]{32})(?:/|$)")
# The ASGI scope's "path" key in the proxy's request to an ingress replica
# (pickle protocol >= 4: SHORT_BINUNICODE "path", then MEMOIZE).
_PATH_KEY = b"\x8c\x04path\x94"


def _scope_path(arg: bytes) -> bytes:
    """The ASGI scope's path in Serve's HTTP proxy request bytes, read without
    deserialising them; b"" when it is not where the layout puts it."""
    i = arg.find(_PATH_KEY, 0, 4096)
    if i < 0:
        return b""
    j = i + len(_PATH_KEY)
    if j + 2 > len(arg):
        return b""
    if arg[j] == 0x8C:  # SHORT_BINUNICODE: 1-byte length
        n = arg[j + 1]
        return arg[j + 2 : j + 2 + n]
    if arg[j] == 0x58:  # BINUNICODE: 4-byte length
        n = int.from_bytes(arg[j + 1 : j + 5], "little")
        return arg[j + 5 : j + 5 + n]
    return b""


def session_of_request(pending_request: PendingRequest) -> str:
    """The session a request is for, or "" for none.

    A call from the ingress carries it in the request metadata
    (`handle.options(session_id=...)`, topology split). A request from Serve's
    HTTP proxy to a fused ingress (topology fused) carries the HTTP request's
    scope as bytes: the id is read from the scope's path (under any route
    prefix), without deserialising anything. A request whose session is not
    found this way is routed as one without a session: any replica resumes
    it from the store, so only speed depends on this."""
    sid = pending_request.metadata.session_id
    if sid:
        return sid
    for arg in pending_request.args[:1]:
        if isinstance(arg, (bytes, bytearray)):
            m = _SESSION_PATH.search(_scope_path(bytes(arg)))
            if m:
                return m.group(1).decode()
    return ""


def rendezvous_rank(key: str, replica_ids: list[str]) -> list[str]:
    """replica_ids ordered by preference for `key` (stable across processes)."""

    def weight(rid: str) -> bytes:
        return hashlib.blake2b(f"{key}\0{rid}".encode(), digest_size=8).digest()

    return sorted(replica_ids, key=weight, reverse=True)


def session_ranks(
    ranked: list[RunningReplica],
    candidates: set[str],
    preferred_full: bool,
    waited_s: float,
    patience_s: float = PREFERRED_PATIENCE_S,
) -> list[list[RunningReplica]]:
    """The rounds of one routing attempt for a session request.

    `ranked` is every known replica in rendezvous order, `candidates` the ids
    Serve offers now. While the preferred replica is neither known full nor
    waited on for `patience_s`, only it is offered (Serve probes it again,
    with a longer deadline, in its next round); after that, every candidate
    in rank order."""
    preferred = ranked[0]
    if not preferred_full and waited_s < patience_s:
        pid = preferred.replica_id.unique_id
        return [[preferred]] if pid in candidates else []
    return [[r] for r in ranked if r.replica_id.unique_id in candidates]


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
        session_id = session_of_request(pending_request)
        if not session_id:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        known = {r.replica_id.unique_id: r for r in self.curr_replicas.values()}
        known.update((r.replica_id.unique_id, r) for r in candidate_replicas)
        ranked = [known[rid] for rid in rendezvous_rank(session_id, list(known))]
        queue_len = self.replica_queue_len_cache.get(ranked[0].replica_id)
        full = queue_len is not None and queue_len >= ranked[0].max_ongoing_requests
        return session_ranks(ranked, {r.replica_id.unique_id for r in candidate_replicas}, full,
                             time.time() - pending_request.created_at)
