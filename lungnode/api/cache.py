"""A short-lived cache of computed answers (``/stats``): Redis when configured, else in process.

A cached answer is found by a key that names what it was computed from (see
:mod:`lungnode.api.stats`), so a write changes the key instead of having to
reach every cache of every process: any writer, in any role, invalidates
without knowing the cache exists. The time to live only bounds how long an
unused answer is kept.

The cache never decides whether a request succeeds: when Redis cannot be
reached, each lookup is a miss (the answer is computed) and the cache is
left alone for a few seconds before it is tried again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from typing import Any, Protocol

from lungnode.api.middleware import REDIS_TIMEOUT_SECONDS, is_redis_url, rate_limit_storage
from lungnode.config import Settings

logger = logging.getLogger(__name__)

#: Seconds an unreachable Redis is left alone before it is tried again.
RETRY_SECONDS = 5.0
KEY_PREFIX = "lungnode:cache:"


class AnswerCache(Protocol):
    def get(self, key: str) -> Any | None:
        """The value stored under ``key`` and not expired, or None."""
        ...

    def put(self, key: str, value: Any) -> None:
        """Keep ``value`` (JSON-serialisable) under ``key`` for the time to live."""
        ...


class NoCache:
    """``stats_cache_seconds = 0``: every answer is computed."""

    def get(self, key: str) -> Any | None:
        return None

    def put(self, key: str, value: Any) -> None:
        return None


class MemoryCache:
    """In this process; the least recently used answers go first past ``max_entries``."""

    def __init__(self, ttl_seconds: float, max_entries: int = 256) -> None:
        self.ttl = ttl_seconds
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> Any | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            expires, text = entry
            if expires <= time.monotonic():
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
        # Stored as JSON, like Redis: a caller cannot change what the next one reads.
        return json.loads(text)

    def put(self, key: str, value: Any) -> None:
        text = json.dumps(value)
        with self._lock:
            self._entries[key] = (time.monotonic() + self.ttl, text)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)


class RedisCache:
    """Shared by every API process and gunicorn worker that names the same Redis.

    ``namespace`` keeps apart the nodes (databases) that share one Redis: the
    keys of :mod:`lungnode.api.stats` say what an answer was computed from
    within one database only.
    """

    def __init__(self, url: str, ttl_seconds: float, namespace: str) -> None:
        import redis

        self.prefix = f"{KEY_PREFIX}{namespace}:"
        self.ttl_ms = max(1, int(ttl_seconds * 1000))
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=REDIS_TIMEOUT_SECONDS,
            socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
        )
        self._redis_error = redis.RedisError
        self._retry_at = 0.0
        self._lock = threading.Lock()

    def _usable(self) -> bool:
        return time.monotonic() >= self._retry_at

    def _failed(self, exc: Exception) -> None:
        with self._lock:
            if self._retry_at == 0.0:
                logger.warning("cache: Redis unreachable (%s); computing answers meanwhile", exc)
            self._retry_at = time.monotonic() + RETRY_SECONDS

    def _worked(self) -> None:
        if self._retry_at:
            with self._lock:
                if self._retry_at:
                    logger.info("cache: Redis reachable again")
                self._retry_at = 0.0

    def get(self, key: str) -> Any | None:
        if not self._usable():
            return None
        try:
            text = self._client.get(self.prefix + key)
        except self._redis_error as exc:
            self._failed(exc)
            return None
        self._worked()
        return None if text is None else json.loads(text)

    def put(self, key: str, value: Any) -> None:
        if not self._usable():
            return
        try:
            self._client.set(self.prefix + key, json.dumps(value), px=self.ttl_ms)
        except self._redis_error as exc:
            self._failed(exc)
            return
        self._worked()


def cache_url(settings: Settings) -> str:
    """``cache_url``, else the rate limiter's store when that is Redis; "" for in process."""
    if settings.cache_url:
        return settings.cache_url
    limiter = rate_limit_storage(settings)
    return limiter if is_redis_url(limiter) else ""


def make_cache(settings: Settings) -> AnswerCache:
    if settings.stats_cache_seconds <= 0:
        return NoCache()
    url = cache_url(settings)
    if is_redis_url(url):
        database = hashlib.sha256(settings.effective_database_url.encode()).hexdigest()[:16]
        return RedisCache(url, settings.stats_cache_seconds, namespace=database)
    return MemoryCache(settings.stats_cache_seconds)
