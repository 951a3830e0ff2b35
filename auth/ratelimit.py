"""Failed-attempt limiting: per user name and per source network, sliding window.

A 6-digit TOTP has a million values and three are valid at any time, so unlimited
guessing would break it in hours. After ``max_failures`` failures within ``window``
seconds, further attempts for that user (or from that source) are refused without
even being verified, until the oldest of those failures is ``window`` old.

Sources are grouped by network, not address: an IPv6 attacker owns a whole /64, so
by default every address of a /64 (IPv4: the single /32) shares one budget.

Names are case-folded (LDAP uids match case-insensitively, so ``Alice`` and
``alice`` must share a budget). Unknown names are limited exactly like known ones,
so the limiter reveals nothing about who exists. A success clears the user's
failures, never the source's.

The state is per gateway process; with N gateways an attacker gets at most N times
the budget. That is acceptable for these limits; a shared limiter would need etcd.
Per-user limiting lets an attacker lock a user out for ``window`` seconds: that is
the usual trade-off and why the window is short by default.
"""

from __future__ import annotations

import ipaddress
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["FailureLimiter", "RateLimitPolicy", "source_network"]

Clock = Callable[[], float]


@dataclass(frozen=True)
class RateLimitPolicy:
    """At most ``max_failures`` failures within ``window`` seconds."""

    max_failures: int = 5
    window: float = 300.0

    def __post_init__(self) -> None:
        if self.max_failures < 1:
            raise ValueError(f"max_failures must be at least 1, got {self.max_failures}")
        if self.window <= 0:
            raise ValueError(f"window must be positive seconds, got {self.window}")


def source_network(source: str | None, ipv6_prefix: int = 64, ipv4_prefix: int = 32) -> str:
    """The key a source address is limited under: its IPv6 /64 or IPv4 /32 network.

    IPv4-mapped IPv6 addresses count as IPv4. Anything that is not an address (a unix
    socket peer, None) is used as it is."""
    if not source:
        return "unknown"
    try:
        address = ipaddress.ip_address(source.split("%", 1)[0])
    except ValueError:
        return source
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = ipv6_prefix if address.version == 6 else ipv4_prefix
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


class _Windows:
    """Failure timestamps per key, with a bound on how many keys are kept."""

    def __init__(self, policy: RateLimitPolicy, max_keys: int) -> None:
        self.policy = policy
        self.max_keys = max_keys
        self.failures: dict[str, deque[float]] = {}

    def _recent(self, key: str, now: float) -> deque[float] | None:
        times = self.failures.get(key)
        if times is None:
            return None
        while times and times[0] <= now - self.policy.window:
            times.popleft()
        if not times:
            del self.failures[key]
            return None
        return times

    def retry_after(self, key: str, now: float) -> float:
        """0 if an attempt is allowed, else seconds until it is."""
        times = self._recent(key, now)
        if times is None or len(times) < self.policy.max_failures:
            return 0.0
        # Allowed again when enough of the oldest failures have aged out.
        return times[len(times) - self.policy.max_failures] + self.policy.window - now

    def record(self, key: str, now: float) -> None:
        times = self._recent(key, now)
        if times is None:
            if len(self.failures) >= self.max_keys:
                self._sweep(now)
            times = self.failures[key] = deque(maxlen=self.policy.max_failures)
        times.append(now)

    def clear(self, key: str) -> None:
        self.failures.pop(key, None)

    def _sweep(self, now: float) -> None:
        for key in list(self.failures):
            self._recent(key, now)
        # Still full (a spray of names or sources): forget the stalest keys first.
        excess = len(self.failures) - self.max_keys + 1
        if excess > 0:
            stalest = sorted(self.failures, key=lambda k: self.failures[k][-1])[:excess]
            for key in stalest:
                del self.failures[key]


class FailureLimiter:
    """Per-user and per-source failure budgets. Not thread-safe; use it from the event
    loop only (it never blocks). ``clock`` is monotonic seconds; tests inject one."""

    def __init__(self, per_user: RateLimitPolicy | None = None, per_source: RateLimitPolicy | None = None, *,
                 clock: Clock = time.monotonic, ipv6_prefix: int = 64, ipv4_prefix: int = 32,
                 max_keys: int = 100_000) -> None:
        if not 0 <= ipv6_prefix <= 128 or not 0 <= ipv4_prefix <= 32:
            raise ValueError(f"bad source prefixes: IPv6 /{ipv6_prefix}, IPv4 /{ipv4_prefix}")
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, got {max_keys}")
        self.per_user = per_user or RateLimitPolicy(max_failures=5, window=300.0)
        self.per_source = per_source or RateLimitPolicy(max_failures=20, window=300.0)
        self.clock = clock
        self.ipv6_prefix = ipv6_prefix
        self.ipv4_prefix = ipv4_prefix
        self._users = _Windows(self.per_user, max_keys)
        self._sources = _Windows(self.per_source, max_keys)

    def _keys(self, name: str, source: str | None) -> tuple[str, str]:
        return name.casefold(), source_network(source, self.ipv6_prefix, self.ipv4_prefix)

    def retry_after(self, name: str, source: str | None) -> float:
        """0.0 if ``name`` from ``source`` may try now, else the seconds to wait."""
        user, network = self._keys(name, source)
        now = self.clock()
        return max(self._users.retry_after(user, now), self._sources.retry_after(network, now))

    def allowed(self, name: str, source: str | None) -> bool:
        return self.retry_after(name, source) <= 0.0

    def record_failure(self, name: str, source: str | None) -> None:
        user, network = self._keys(name, source)
        now = self.clock()
        self._users.record(user, now)
        self._sources.record(network, now)

    def record_success(self, name: str, source: str | None) -> None:
        user, _ = self._keys(name, source)
        self._users.clear(user)

    @property
    def tracked_keys(self) -> int:
        """How many users and sources have failures on record (memory use)."""
        return len(self._users.failures) + len(self._sources.failures)
