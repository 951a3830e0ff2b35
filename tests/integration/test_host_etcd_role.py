"""A host agent's etcd role, set up with exactly the etcdctl commands docs/operations.md
gives (hostagent/etcdrole.py makes them), on a real etcd with TLS, client certificates and
authentication: with it a host follows the log and its slice, holds its own heartbeat
lease and saves its own snapshots, and nothing more. It cannot append an event, write any
key of the log, take another host's lease, write another's snapshot or read the secret
prefix."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest

from tests.support.etcd_secure import SECRET_PREFIX, SecureEtcd, secure_etcd
from ucloud.commands.service import CommandService
from ucloud.commands.unit_of_work import SYSTEM
from ucloud.domain import host as host_domain
from ucloud.domain.catalogue import build_codec
from ucloud.eventstore.errors import AccessDenied
from ucloud.eventstore.etcd import EtcdEventStore
from ucloud.eventstore.etcd_client import EtcdSecurity
from ucloud.eventstore.leases import EtcdLeases
from ucloud.eventstore.records import NewEvent, Snapshot, StreamAppend
from ucloud.hostagent.agent import SliceVms
from ucloud.hostagent.etcdrole import host_role_grants
from ucloud.projections.runner import ProjectionRunner

pytestmark = [pytest.mark.etcd, pytest.mark.slow]

PREFIX = "/v1"


@pytest.fixture(scope="module")
def etcd() -> Iterator[SecureEtcd]:
    with secure_etcd() as server:
        for hostname in ("node1", "node2"):
            for command in host_role_grants(f"ucloud-host-{hostname}", hostname, PREFIX):
                server.etcdctl(*command)
            server.etcdctl("user", "add", f"host-{hostname}", "--new-user-password", f"{hostname}-password")
            server.etcdctl("user", "grant-role", f"host-{hostname}", f"ucloud-host-{hostname}")
        yield server


def security(etcd: SecureEtcd, user: str, password: str) -> EtcdSecurity:
    return EtcdSecurity(ca_file=str(etcd.ca), cert_file=str(etcd.directory / "client.pem"),
                        key_file=str(etcd.directory / "client-key.pem"), user=user,
                        password_file=str(etcd.password_file(user, password)))


def control(etcd: SecureEtcd) -> EtcdEventStore:
    return EtcdEventStore([etcd.endpoint], prefix=PREFIX, security=security(etcd, "control", "control-password"),
                          timeout=3)


def host_store(etcd: SecureEtcd, hostname: str = "node1") -> EtcdEventStore:
    return EtcdEventStore([etcd.endpoint], prefix=PREFIX,
                          security=security(etcd, f"host-{hostname}", f"{hostname}-password"),
                          timeout=3, append_timeout=3)


async def test_a_host_role_reads_its_slice_holds_its_lease_and_saves_its_snapshots(etcd: SecureEtcd) -> None:
    node1 = host_domain.host_id_for("node1")
    async with control(etcd) as store:
        commands = CommandService(store)
        await commands.register_host(SYSTEM, "node1", 4, "8GiB", "100GiB")
        await commands.mark_host_up(SYSTEM, node1, 1, 3.0)
        head = await store.head()
    async with host_store(etcd) as store:
        assert await store.head() == head
        assert [r.type for r in await store.read_slice(host_domain.slice_name(node1))][:2] == [
            "host.registered", "host.up"]
        seen: list[int] = []

        async def follow() -> None:
            async for record in store.subscribe(0, slice=host_domain.slice_name(node1)):
                seen.append(record.position)
                return

        async with asyncio.timeout(10):
            await follow()
        assert seen
        # Its heartbeat: acquire, renew, list, release.
        leases = EtcdLeases(store.client, store.prefix)
        grant = await leases.acquire(host_domain.slice_name(node1), "node1", 3)
        assert grant is not None and await leases.renew(grant)
        assert (await leases.holders("host-"))[host_domain.slice_name(node1)] == "node1"
        await leases.release(grant)
        # Its own snapshots, as its agent's runner saves them (chunked when large, too).
        view = SliceVms()
        runner = ProjectionRunner(store, build_codec(), [view], name=f"hostagent-{node1}")
        await runner.catch_up()
        await runner.save_snapshot()
        assert (await store.load_snapshot(f"projection-hostagent-{node1}")) is not None
        big = Snapshot(stream=f"projection-hostagent-{node1}-networks", version=head, type="t/1",
                       state=b"x" * (3 * 1024 * 1024))
        await store.save_snapshot(big)
        loaded = await store.load_snapshot(big.stream)
        assert loaded is not None and loaded.state == big.state


async def test_a_host_role_cannot_append_write_the_log_take_anothers_lease_or_read_secrets(
        etcd: SecureEtcd) -> None:
    node2 = host_domain.host_id_for("node2")
    async with control(etcd) as store:
        await store.client.put(SECRET_PREFIX.encode() + b"alice", b"seed")
        await store.append(StreamAppend(f"thing-{uuid.uuid4()}", 0, [NewEvent(type="thing.happened", data=b"{}")]))
        head = await store.head()
    async with host_store(etcd) as store:
        with pytest.raises(AccessDenied):
            await store.append(StreamAppend(f"vm-{uuid.uuid4()}", 0, [NewEvent(type="vm.started", data=b"{}")]))
        for key in (b"/head", b"/events/%020d" % (head + 1), b"/streams/x/0000000001", b"/tracking/scheduler",
                    b"/slices-from", b"/slices/host-x/00000000000000000001", b"/snapshots/host-x",
                    b"/snapshot-chunks/host-x/g/00000000", b"/leases/pm-scheduler"):
            with pytest.raises(AccessDenied):
                await store.client.put(store.prefix + key, b"forged")
        with pytest.raises(AccessDenied):
            await store.client.get(SECRET_PREFIX.encode() + b"alice")
        with pytest.raises(AccessDenied):
            await EtcdLeases(store.client, store.prefix).acquire(host_domain.slice_name(node2), "node1", 3)
        with pytest.raises(AccessDenied):
            await store.save_snapshot(Snapshot(stream=f"projection-hostagent-{node2}", version=1, type="t/1",
                                               state=b"forged"))
        assert await store.head() == head  # nothing was written
    async with control(etcd) as store:
        assert await store.head() == head
        assert await store.load_snapshot(f"projection-hostagent-{node2}") is None
