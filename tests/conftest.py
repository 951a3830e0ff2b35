"""Shared fixtures: real backends, started by the tests themselves."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.support.etcd import EtcdCluster, etcd_cluster
from ucloud.eventstore.etcd import EtcdEventStore
from ucloud.eventstore.interface import EventStore
from ucloud.eventstore.memory import MemoryEventStore
from ucloud.eventstore.sqlite import SqliteEventStore

BACKENDS = ["memory", "sqlite", "etcd"]


@pytest.fixture(scope="session")
def etcd() -> Iterator[EtcdCluster]:
    """One real etcd member for the whole session; tests isolate by key prefix."""
    with etcd_cluster(1) as cluster:
        yield cluster


def unique_prefix() -> str:
    return f"/test-{uuid.uuid4().hex[:12]}/v1"


async def open_store(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> EventStore:
    if kind == "memory":
        return MemoryEventStore()
    if kind == "sqlite":
        return SqliteEventStore(tmp_path / "log.sqlite")
    if kind == "etcd":
        cluster: EtcdCluster = request.getfixturevalue("etcd")
        return EtcdEventStore(cluster.endpoints, prefix=unique_prefix(), max_txn_ops=1024)
    raise ValueError(kind)


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[EventStore]:
    if request.param == "etcd":
        request.applymarker(pytest.mark.etcd)
    backend = await open_store(request.param, tmp_path, request)
    try:
        yield backend
    finally:
        await backend.close()
