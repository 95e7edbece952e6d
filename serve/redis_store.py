"""The Redis session store (`sessions.store: redis`): sessions that outlive every Ray process.

Metadata, retained answers and checkpoint chains live in Redis (>= 7, or
Valkey) with the session's TTL, so a session goes on after its replica, the
Serve application or the whole Ray cluster is gone. Every operation is one
Lua script, which Redis runs atomically: the compare-and-set on `next_seq`,
the TTL refresh and the limits (`max_sessions`, `max_store_bytes`) are
decided inside Redis, never by a read and then a write from a replica.
Time is Redis's clock (`TIME`), the same for every replica.

Keys, all under the hash tag `{name}` (one slot, so a Redis Cluster shard
holds a whole store):

    {name}:m:<sid>  hash    model, ttl (s, as given), ttl_ms, next_seq,
                            sizes ("1200,31,30": the chain's blob sizes), last (answer JSON)
    {name}:c:<sid>  list    the checkpoint chain [full, delta, ...]
    {name}:r:<sid>  hash    seq -> answer JSON (the last `results_retained`)
    {name}:exp      zset    sid -> expiry (ms): the live sessions, for the limits
    {name}:bytes    hash    sid -> checkpoint bytes
    {name}:model    hash    sid -> model
    {name}:count    hash    model -> live sessions
    {name}:total    string  checkpoint bytes of every live session
    {name}:gauges   string  the client that exports the fill gauges (a lease)

A session's own three keys carry its TTL (PEXPIRE, renewed by every
access), so Redis frees an abandoned session by itself; the scripts that
need the counts first sweep the index of sessions past their expiry.

Answers are stored as JSON text that the scripts never parse (Lua's cjson
would round floats); blobs are binary strings. A Redis that cannot be
reached, is loading its AOF or refuses writes is `StoreUnavailable` (503
with Retry-After): nothing was applied, and a retry of the same seq is
safe, since the commit is a compare-and-set.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import secrets
from typing import Any
from urllib.parse import quote

from serve.errors import InternalError, StoreFull, StoreUnavailable
from serve.store import (
    SessionStore,
    StoreFillGauges,
    delta_needs_full,
    no_answer,
    not_found,
    not_retained,
    store_full,
    too_many_sessions,
)

logger = logging.getLogger("ray.serve")

RETRY_AFTER_S = 2.0
# The fill-gauge lease: its holder renews it every second; a dead
# holder's lease lapses after this long and another replica takes over.
GAUGE_LEASE_MS = 3000
SWEEP_BATCH = 1000

# KEYS: exp, bytes, model, count, total[, meta, chain, results]; ARGV[1]
# the key prefix, ARGV[2] now in ms ('' = Redis's clock), ARGV[3] the session.
_PRELUDE = """
local P = ARGV[1]
local NOW
if ARGV[2] ~= '' then NOW = tonumber(ARGV[2]) else
  local t = redis.call('TIME')
  NOW = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local EXP, BYTES, MODEL, COUNT, TOTAL = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local SID, META, CHAIN, RESULTS = ARGV[3], KEYS[6], KEYS[7], KEYS[8]

local function drop(sid)
  local held = tonumber(redis.call('HGET', BYTES, sid) or '0')
  local model = redis.call('HGET', MODEL, sid)
  redis.call('DEL', P .. 'm:' .. sid, P .. 'c:' .. sid, P .. 'r:' .. sid)
  redis.call('ZREM', EXP, sid)
  redis.call('HDEL', BYTES, sid)
  redis.call('HDEL', MODEL, sid)
  if held > 0 then redis.call('DECRBY', TOTAL, held) end
  if model and redis.call('HINCRBY', COUNT, model, -1) <= 0 then redis.call('HDEL', COUNT, model) end
end

local function sweep()
  for _, sid in ipairs(redis.call('ZRANGEBYSCORE', EXP, '-inf', NOW, 'LIMIT', 0, SWEEP_BATCH)) do drop(sid) end
end

local function total()
  return tonumber(redis.call('GET', TOTAL) or '0')
end

-- Seconds until the next session expires (Lua numbers reach the client truncated: a string).
local function retry_after()
  local first = redis.call('ZRANGE', EXP, 0, 0, 'WITHSCORES')
  if #first == 0 then return '1' end
  return tostring(math.max(1, (tonumber(first[2]) - NOW) / 1000))
