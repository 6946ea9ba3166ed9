"""Replays answered without the book: a per-worker table of recent answers, and Redis.

It holds nothing the book of record does not: the book checks every id itself (after
the member lock, against the stored request hash), so losing this cache (flush,
restart, outage, a replay landing on another worker) costs a database read for the
next replay of an id, never money and never a second charge: that replay's answer,
read from the book, is cached again as a new answer is.

- Local: every answer this worker's writer gave, new or a replay read from the book,
  goes into a bounded in-process table (`LOCAL_ENTRIES_MAX`, oldest out first). A
  replay that lands here is answered with no I/O at all.
- Redis, with the `lookup` setting "redis": on a local miss the worker looks the id up
  in Redis (every first-time id costs one GET: protects the database from a retry
  storm spread over workers), and the writer thread stores each batch's answers there
  with one pipelined round trip (sync client) just after its callers are answered (a
  round trip nobody waits on; a retry racing that millisecond on another worker is
  answered by the book, which holds the same bytes). With "local", the default, there
  is no Redis call for replays at all, on the request path or after it (measured in
  docs/performance.md: an asyncio Redis GET cost more CPU than the whole framework's
  request handling; the stores, ~8% of the writer thread, were read by nobody).

Every Redis call has a short timeout, and after a failure Redis is left alone for a
few seconds (a circuit breaker), so a slow or dead Redis cannot slow payments down."""

from __future__ import annotations

import collections
import threading
import time
from typing import Iterable

import orjson
import structlog

log = structlog.get_logger("api.fastpath")

TIMEOUT_S = 0.05  # default bound on each Redis call: setting EUM_REDIS_TIMEOUT_MS
BREAKER_OPEN_S = 5.0
LOCAL_ENTRIES_MAX = 20_000  # ~600 bytes each as JSON: ~12 MiB per worker
LOOKUPS = ("local", "redis")


class IdempotencyCache:
    def __init__(self, client, prefix: str, ttl_s: int, *, lookup: str = "local", writer=None, book: str = ""):
        assert lookup in LOOKUPS, lookup
        self._client = client  # asyncio client: lookups, ping
        self._writer = writer  # sync client: the writer thread's batched stores
        # The answers' keys name the book they came from (`book_tag`), after `idem:` so
        # that one pattern still finds them all: two books on one Redis database and
        # prefix (the default `eum:` of a staging and a live service, say) answered each
        # other's ids, a payment the book never held read back as approved (the faults
        # audit). Empty: the keys as before (tests, a cache of no book).
        self._prefix = f"{prefix}idem:{book}:" if book else f"{prefix}idem:"
        self._ttl_s = ttl_s
        self._lookup_redis = lookup == "redis"
        self._open_until = 0.0
        self._local: collections.OrderedDict[str, tuple[str, bytes]] = collections.OrderedDict()
        self._local_lock = threading.Lock()

    @classmethod
    def connect(cls, url: str | None, prefix: str, ttl_s: int, lookup: str = "local",
                timeout_s: float = TIMEOUT_S, book: str = "") -> "IdempotencyCache":
        if not url:
            return cls(None, prefix, ttl_s, lookup=lookup, book=book)
        import redis
        import redis.asyncio as aioredis

        client = aioredis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                   health_check_interval=30)
        # Answers are stored in Redis only for workers that look them up there: with
        # "local" nobody reads them, and storing them cost the writer thread ~8% of its
        # time (one pipelined round trip per batch) and Redis its own CPU on the same
        # machine (docs/performance.md).
        writer = (redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                       health_check_interval=30) if lookup == "redis" else None)
        return cls(client, prefix, ttl_s, lookup=lookup, writer=writer, book=book)

    @property
    def enabled(self) -> bool:
        return self._client is not None

    def _available(self) -> bool:
        return self._client is not None and time.monotonic() >= self._open_until

    def _trip(self, error: Exception) -> None:
        """Open the breaker; warn when it opens. The calls already in flight when Redis
        went away fail after it, each: they keep it open without a line of their own
        (one each had been 164 lines in a second at 200 requests/s)."""
        now = time.monotonic()
        opens = now >= self._open_until
        self._open_until = now + BREAKER_OPEN_S
        if opens:
            log.warning("redis.unavailable", error=str(error)[:200], breaker_open_s=BREAKER_OPEN_S)

    def _key(self, kind: str, key: str) -> str:
        return f"{self._prefix}{kind}:{key}"

    async def get(self, kind: str, key: str) -> tuple[str, bytes] | None:
        """(request hash, the answer's JSON bytes) of an id answered before, or None."""
        local = self._local.get(self._key(kind, key))
        if local is not None:
            return local
        if not self._lookup_redis or not self._available():
            return None
        try:
            raw = await self._client.get(self._key(kind, key))
        except Exception as error:  # any Redis trouble: fall back to the database
            self._trip(error)
            return None
        if raw is None:
            return None
        stored = orjson.loads(raw)
        return stored["h"], orjson.dumps(stored["b"])

    @staticmethod
    def _items(answers: Iterable[tuple[str, str, str, dict | bytes]], key) -> list[tuple[str, str, bytes]]:
        return [(key(kind, k), digest, body if isinstance(body, bytes) else orjson.dumps(body))
                for kind, k, digest, body in answers]

    def remember(self, answers: Iterable[tuple[str, str, str, dict | bytes]]) -> list[tuple[str, str, bytes]]:
        """Store (kind, id, request hash, body as JSON bytes or dict) answers in this
        worker's table; no I/O. Called by the writer thread after the batch committed,
        before its callers are answered. Returns the items for `publish`."""
        items = self._items(answers, self._key)
        if items:
            with self._local_lock:
                local = self._local
                for redis_key, digest, body in items:
                    local[redis_key] = (digest, body)
                for _ in range(len(local) - LOCAL_ENTRIES_MAX):
                    local.popitem(last=False)  # oldest out first
        return items

    def publish(self, items: list[tuple[str, str, bytes]]) -> None:
        """The items of `remember` to Redis, one pipelined round trip. The writer thread
        calls it once the batch's callers have been answered: nothing waits on Redis."""
        if not items or self._writer is None or not self._available():
            return
        try:
            pipe = self._writer.pipeline(transaction=False)
            for redis_key, digest, body in items:
                pipe.set(redis_key, b'{"h":"' + digest.encode() + b'","b":' + body + b"}", ex=self._ttl_s)
            pipe.execute()
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
        if self._writer is not None:
            self._writer.close()
