"""Large snapshots on etcd: chunked under etcd's default request limit, swapped in
atomically, old generations cleaned up, lost chunks reported as data errors."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator

import pytest

from tests.support.etcd import EtcdCluster, etcd_cluster
from ucloud.eventstore.errors import DataError
from ucloud.eventstore.etcd import EtcdEventStore
from ucloud.eventstore.records import Snapshot

pytestmark = [pytest.mark.etcd]

DEFAULT_REQUEST_LIMIT = 1_572_864  # etcd's own default --max-request-bytes


@pytest.fixture(scope="module")
def stock_etcd() -> Iterator[EtcdCluster]:
    """An etcd with the default request size limit, as a fresh production install has."""
    with etcd_cluster(1, extra_args=["--max-request-bytes", str(DEFAULT_REQUEST_LIMIT)]) as cluster:
        yield cluster


def store_on(cluster: EtcdCluster) -> EtcdEventStore:
    return EtcdEventStore(cluster.endpoints, prefix=f"/test-{uuid.uuid4().hex[:12]}/v1")


async def chunk_generations(store: EtcdEventStore, stream: str) -> set[str]:
    base = store.prefix + b"/snapshot-chunks/" + stream.encode() + b"/"
    listed = await store.client.range(base, base[:-1] + b"0", keys_only=True)
    return {kv.key[len(base):].split(b"/")[0].decode() for kv in listed.kvs}


async def test_a_40_mib_snapshot_is_stored_in_values_under_the_default_request_limit(
        stock_etcd: EtcdCluster) -> None:
    async with store_on(stock_etcd) as store:
        state = random.Random(1).randbytes(40 * 1024 * 1024)
        await store.save_snapshot(Snapshot(stream="projection-x", version=5, type="t", state=state))
        loaded = await store.load_snapshot("projection-x")
        assert loaded is not None and loaded.state == state
        everything = await store.client.range(store.prefix, store.prefix + b"0")
        assert everything.kvs and max(len(kv.value) for kv in everything.kvs) <= 512 * 1024
        assert len(await chunk_generations(store, "projection-x")) == 1


async def test_a_newer_snapshot_replaces_the_older_generation_and_its_chunks_go(stock_etcd: EtcdCluster) -> None:
    async with store_on(stock_etcd) as store:
        rng = random.Random(2)
        await store.save_snapshot(Snapshot(stream="projection-y", version=5, type="t", state=rng.randbytes(2_000_000)))
        (first,) = await chunk_generations(store, "projection-y")
        newer = rng.randbytes(3_000_000)
        await store.save_snapshot(Snapshot(stream="projection-y", version=8, type="t", state=newer))
        (second,) = await chunk_generations(store, "projection-y")
        assert second != first
        # An older save arriving late changes nothing and leaves no chunks behind.
        await store.save_snapshot(Snapshot(stream="projection-y", version=6, type="t", state=rng.randbytes(900_000)))
        assert await chunk_generations(store, "projection-y") == {second}
        loaded = await store.load_snapshot("projection-y")
        assert loaded is not None and (loaded.version, loaded.state) == (8, newer)


async def test_clean_up_spares_a_newer_save_in_progress_and_removes_a_dead_older_one(
        stock_etcd: EtcdCluster) -> None:
    async with store_on(stock_etcd) as store:
        base = store.prefix + b"/snapshot-chunks/projection-z/"
        in_progress = f"{20:020d}-{uuid.uuid4().hex}"
        died = f"{3:020d}-{uuid.uuid4().hex}"
        await store.client.put(base + in_progress.encode() + b"/00000000", b"a newer save is writing")
        await store.client.put(base + died.encode() + b"/00000000", b"a save that died before its swap")
        await store.save_snapshot(Snapshot(stream="projection-z", version=10, type="t",
                                           state=random.Random(3).randbytes(1_000_000)))
        generations = await chunk_generations(store, "projection-z")
        assert in_progress in generations and died not in generations and len(generations) == 2


async def test_lost_chunks_are_a_data_error_not_a_silent_partial_state(stock_etcd: EtcdCluster) -> None:
    async with store_on(stock_etcd) as store:
        await store.save_snapshot(Snapshot(stream="projection-w", version=2, type="t",
                                           state=random.Random(4).randbytes(2_000_000)))
        (generation,) = await chunk_generations(store, "projection-w")
        await store.client.delete(store.prefix + b"/snapshot-chunks/projection-w/" + generation.encode()
                                  + b"/00000001")
        with pytest.raises(DataError, match="missing chunks"):
            await store.load_snapshot("projection-w")


async def test_a_corrupted_chunk_fails_its_digest(stock_etcd: EtcdCluster) -> None:
    async with store_on(stock_etcd) as store:
        await store.save_snapshot(Snapshot(stream="projection-v", version=2, type="t",
                                           state=random.Random(5).randbytes(2_000_000)))
        (generation,) = await chunk_generations(store, "projection-v")
        await store.client.put(store.prefix + b"/snapshot-chunks/projection-v/" + generation.encode()
                               + b"/00000000", b"garbage")
        with pytest.raises(DataError, match="digest"):
            await store.load_snapshot("projection-v")
