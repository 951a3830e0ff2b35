"""Read-model snapshots at 100,000 VMs on 1,000 hosts save and restore on etcd and
SQLite; a snapshot that cannot be saved is an error in the metrics and the log, and the
read models keep following the log."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest

from tests.conftest import forget, open_store
from tests.support.etcd import EtcdCluster, etcd_cluster
from ucloud.domain import host as host_domain
from ucloud.domain import vm as vm_domain
from ucloud.domain.catalogue import build_codec
from ucloud.domain.events import Event
from ucloud.eventstore.etcd import EtcdEventStore
from ucloud.eventstore.records import EventRecord, NewEvent, StreamAppend
from ucloud.projections.runner import ProjectionRunner
from ucloud.projections.views import ReadModels

VMS, HOSTS = 100_000, 1_000
GIB = 1024**3


def cluster_of_events() -> Iterator[tuple[str, Event]]:
    hosts = [uuid.UUID(int=i + 1) for i in range(HOSTS)]
    for index, host_id in enumerate(hosts):
        yield host_domain.stream_name(host_id), host_domain.HostRegistered(
            host_id=host_id, hostname=f"host{index}", cores=256, ram=2048 * GIB, disk=100_000 * GIB)
    for index in range(VMS):
        vm_id = uuid.UUID(int=10**9 + index)
        host_id = hosts[index % HOSTS]
        yield vm_domain.stream_name(vm_id), vm_domain.VmRequested(
            vm_id=vm_id, owner=f"user{index % 500}", name=f"vm{index}", cores=1, ram=GIB, disk=10 * GIB,
            image="tiny")
        yield vm_domain.stream_name(vm_id), vm_domain.VmScheduled(vm_id=vm_id, host_id=host_id)
        yield host_domain.stream_name(host_id), host_domain.CapacityClaimed(
            host_id=host_id, vm_id=vm_id, cores=1, ram=GIB, disk=10 * GIB)


def fold_cluster(runner: ProjectionRunner) -> None:
    """Feed the runner 301,000 records directly: the snapshot, not the log, is under test."""
    codec = build_codec()
    versions: dict[str, int] = {}
    now = datetime.now(UTC)
    for position, (stream, event) in enumerate(cluster_of_events(), start=1):
        tag, schema, data = codec.encode(event)
        versions[stream] = versions.get(stream, 0) + 1
        runner.apply(EventRecord(id=uuid.uuid4(), type=tag, stream=stream, version=versions[stream],
                                 position=position, time=now, data=data, schema=schema))


def picture(models: ReadModels) -> bytes:
    return msgspec.msgpack.encode([view.dump() for view in models.all()])


@pytest.fixture(scope="module")
def folded() -> tuple[ReadModels, int]:
    models = ReadModels()
    runner = ProjectionRunner(_NoStore(), build_codec(), models.all())  # type: ignore[arg-type]
    fold_cluster(runner)
    return models, runner.position


class _NoStore:
    """The fold needs no store; saving happens on a runner over a real one below."""


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "etcd"])
async def test_read_models_of_100k_vms_on_1k_hosts_save_and_restore(
        backend: str, folded: tuple[ReadModels, int], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if backend == "etcd":
        request.applymarker(pytest.mark.etcd)
    models, position = folded
    assert len(models.vms.by_id) == VMS and len(models.hosts.by_id) == HOSTS
    store = await open_store(backend, tmp_path, request)
    try:
        writer = ProjectionRunner(store, build_codec(), models.all(), name="scale")
        writer.position = position
        await writer.save_snapshot()
        saved = await store.load_snapshot("projection-scale")
        assert saved is not None and saved.version == position
        assert len(saved.state) > 1_572_864, "the snapshot should exceed etcd's default request limit"

        restored = ReadModels()
        reader = ProjectionRunner(store, build_codec(), restored.all(), name="scale")
        await reader.restore()
        assert reader.position == position
        assert picture(restored) == picture(models)
        assert restored.hosts.by_id[uuid.UUID(int=1)].used_cores == VMS // HOSTS
    finally:
        await forget(store)
        await store.close()


@pytest.fixture
def tiny_quota_etcd() -> Iterator[EtcdCluster]:
    """An etcd whose backend quota is far below one large snapshot: saving it fails for real."""
    with etcd_cluster(1, extra_args=["--quota-backend-bytes", str(8 * 1024 * 1024)]) as cluster:
        yield cluster


@pytest.mark.etcd
@pytest.mark.slow
async def test_a_snapshot_that_cannot_be_saved_is_counted_and_logged_and_following_goes_on(
        tiny_quota_etcd: EtcdCluster, folded: tuple[ReadModels, int], caplog: pytest.LogCaptureFixture) -> None:
    store = EtcdEventStore(tiny_quota_etcd.endpoints, prefix="/quota/v1", append_timeout=5)
    try:
        await store.append(*(StreamAppend(f"thing-{i}", 0, [NewEvent(type="thing.happened", data=b"{}")])
                             for i in range(5)))
        models, _ = folded
        runner = ProjectionRunner(store, build_codec(), models.all(), name="quota", snapshot_interval=0)
        caplog.set_level(logging.ERROR, logger="ucloud.projections.runner")
        follower = asyncio.create_task(runner.run())
        try:
            assert await runner.wait_for(5, timeout=60)
            for _ in range(600):
                if runner.snapshot_failures:
                    break
                await asyncio.sleep(0.1)
            assert runner.snapshot_failures >= 1
            assert "save" in runner.last_snapshot_error
            assert any("snapshot save failed" in r.getMessage() for r in caplog.records)
            assert not follower.done(), "a failed snapshot must not stop the read models"
            # Nothing half-written counts as a snapshot.
            assert await asyncio.wait_for(store.load_snapshot("projection-quota"), 60) is None
        finally:
            follower.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(follower, 120)  # its last save (which fails too) runs first
    finally:
        await store.close()
