"""Rate limits per API key: a token bucket per key, its size set per role.

Each role has `(rate per second, burst)` in settings (`EUM_RATE_LIMITS`); a key may
spend `burst` requests at once and then `rate` a second. Over the limit the answer is
429 `rate_limited` with `Retry-After` (whole seconds until a token is back).

Shared across workers through Redis when it is configured: one bucket per key at
`{prefix}rl:{key_id}`, refilled and drawn by one Lua script (one round trip, the
Redis server's clock, so workers' clocks do not matter). To keep Redis off the
payment path a worker draws tokens in small *leases* (about 1/100 of a second's rate,
at most `LEASE_TOKENS_MAX`) and spends them locally; a lease unspent after `LEASE_S`
is dropped. Every token still comes out of the shared bucket, so all workers together
never pass the limit; a dropped lease only makes it stricter, never looser. Roles with
low rates draw one token per request (every call asks Redis: they are not hot). A key
refused by Redis is refused locally until its next token is due, so a key hammering
past its limit does not hammer Redis too.

If Redis is down, slow or flushed, a request is never refused for that: the worker
falls back to a bucket of its own with the same rate (so N workers admit up to N times
the rate until Redis is back) and leaves Redis alone for `BREAKER_OPEN_S`. A flushed
bucket starts full again, as after a restart."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from dataclasses import dataclass

import structlog

from ledger.errors import EumError
from ledger.keys import Principal

log = structlog.get_logger("api.ratelimit")

LEASE_S = 0.5  # a leased token not spent within this is dropped
LEASE_SHARE = 0.01  # a lease is this share of a second's rate ...
LEASE_TOKENS_MAX = 64  # ... at most this many tokens
BREAKER_OPEN_S = 2.0
TIMEOUT_S = 0.05  # the default of EUM_REDIS_TIMEOUT_MS, for settings without it
KEYS_MAX = 100_000  # per-worker state kept for at most this many keys

# KEYS[1] the bucket; ARGV: rate per second, burst (capacity), tokens wanted.
# Returns {tokens granted (0..wanted), µs until one token is back when none was}.
TAKE_LUA = """
local rate = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1])
local at = tonumber(state[2])
if tokens == nil or at == nil then
  tokens = capacity
  at = now
end
if now > at then
  tokens = math.min(capacity, tokens + (now - at) * rate / 1000000)
end
local granted = math.min(want, math.floor(tokens))
tokens = tokens - granted
local wait_us = 0
if granted < 1 then
  wait_us = math.ceil((1 - tokens) * 1000000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens), 'at', string.format('%d', now))
