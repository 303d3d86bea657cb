"""Client keys and per-key rate limits, for every transport (gRPC and HTTP).

A server has no keys (anyone may call it), or one or more: the bearer token (--auth-token or
--auth-token-file) and the keys of --api-keys-file, one per line:

    # comment
    team-a-key                 # the server's --rate-limit-per-minute applies
    weblate-key   600          # this key: at most 600 requests a minute

gRPC clients send a key as `authorization: Bearer <key>`, HTTP clients the same header or, as
LibreTranslate clients do, an `api_key` field. Each key has a token bucket: a burst of up to one
minute's allowance, refilled continuously, so a steady client at the limit is never refused.
"""

from __future__ import annotations

import dataclasses
import hmac
import threading
import time
from pathlib import Path


class KeyFileError(ValueError):
    pass


@dataclasses.dataclass
class _Bucket:
    per_minute: float
    tokens: float
    updated: float


class ClientKeys:
    """The accepted keys and their rate limits. Thread-safe."""

    def __init__(self, limits: dict[str, int], default_per_minute: int = 0):
        # key -> requests per minute (0: no limit)
        self._limits = {key: (limit if limit else default_per_minute) for key, limit in limits.items()}
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, token: str, api_keys_file: str, default_per_minute: int) -> "ClientKeys":
        limits: dict[str, int] = {token: 0} if token else {}
        if api_keys_file:
            limits.update(read_key_file(Path(api_keys_file)))
        return cls(limits, default_per_minute)

    @property
    def required(self) -> bool:
        """Whether callers must present a key (any key configured)."""
        return bool(self._limits)

    def match(self, given: str) -> str | None:
        """The configured key equal to `given`, compared in constant time per key (no early exit
        on the first match, so timing does not tell which key, or how much of one, matched)."""
        found = None
        given_bytes = given.encode("utf-8", "surrogatepass")
        for key in self._limits:
            if hmac.compare_digest(given_bytes, key.encode("utf-8", "surrogatepass")):
                found = key
        return found

    def take(self, key: str, now: float | None = None) -> float:
        """Spend one request of `key`'s allowance: 0 when allowed, else the seconds until the
        next request would be."""
        per_minute = self._limits.get(key, 0)
        if not per_minute:
            return 0.0
        now = time.monotonic() if now is None else now
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = _Bucket(per_minute, float(per_minute), now)
            bucket.tokens = min(float(per_minute), bucket.tokens + (now - bucket.updated) * per_minute / 60.0)
            bucket.updated = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) * 60.0 / per_minute

    def limit_of(self, key: str) -> int:
        return self._limits.get(key, 0)


def read_key_file(path: Path) -> dict[str, int]:
    """`key [requests_per_minute]` lines; `#` starts a comment."""
    limits: dict[str, int] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) > 2 or (len(fields) == 2 and not fields[1].isdigit()):
            raise KeyFileError(f"{path}:{number}: expected `key [requests_per_minute]`")
        limits[fields[0]] = int(fields[1]) if len(fields) == 2 else 0
    return limits
