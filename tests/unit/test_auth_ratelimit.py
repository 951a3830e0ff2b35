"""Failed-attempt limiting per user and per source network, on a hand-driven clock."""

from __future__ import annotations

import pytest

from tests.support.auth import ManualClock
from ucloud.auth.ratelimit import FailureLimiter, RateLimitPolicy, source_network


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(1000.0)


def limiter(clock: ManualClock, users: int = 3, sources: int = 10, window: float = 60.0) -> FailureLimiter:
    return FailureLimiter(RateLimitPolicy(users, window), RateLimitPolicy(sources, window), clock=clock)


def test_n_failures_within_the_window_block_the_user(clock: ManualClock) -> None:
    limit = limiter(clock)
    for _ in range(3):
        assert limit.allowed("alice", "2001:db8::1")
        limit.record_failure("alice", "2001:db8::1")
        clock.advance(1)
    assert not limit.allowed("alice", "2001:db8::1")
    assert not limit.allowed("alice", "2001:db8:ffff::9")  # from anywhere
    assert limit.allowed("bob", "2001:db8::1")  # others are not affected


def test_the_block_lasts_until_the_window_has_passed(clock: ManualClock) -> None:
    limit = limiter(clock)
    for _ in range(3):
        limit.record_failure("alice", "192.0.2.1")
        clock.advance(10)
    # Failures at 1000, 1010, 1020; now 1030: free again at 1000 + 60.
    assert limit.retry_after("alice", "192.0.2.1") == pytest.approx(30.0)
    clock.advance(29.9)
    assert not limit.allowed("alice", "192.0.2.1")
    clock.advance(0.1)
    assert limit.allowed("alice", "192.0.2.1")


def test_the_window_slides(clock: ManualClock) -> None:
    limit = limiter(clock)
    limit.record_failure("alice", "192.0.2.1")
    clock.advance(50)
    limit.record_failure("alice", "192.0.2.1")
    limit.record_failure("alice", "192.0.2.1")
    assert not limit.allowed("alice", "192.0.2.1")
    clock.advance(10)  # the first failure ages out: two remain
    assert limit.allowed("alice", "192.0.2.1")
    limit.record_failure("alice", "192.0.2.1")
    assert not limit.allowed("alice", "192.0.2.1")


def test_a_success_clears_the_user_but_not_the_source(clock: ManualClock) -> None:
    limit = limiter(clock, users=3, sources=4)
    for name in ("alice", "alice", "bob"):
        limit.record_failure(name, "192.0.2.1")
    limit.record_success("alice", "192.0.2.1")
    for _ in range(2):
        limit.record_failure("alice", "192.0.2.2")
    assert limit.allowed("alice", "192.0.2.2")  # only the two new failures count
    limit.record_failure("carol", "192.0.2.1")
    assert not limit.allowed("dave", "192.0.2.1")  # the source's four failures all still count


def test_one_source_guessing_many_users_is_blocked(clock: ManualClock) -> None:
    limit = limiter(clock, users=3, sources=5)
    for i in range(5):
        limit.record_failure(f"user{i}", "2001:db8::1")
    assert not limit.allowed("someone-else", "2001:db8::1")
    assert limit.allowed("someone-else", "2001:db9::1")


def test_all_addresses_of_an_ipv6_64_share_one_budget(clock: ManualClock) -> None:
    limit = limiter(clock, users=100, sources=3)
    for host in ("::1", "::2", "::dead:beef"):
        limit.record_failure(f"u{host}", f"2001:db8:1:2{host}")
    assert not limit.allowed("x", "2001:db8:1:2:ffff:ffff:ffff:ffff")
    assert limit.allowed("x", "2001:db8:1:3::1")  # the next /64


def test_source_networks() -> None:
    assert source_network("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert source_network("fe80::1%eth0") == "fe80::/64"
    assert source_network("192.0.2.7") == "192.0.2.7/32"
    assert source_network("::ffff:192.0.2.7") == "192.0.2.7/32"
    assert source_network("2001:db8::1", ipv6_prefix=48) == "2001:db8::/48"
    assert source_network(None) == "unknown"
    assert source_network("unix:/run/ucloud.sock") == "unix:/run/ucloud.sock"


def test_names_are_case_folded(clock: ManualClock) -> None:
    limit = limiter(clock)
    for name in ("Alice", "ALICE", "alice"):
        limit.record_failure(name, "192.0.2.1")
    assert not limit.allowed("aLiCe", "198.51.100.1")


def test_memory_stays_bounded_under_a_spray_of_names(clock: ManualClock) -> None:
    limit = FailureLimiter(RateLimitPolicy(3, 60), RateLimitPolicy(1000, 60), clock=clock, max_keys=100)
    for i in range(5000):
        limit.record_failure(f"user{i}", f"2001:db8:{i:x}::1")
    assert limit.tracked_keys <= 200
    clock.advance(61)
    limit.record_failure("late", "192.0.2.1")
    assert limit.tracked_keys <= 2 + 100


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_failures": 0}, "max_failures must be at least 1"),
    ({"window": 0}, "window must be positive"),
])
def test_bad_policies_are_refused(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RateLimitPolicy(**kwargs)  # type: ignore[arg-type]


def test_bad_limiter_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="prefixes"):
        FailureLimiter(ipv6_prefix=129)
    with pytest.raises(ValueError, match="max_keys"):
        FailureLimiter(max_keys=0)