redis.call('PEXPIRE', KEYS[1], math.ceil(capacity / rate * 1000) + 1000)
return {granted, wait_us}
"""


class RateLimited(EumError):
    status, code, title = 429, "rate_limited", "Too many requests for this API key"

    def __init__(self, detail: str = "", retry_after_s: int = 1, **extra):
        super().__init__(detail, **extra)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, slots=True)
class Rate:
    per_s: float
    burst: int

    def __post_init__(self) -> None:
        assert self.per_s > 0 and self.burst >= 1, self

    @property
    def lease_tokens(self) -> int:
        return max(1, min(LEASE_TOKENS_MAX, int(self.per_s * LEASE_SHARE), self.burst // 4))


class Bucket:
    """A token bucket in one process (the fallback, and the tests' reference)."""

    __slots__ = ("tokens", "at")

    def __init__(self, rate: Rate, now: float):
        self.tokens = float(rate.burst)
        self.at = now

    def take(self, rate: Rate, now: float) -> float:
        """0 when a token was taken, else the seconds until one is back."""
        if now > self.at:
            self.tokens = min(float(rate.burst), self.tokens + (now - self.at) * rate.per_s)
            self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / rate.per_s


class RateLimiter:
    def __init__(self, rates: dict[str, Rate], *, redis_client=None, prefix: str = "eum:",
                 clock=time.monotonic):
        self._rates = rates
        self._redis = redis_client
        self._script = redis_client.register_script(TAKE_LUA) if redis_client is not None else None
        self._prefix = prefix
        self._clock = clock
        self._leases: dict[str, list[float]] = {}  # key_id -> [tokens, expires_at]
        self._local: dict[str, Bucket] = {}
        self._refused_until: dict[str, float] = {}  # key_id -> no token before this
        self._lock = threading.Lock()
        self._redis_down_until = 0.0
        self._inflight: dict[str, asyncio.Future] = {}  # key_id -> the lease being drawn

    @classmethod
    def from_settings(cls, settings) -> "RateLimiter":
        rates = {role: Rate(float(per_s), int(burst)) for role, (per_s, burst) in settings.rate_limits.items()}
        client = None
        if settings.redis_url and rates:
            import redis.asyncio as aioredis

            timeout_s = getattr(settings, "redis_timeout_ms", TIMEOUT_S * 1000) / 1000  # EUM_REDIS_TIMEOUT_MS
            client = aioredis.from_url(settings.redis_url, socket_timeout=timeout_s,
                                       socket_connect_timeout=timeout_s, health_check_interval=0)
        return cls(rates, redis_client=client, prefix=settings.redis_prefix)

    def bucket_key(self, key_id: str) -> str:
        return f"{self._prefix}rl:{key_id}"

    async def check(self, principal: Principal) -> None:
        """Spend one of the key's tokens, or raise RateLimited. No I/O while a lease lasts.

        One lease request per key at a time (single flight): requests that find the
        lease spent while another is being drawn wait for it and spend from it. (Drawn
        concurrently, each request's lease replaced the last, so a worker with 32
        requests in flight drew ~32 leases for each one it spent and emptied a
        10,000/s bucket at ~2,000 requests a second.)"""
        rate = self._rates.get(principal.role)
        if rate is None:
            return
        key_id = principal.key_id
        while True:
            now = self._clock()
            lease = self._leases.get(key_id)
            if lease is not None and lease[0] >= 1 and lease[1] > now:
                lease[0] -= 1
                return
            until = self._refused_until.get(key_id)
            if until is not None and now < until:  # refused a moment ago: no need to ask Redis again
                raise self._refusal(principal, rate, until - now)
            if self._script is None or now < self._redis_down_until:
                break
            pending = self._inflight.get(key_id)
            if pending is not None:
                await asyncio.shield(pending)  # another request is drawing a lease: spend from it
                continue
            drawing = asyncio.get_running_loop().create_future()
            self._inflight[key_id] = drawing
            try:
                granted, wait_us = await self._script(keys=[self.bucket_key(key_id)],
                                                      args=[rate.per_s, rate.burst, rate.lease_tokens])
            except Exception as error:  # Redis trouble never refuses a request: see the module doc
                self._redis_down_until = now + BREAKER_OPEN_S
                log.warning("ratelimit.redis_unavailable", error=type(error).__name__,
                            breaker_open_s=BREAKER_OPEN_S)
                break
            else:
                if int(granted) >= 1:
                    self._remember(self._leases, key_id, [int(granted) - 1, now + LEASE_S])
                    return
                self._remember(self._refused_until, key_id, now + int(wait_us) / 1e6)
                raise self._refusal(principal, rate, int(wait_us) / 1e6)
            finally:
                del self._inflight[key_id]
                drawing.set_result(None)
        self._take_local(principal, rate, now)

    def _take_local(self, principal: Principal, rate: Rate, now: float) -> None:
        with self._lock:
            bucket = self._local.get(principal.key_id)
            if bucket is None:
                bucket = Bucket(rate, now)
                self._remember(self._local, principal.key_id, bucket)
            wait_s = bucket.take(rate, now)
        if wait_s > 0:
            raise self._refusal(principal, rate, wait_s)

    @staticmethod
    def _remember(table: dict, key_id: str, value) -> None:
        if len(table) >= KEYS_MAX and key_id not in table:
            table.clear()  # bounded; a cleared bucket starts full, as after a restart
        table[key_id] = value

    @staticmethod
    def _refusal(principal: Principal, rate: Rate, wait_s: float) -> RateLimited:
        retry_after_s = max(1, math.ceil(wait_s))
        return RateLimited(f"this key may send {rate.per_s:g} requests a second (bursts of {rate.burst}); "
                           f"retry after {retry_after_s} s", retry_after_s=retry_after_s,
                           limit_per_s=rate.per_s, burst=rate.burst)

    async def close(self) -> None:
        if self._redis is not None:
            try:
                await self._redis.aclose()
            except Exception:  # closing a dead connection: nothing to keep
                pass
