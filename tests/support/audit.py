"""Helpers for the ucloud-audit tests: a small known log, written through the EventStore API."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from ucloud.eventstore.records import EventRecord, NewEvent, StreamAppend
from ucloud.eventstore.url import open_store

CAUSE = uuid.UUID("11111111-2222-4333-8444-555555555555")
CORRELATION = uuid.UUID("66666666-7777-4888-9999-000000000000")


def event(type_: str, actor: str, **data: Any) -> NewEvent:
    return NewEvent(type=type_, data=json.dumps(data).encode(), actor=actor)


async def _append_known_log(url: str) -> list[EventRecord]:
    """Five events, each in its own commit a few milliseconds apart (distinct times):

        1 vm-a  v1 vm.requested     alice
        2 vm-a  v2 vm.placed        scheduler     (schema 2, causation and correlation ids)
        3 vm-b  v1 vm.requested     bob
        4 net-1 v1 network.created  alice
        5 vm-a  v3 vm.started       hostagent/h1
    """
    placed = NewEvent(type="vm.placed", data=b'{"host":"h1"}', actor="scheduler", schema=2,
                      causation_id=CAUSE, correlation_id=CORRELATION)
    appends = [
        StreamAppend("vm-a", 0, [event("vm.requested", "alice", owner="alice", cores=2)]),
        StreamAppend("vm-a", 1, [placed]),
        StreamAppend("vm-b", 0, [event("vm.requested", "bob", owner="bob", cores=1)]),
        StreamAppend("net-1", 0, [event("network.created", "alice", prefix="2001:db8::/64")]),
        StreamAppend("vm-a", 2, [event("vm.started", "hostagent/h1", pid=4242)]),
    ]
    async with open_store(url) as store:
        for append in appends:
            await store.append(append)
            await asyncio.sleep(0.005)
        return await store.read_all()


def write_known_log(url: str) -> list[EventRecord]:
    return asyncio.run(_append_known_log(url))


async def _append(url: str, *appends: StreamAppend) -> list[int]:
    async with open_store(url) as store:
        return await store.append(*appends)


def append(url: str, *appends: StreamAppend) -> list[int]:
    return asyncio.run(_append(url, *appends))
