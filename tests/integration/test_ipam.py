"""The IPAM allocator against real stores: VNIs, /64s and MACs are unique under
concurrency (two allocators at once), freed on delete, and an exhausted pool is a clear
error on the network."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from tests.conftest import open_store
from ucloud.commands.aggregates import CLAIM, NETWORK, VM
from ucloud.commands.networks import NetworkCommands
from ucloud.commands.service import CommandService
from ucloud.commands.unit_of_work import Actor
from ucloud.domain import network as net
from ucloud.domain import vm as vm_domain
from ucloud.domain.errors import Rejected
from ucloud.eventstore.interface import EventStore
from ucloud.processes.ipam import IpamAllocator

ALICE = Actor("alice")
T = TypeVar("T")


@contextlib.asynccontextmanager
async def running(*allocators: IpamAllocator) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(a.run()) for a in allocators]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def until(probe: Callable[[], Awaitable[T | None]], timeout: float = 60) -> T:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.05)


async def settled_network(commands: CommandService, network_id: object) -> net.Network:
    async def probe() -> net.Network | None:
        state = (await commands.repository.load(NETWORK, net.stream_name(network_id))).state  # type: ignore[arg-type]
        return state if state is not None and state.status is not net.NetworkStatus.REQUESTED else None
    return await until(probe)


async def allocated_vm(commands: CommandService, vm_id: object) -> vm_domain.Vm:
    async def probe() -> vm_domain.Vm | None:
        state = (await commands.repository.load(VM, vm_domain.stream_name(vm_id))).state  # type: ignore[arg-type]
        return state if state is not None and all(n.mac for n in state.nics) else None
    return await until(probe)


async def _stack(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> tuple[EventStore, CommandService,
                                                                                           NetworkCommands]:
    store = await open_store(backend, tmp_path, request)
    commands = CommandService(store)
    return store, commands, NetworkCommands(commands.repository)


@pytest.mark.parametrize("backend", ["sqlite", "etcd"])
async def test_networks_get_a_vni_and_a_64_which_delete_frees(backend: str, tmp_path: Path,
                                                              request: pytest.FixtureRequest) -> None:
    store, commands, networks = await _stack(backend, tmp_path, request)
    allocator = IpamAllocator(store, commands.codec)
    try:
        async with running(allocator):
            auto = await settled_network(commands, (await networks.create_network(ALICE, "lan", "auto")).result)
            l2 = await settled_network(commands, (await networks.create_network(ALICE, "l2", "none")).result)
            pool = ipaddress.IPv6Network(allocator.view.pool or "")
            assert pool.prefixlen == 48 and pool.subnet_of(ipaddress.IPv6Network("fd00::/8"))
            assert auto.status is net.NetworkStatus.READY and auto.vni != l2.vni
            assert auto.group == net.multicast_group(auto.vni)
            assert ipaddress.IPv6Network(auto.prefix).subnet_of(pool) and auto.prefix.endswith("/64")
            assert l2.prefix == ""
            with pytest.raises(Rejected, match="already exists"):
                await networks.create_network(ALICE, "lan", "manual")
            await networks.delete_network(ALICE, "lan")

            async def freed() -> bool:
                claim = (await commands.repository.load(CLAIM, net.claim_stream(net.vni_resource(auto.vni)))).state
                prefix = (await commands.repository.load(
                    CLAIM, net.claim_stream(net.prefix_resource(auto.prefix)))).state
                return bool(claim and claim.holder is None and prefix and prefix.holder is None)
            await until(freed)
            # The name is free again; the new network gets values of its own.
            again = await settled_network(commands, (await networks.create_network(ALICE, "lan", "manual")).result)
            assert again.status is net.NetworkStatus.READY and again.prefix
    finally:
        await store.close()


@pytest.mark.parametrize("backend", ["sqlite", "etcd"])
async def test_two_allocators_never_hand_out_a_value_twice(backend: str, tmp_path: Path,
                                                           request: pytest.FixtureRequest) -> None:
    """200 NICs on 4 VMs... on 20 networks, created concurrently while two allocators with
    their own tracking act on every event: no MAC, VNI or /64 twice."""
    store, commands, networks = await _stack(backend, tmp_path, request)
    first = IpamAllocator(store, commands.codec, consumer="ipam-a")
    second = IpamAllocator(store, commands.codec, consumer="ipam-b")
    try:
        async with running(first, second):
            names = [f"n{i}" for i in range(20)]
            ids = await asyncio.gather(*(networks.create_network(ALICE, n, "auto") for n in names))
            settled = [await settled_network(commands, o.result) for o in ids]
            assert all(n.status is net.NetworkStatus.READY for n in settled)
            assert len({n.vni for n in settled}) == 20 and len({n.prefix for n in settled}) == 20
            # 200 NICs: 20 VMs with a NIC on each of 10 networks, created at once.
            vms = await asyncio.gather(*(
                commands.create_vm(ALICE, name=f"v{i}", cores=1, ram="64MB", disk="1GB", image="tiny",
                                   networks=names[i % 2::2]) for i in range(20)))
            states = [await allocated_vm(commands, o.result) for o in vms]
            macs = [nic.mac for vm in states for nic in vm.nics]
            assert len(macs) == 200 and len(set(macs)) == 200
            assert all(net.is_local_unicast(m) for m in macs)
            # Every value's claim stream names exactly one holder.
            for vm in states:
                for nic in vm.nics:
                    claim = (await commands.repository.load(CLAIM, net.claim_stream(net.mac_resource(nic.mac)))).state
                    assert claim is not None and claim.holder == nic.id
    finally:
        await store.close()


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_an_exhausted_pool_fails_the_network_naming_the_pool(backend: str, tmp_path: Path,
                                                                   request: pytest.FixtureRequest) -> None:
    store, commands, networks = await _stack(backend, tmp_path, request)
    allocator = IpamAllocator(store, commands.codec, pool="fd00:1:2::/63")
    try:
        async with running(allocator):
            a = await settled_network(commands, (await networks.create_network(ALICE, "a", "auto")).result)
            b = await settled_network(commands, (await networks.create_network(ALICE, "b", "manual")).result)
            c = await settled_network(commands, (await networks.create_network(ALICE, "c", "auto")).result)
            l2 = await settled_network(commands, (await networks.create_network(ALICE, "d", "none")).result)
            assert {a.prefix, b.prefix} == {"fd00:1:2::/64", "fd00:1:2:1::/64"}
            assert c.status is net.NetworkStatus.FAILED
            assert "fd00:1:2::/63 has no free /64" in c.reason
            assert l2.status is net.NetworkStatus.READY  # a layer-2 network needs no /64
            with pytest.raises(Rejected, match="failed"):
                vm = await commands.create_vm(ALICE, name="v", cores=1, ram="64MB", disk="1GB", image="tiny",
                                              networks=["c"])
            vm = await commands.create_vm(ALICE, name="v", cores=1, ram="64MB", disk="1GB", image="tiny",
                                          networks=["a"])
            with pytest.raises(Rejected, match="has VMs attached: " + str(vm.result)):
                await networks.delete_network(ALICE, "a")
            # Deleting the VM takes its NIC off the network and frees its MAC.
            state = await allocated_vm(commands, vm.result)
            await commands.vm_command(ALICE, vm_domain.DeleteVm(vm_id=vm.result))

            async def deletable() -> bool:
                try:
                    await networks.delete_network(ALICE, "a")
                except Rejected:
                    return False
                return True
            await until(deletable)
            claim = (await commands.repository.load(CLAIM, net.claim_stream(net.mac_resource(state.nics[0].mac)))).state
            assert claim is not None and claim.holder is None
    finally:
        await store.close()


async def test_the_generated_pool_is_generated_once(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    store, commands, _ = await _stack("sqlite", tmp_path, request)
    try:
        pools = {await IpamAllocator(store, commands.codec).setup() for _ in range(3)}
        assert len(pools) == 1
        assert await IpamAllocator(store, commands.codec, pool="2001:db8::/40").setup() == "2001:db8::/40"
    finally:
        await store.close()


async def test_the_allocators_view_survives_a_snapshot_round_trip(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    store, commands, networks = await _stack("sqlite", tmp_path, request)
    allocator = IpamAllocator(store, commands.codec, pool="fd00:9::/56")
    try:
        async with running(allocator):
            await settled_network(commands, (await networks.create_network(ALICE, "lan", "auto")).result)
            vm = await commands.create_vm(ALICE, name="v", cores=1, ram="64MB", disk="1GB", image="tiny",
                                          networks=["lan"])
            await allocated_vm(commands, vm.result)
        import msgspec

        restored = IpamAllocator(store, commands.codec)
        restored.load(msgspec.msgpack.decode(msgspec.msgpack.encode(allocator.dump())))
        view, copy = allocator.view, restored.view
        assert (copy.pool, copy.held, copy.vnis, copy.prefixes, copy.macs, copy.networks.keys(), copy.nics.keys()) == (
            view.pool, view.held, view.vnis, view.prefixes, view.macs, view.networks.keys(), view.nics.keys())
        assert copy.macs and copy.vnis and copy.prefixes
    finally:
        await store.close()