end

-- The session exists and has not expired; renews its TTL.
local function live()
  local exp = redis.call('ZSCORE', EXP, SID)
  if not exp then return false end
  if tonumber(exp) <= NOW or redis.call('EXISTS', META) == 0 then
    drop(SID)
    return false
  end
  local ttl_ms = redis.call('HGET', META, 'ttl_ms')
  redis.call('ZADD', EXP, NOW + tonumber(ttl_ms), SID)
  redis.call('PEXPIRE', META, ttl_ms)
  redis.call('PEXPIRE', CHAIN, ttl_ms)
  redis.call('PEXPIRE', RESULTS, ttl_ms)
  return true
end

local function head()
  local h = redis.call('HMGET', META, 'model', 'ttl', 'next_seq', 'sizes', 'last')
  return {'ok', h[1], h[2], h[3], h[4], h[5] or ''}
end
""".replace("SWEEP_BATCH", str(SWEEP_BATCH))

# ARGV[4] model, [5] ttl (s), [6] ttl (ms), [7] max_sessions
_CREATE = """
local live_n = redis.call('ZCARD', EXP)
if live_n >= tonumber(ARGV[7]) then
  sweep()
  live_n = redis.call('ZCARD', EXP)
  if live_n >= tonumber(ARGV[7]) then return {'too_many', tostring(live_n), retry_after()} end
