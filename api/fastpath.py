"""Redis: a shared cache of answered requests, so a client's retry storm is answered
without touching the database. It holds nothing the book of record does not: losing
it (flush, restart, outage) costs a database read per replay, never money.

Every call has a short timeout, and after a failure Redis is left alone for a few
seconds (a circuit breaker), so a slow or dead Redis cannot slow payments down."""

from __future__ import annotations

import time

import orjson
import structlog

log = structlog.get_logger("api.fastpath")

TIMEOUT_S = 0.05
BREAKER_OPEN_S = 5.0


class IdempotencyCache:
    def __init__(self, client, prefix: str, ttl_s: int):
        self._client = client
        self._prefix = prefix
        self._ttl_s = ttl_s
        self._open_until = 0.0

    @classmethod
    def connect(cls, url: str | None, prefix: str, ttl_s: int) -> "IdempotencyCache":
        if not url:
            return cls(None, prefix, ttl_s)
        import redis.asyncio as aioredis

        client = aioredis.from_url(url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S,
                                   health_check_interval=30)
        return cls(client, prefix, ttl_s)

    @property
    def enabled(self) -> bool:
        return self._client is not None

    def _available(self) -> bool:
        return self._client is not None and time.monotonic() >= self._open_until

    def _trip(self, error: Exception) -> None:
        self._open_until = time.monotonic() + BREAKER_OPEN_S
        log.warning("redis.unavailable", error=str(error)[:200], breaker_open_s=BREAKER_OPEN_S)

    def _key(self, kind: str, key: str) -> str:
        return f"{self._prefix}idem:{kind}:{key}"

    async def get(self, kind: str, key: str) -> tuple[str, dict] | None:
        if not self._available():
            return None
        try:
            raw = await self._client.get(self._key(kind, key))
        except Exception as error:  # any Redis trouble: fall back to the database
            self._trip(error)
            return None
        if raw is None:
            return None
        stored = orjson.loads(raw)
        return stored["h"], stored["b"]

    async def put(self, kind: str, key: str, request_hash: str, body: dict) -> None:
        if not self._available():
            return
        try:
            await self._client.set(self._key(kind, key), orjson.dumps({"h": request_hash, "b": body}), ex=self._ttl_s)
        except Exception as error:
            self._trip(error)

    async def ping(self) -> bool:
        if self._client is None:
            return True
        try:
            return bool(await self._client.ping())
        except Exception:
            return False

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
