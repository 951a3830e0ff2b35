"""The contract every lease adapter honours: memory, SQLite and real etcd leases alike.

Expiry is shown by waiting past a short TTL, never by asserting how fast it happened."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import BACKENDS, open_store
from ucloud.eventstore.interface import EventStore
from ucloud.eventstore.leases import Leases, acquire_when_free, hold, leases_for


@pytest.fixture(params=BACKENDS)
async def pair(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[EventStore, Leases]]:
    if request.param == "etcd":
        request.applymarker(pytest.mark.etcd)
    store = await open_store(request.param, tmp_path, request)
    leases = leases_for(store)
    try:
        yield store, leases
    finally:
        await leases.close()
        await store.close()


async def wait_gone(leases: Leases, name: str, limit: float = 15.0) -> None:
    deadline = time.monotonic() + limit
    while name in await leases.holders():
        assert time.monotonic() < deadline, f"{name} never expired"
        await asyncio.sleep(0.1)


async def test_one_holder_at_a_time(pair: tuple[EventStore, Leases]) -> None:
    _, leases = pair
    first = await leases.acquire("pm-scheduler", "a", 5)
    assert first is not None and first.holder == "a"
    assert await leases.acquire("pm-scheduler", "b", 5) is None
    assert await leases.holders("pm-") == {"pm-scheduler": "a"}
    other = await leases.acquire("pm-detector", "b", 5)
    assert other is not None
    assert await leases.holders("pm-") == {"pm-scheduler": "a", "pm-detector": "b"}
    assert await leases.holders("host-") == {}


async def test_release_frees_the_name_at_once(pair: tuple[EventStore, Leases]) -> None:
    _, leases = pair
    grant = await leases.acquire("pm-x", "a", 30)
    assert grant is not None
    await leases.release(grant)
    assert await leases.holders() == {}
    again = await leases.acquire("pm-x", "b", 30)
    assert again is not None and again.token != grant.token
    assert not await leases.renew(grant), "a released grant must not come back to life"
    assert await leases.renew(again)


async def test_an_unrenewed_lease_expires_and_can_be_taken(pair: tuple[EventStore, Leases]) -> None:
    _, leases = pair
    grant = await leases.acquire("host-a", "agent-a", 1)
    assert grant is not None
    await wait_gone(leases, "host-a")
    assert not await leases.renew(grant)
    taken = await leases.acquire("host-a", "agent-b", 1)
    assert taken is not None and taken.holder == "agent-b"


async def test_renewing_keeps_a_lease_past_its_ttl(pair: tuple[EventStore, Leases]) -> None:
    _, leases = pair
    grant = await leases.acquire("host-b", "agent", 2)
    assert grant is not None
    async with hold(leases, grant) as held:
        await asyncio.sleep(4.5)  # more than twice the TTL
        assert held.valid and held.renewals >= 2
        assert await leases.holders("host-") == {"host-b": "agent"}
    assert await leases.holders("host-") == {}, "leaving hold() releases the lease"


async def test_a_standby_takes_over_when_the_holder_stops(pair: tuple[EventStore, Leases]) -> None:
    _, leases = pair
    grant = await leases.acquire("pm-lead", "first", 1)
    assert grant is not None
    standby = asyncio.create_task(acquire_when_free(leases, "pm-lead", "second", 1, poll=0.1))
    await asyncio.sleep(0.3)
    assert not standby.done()
    # "first" stops renewing (a crash): the standby gets it once the lease expired.
    taken = await asyncio.wait_for(standby, 15)
    assert taken.holder == "second"
    assert await leases.holders() == {"pm-lead": "second"}


async def test_hold_reports_a_lease_taken_away(pair: tuple[EventStore, Leases]) -> None:
    _, leases = pair
    grant = await leases.acquire("pm-y", "a", 2)
    assert grant is not None
    async with hold(leases, grant) as held:
        await leases.release(grant)  # as if the store had expired it
        await asyncio.wait_for(held.lost.wait(), 10)
        assert not held.valid


async def test_bad_names_and_ttls_are_refused(pair: tuple[EventStore, Leases]) -> None:
    _, leases = pair
    with pytest.raises(ValueError, match="lease name"):
        await leases.acquire("a/b", "x", 5)
    with pytest.raises(ValueError, match="TTL"):
        await leases.acquire("ok", "x", 0)


async def test_held_is_true_only_for_the_live_grant_of_that_name(pair: tuple[EventStore, Leases]) -> None:
    _, leases = pair
    first = await leases.acquire("host-h", "agent", 1.0)
    assert first is not None
    assert await leases.held("host-h", first.token)
    assert not await leases.held("host-h", first.token + 1)
    assert not await leases.held("host-other", first.token)
    await wait_gone(leases, "host-h")
    assert not await leases.held("host-h", first.token), "an expired lease is held by nobody"
    second = await leases.acquire("host-h", "agent", 5.0)
    assert second is not None and await leases.held("host-h", second.token)
    assert not await leases.held("host-h", first.token)
    await leases.release(second)
    assert not await leases.held("host-h", second.token)