end
if redis.call('ZSCORE', EXP, SID) then drop(SID) end
redis.call('DEL', META, CHAIN, RESULTS)
redis.call('HSET', META, 'model', ARGV[4], 'ttl', ARGV[5], 'ttl_ms', ARGV[6], 'next_seq', 0, 'sizes', '')
redis.call('PEXPIRE', META, ARGV[6])
redis.call('ZADD', EXP, NOW + tonumber(ARGV[6]), SID)
redis.call('HSET', MODEL, SID, ARGV[4])
redis.call('HINCRBY', COUNT, ARGV[4], 1)
return {'ok'}
"""

# ARGV[4] '1': the chain too
_HEAD = """
if not live() then return {'not_found'} end
local out = head()
if ARGV[4] == '1' then
  for _, blob in ipairs(redis.call('LRANGE', CHAIN, 0, -1)) do out[#out + 1] = blob end
end
return out
"""

# ARGV[4] seq
_RESULT = """
if not live() then return {'not_found'} end
local next_seq = tonumber(redis.call('HGET', META, 'next_seq'))
if tonumber(ARGV[4]) >= next_seq then return {'no_answer'} end
local answer = redis.call('HGET', RESULTS, ARGV[4])
if not answer then return {'not_retained', tostring(next_seq)} end
return {'ok', answer}
"""

# ARGV[4] seq, [5] blob, [6] answer JSON, [7] '1': delta, [8] max_store_bytes, [9] results_retained
_COMMIT = """
if not live() then return {'not_found'} end
local seq = tonumber(ARGV[4])
local next_seq = tonumber(redis.call('HGET', META, 'next_seq'))
if next_seq ~= seq then return {'ahead', tostring(next_seq)} end
local delta = ARGV[7] == '1'
local sizes = redis.call('HGET', META, 'sizes')
if delta and sizes == '' then return {'delta_first'} end
local blob = ARGV[5]
local held = tonumber(redis.call('HGET', BYTES, SID) or '0')
local old = delta and 0 or held
local limit = tonumber(ARGV[8])
if total() - old + #blob > limit then
  sweep()
  if total() - old + #blob > limit then return {'full', tostring(total()), retry_after()} end
end
if delta then
  redis.call('RPUSH', CHAIN, blob)
  sizes = sizes .. ',' .. #blob
else
  redis.call('DEL', CHAIN)
  redis.call('RPUSH', CHAIN, blob)
  sizes = tostring(#blob)
end
redis.call('HSET', BYTES, SID, held - old + #blob)
redis.call('INCRBY', TOTAL, #blob - old)
redis.call('HSET', META, 'next_seq', seq + 1, 'sizes', sizes, 'last', ARGV[6])
redis.call('HSET', RESULTS, ARGV[4], ARGV[6])
redis.call('HDEL', RESULTS, tostring(seq - tonumber(ARGV[9])))
local ttl_ms = redis.call('HGET', META, 'ttl_ms')
redis.call('PEXPIRE', CHAIN, ttl_ms)
redis.call('PEXPIRE', RESULTS, ttl_ms)
return {'ok'}
"""

_DELETE = """
if not live() then return {'not_found'} end
local out = head()
drop(SID)
return out
"""

_STATS = """
sweep()
local out = {tostring(redis.call('ZCARD', EXP)), tostring(total())}
for _, v in ipairs(redis.call('HGETALL', COUNT)) do out[#out + 1] = v end
return out
"""

# KEYS[1] the lease, ARGV[1] this client, ARGV[2] its length (ms)
_LEASE = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if not holder then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
return 0
"""

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_env(url: str) -> str:
    """`url` with each ${NAME} replaced by the environment variable NAME
    (quoted for a URL: a password may hold @ or /)."""

    def value(m: re.Match) -> str:
        v = os.environ.get(m.group(1))
        if v is None:
            raise ValueError(f"sessions.redis_url names ${{{m.group(1)}}}, which is not set in this "
                             "process's environment")
        return quote(v, safe="")

    return _ENV_REF.sub(value, url)


class RedisSessionStore(SessionStore):
    """SessionStore on Redis (module docstring). `clock`, for tests only:
    a function giving seconds, used instead of Redis's clock."""

    def __init__(self, url: str, name: str, max_sessions: int, max_store_bytes: int, results_retained: int = 64,
                 timeout_s: float = 2.0, clock=None):
        self.url = expand_env(url)
        self.prefix = "{" + name + "}:"
        self.max_sessions = max_sessions
        self.max_store_bytes = max_store_bytes
        self.results_retained = results_retained
        self.timeout_s = timeout_s
        self.clock = clock
        self._client = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scripts: dict[str, Any] = {}
        self._down = False
        self._me = secrets.token_hex(8)
        self._gauges: StoreFillGauges | None = None

    # --- the connection -------------------------------------------------------------

    def _redis(self):
        """The client of this event loop (an asyncio client is bound to the loop it was made in)."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            import redis.asyncio as aioredis
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            # One immediate retry: a pooled connection left dead by a Redis
            # restart fails once; beyond that, fail fast and let the client retry.
            self._client = aioredis.Redis.from_url(
                self.url, socket_timeout=self.timeout_s, socket_connect_timeout=self.timeout_s,
                retry=Retry(NoBackoff(), 1), health_check_interval=30,
            )
            self._loop = loop
            self._scripts = {
                op: self._client.register_script(_PRELUDE + body)
                for op, body in (("create", _CREATE), ("head", _HEAD), ("result", _RESULT),
                                 ("commit", _COMMIT), ("delete", _DELETE), ("stats", _STATS))
            }
            self._scripts["lease"] = self._client.register_script(_LEASE)
        return self._client

    def _keys(self, sid: str | None) -> list[str]:
        p = self.prefix
        keys = [p + "exp", p + "bytes", p + "model", p + "count", p + "total"]
        if sid is not None:
            keys += [f"{p}m:{sid}", f"{p}c:{sid}", f"{p}r:{sid}"]
        return keys

    async def _run(self, op: str, sid: str | None, *args) -> list:
        """Run script `op` for session `sid`; Redis's failures as ServeErrors."""
        from redis import exceptions as rx

        self._redis()
        now = "" if self.clock is None else str(int(self.clock() * 1000))
        try:
            out = await self._scripts[op](keys=self._keys(sid), args=[self.prefix, now, sid or "", *args])
        except (rx.ConnectionError, rx.TimeoutError, OSError, asyncio.TimeoutError) as e:
            raise self._unavailable(e) from None
        except rx.ResponseError as e:
            if str(e).startswith("OOM"):  # Redis's maxmemory came before max_store_bytes
                raise StoreFull("the session store's Redis is at its maxmemory; this page was not applied, "
                                "retry it later", retry_after_s=RETRY_AFTER_S) from None
            if str(e).split(" ", 1)[0] in ("READONLY", "MASTERDOWN", "LOADING", "CLUSTERDOWN", "TRYAGAIN"):
                raise self._unavailable(e) from None
            raise
        if self._down:
            self._down = False
            logger.warning("session store %s reachable again", self._where())
        return out

    def _unavailable(self, e: Exception) -> StoreUnavailable:
        if not self._down:  # once per outage, not once per request
            self._down = True
            logger.warning("session store %s unreachable: %s: %s", self._where(), type(e).__name__, e)
        return StoreUnavailable(f"session store unreachable ({type(e).__name__}); retry shortly",
                                retry_after_s=RETRY_AFTER_S)

    def _where(self) -> str:
        return re.sub(r"//[^@/]*@", "//", self.url)  # without the password

    # --- the operations -------------------------------------------------------------

    @staticmethod
    def _status(out: list) -> str:
        return out[0].decode()

    def _meta(self, sid: str, out: list) -> dict[str, Any]:
        _, model, ttl, next_seq, sizes, last = out[:6]
        return {
            "session_id": sid,
            "model": model.decode(),
            "next_seq": int(next_seq),
            "expires_in_s": float(ttl),  # every access renews the TTL
            "ttl_s": float(ttl),
            "chain_bytes": [int(x) for x in sizes.split(b",")] if sizes else [],
            "last_result": json.loads(last) if last else None,
        }

    async def _head(self, sid: str, with_chain: bool) -> tuple[dict[str, Any], list[bytes]]:
        out = await self._run("head", sid, "1" if with_chain else "0")
        if self._status(out) != "ok":
            raise not_found(sid)
        return self._meta(sid, out), list(out[6:])

    async def create(self, session_id, model, ttl_s):
        ttl_ms = max(1, math.ceil(float(ttl_s) * 1000))
        out = await self._run("create", session_id, model, repr(float(ttl_s)), str(ttl_ms), str(self.max_sessions))
        if self._status(out) == "too_many":
            raise too_many_sessions(int(out[1]), self.max_sessions, float(out[2]))
        return {"session_id": session_id, "model": model, "next_seq": 0, "expires_in_s": float(ttl_s),
                "ttl_s": float(ttl_s), "chain_bytes": [], "last_result": None}

    async def head(self, session_id):
        return (await self._head(session_id, with_chain=False))[0]

    async def load(self, session_id):
        meta, chain = await self._head(session_id, with_chain=True)
        return meta, chain or None

    async def result(self, session_id, seq):
        out = await self._run("result", session_id, str(int(seq)))
        status = self._status(out)
        if status == "not_found":
            raise not_found(session_id)
        if status == "no_answer":
            raise no_answer(session_id, seq)
        if status == "not_retained":
            raise not_retained(seq, self.results_retained, int(out[1]))
        return json.loads(out[1])

    async def commit(self, session_id, seq, blob, result, delta=False):
        out = await self._run("commit", session_id, str(int(seq)), bytes(blob), json.dumps(result),
                              "1" if delta else "0", str(self.max_store_bytes), str(self.results_retained))
        status = self._status(out)
        if status == "ok":
            return None
        if status == "ahead":
            return int(out[1])
        if status == "not_found":
            raise not_found(session_id)
        if status == "delta_first":
            raise delta_needs_full(session_id)
        if status == "full":
            raise store_full(int(out[1]), self.max_store_bytes, float(out[2]))
        raise InternalError(f"session store: unexpected answer {status!r}")

    async def delete(self, session_id):
        out = await self._run("delete", session_id)
        if self._status(out) != "ok":
            raise not_found(session_id)
        return self._meta(session_id, out)

    async def stats(self):
        out = await self._run("stats", None)
        counts = out[2:]
        per_model = {counts[i].decode(): int(counts[i + 1]) for i in range(0, len(counts), 2)}
        return {"sessions": int(out[0]), "bytes": int(out[1]), "per_model": per_model}

    # --- the fill gauges --------------------------------------------------------------

    async def holds_gauge_lease(self) -> bool:
        """Whether this client exports the store's fill (one client per store
        does, so the alerts' sums count the store once)."""
        from redis import exceptions as rx

        self._redis()
        try:
            return bool(await self._scripts["lease"](keys=[self.prefix + "gauges"],
                                                     args=[self._me, str(GAUGE_LEASE_MS)]))
        except (rx.RedisError, OSError, asyncio.TimeoutError) as e:
            raise self._unavailable(e) from None

    async def report_fill(self):
        if not await self.holds_gauge_lease():
            return
        if self._gauges is None:
            self._gauges = StoreFillGauges(self.max_store_bytes)
        self._gauges.set(await self.stats())
