"""A host's slice of the log: the command side indexes every event a host agent needs
under ``host-<id>`` in the same append, so an agent can read its own events and no
others, in log order, on every backend."""

from __future__ import annotations

from uuid import UUID

from tests.support.hosts import up_host
from ucloud.commands.service import CommandService
from ucloud.commands.unit_of_work import SYSTEM, Actor
from ucloud.domain import host as host_domain
from ucloud.domain import vm as vm_domain
from ucloud.eventstore.interface import EventStore

ADMIN = Actor("root", "ucloud-admin", is_admin=True)
ALICE = Actor("alice")


async def slice_of(store: EventStore, host_id: UUID) -> list[tuple[str, str]]:
    return [(r.stream, r.type) for r in await store.read_slice(host_domain.slice_name(host_id))]


async def test_a_host_slice_holds_its_registration_and_the_life_of_the_vms_placed_on_it(store: EventStore) -> None:
    commands = CommandService(store)
    one = (await up_host(commands, "one", 8, "16GB", "100GB")).result
    two = (await up_host(commands, "two", 8, "16GB", "100GB")).result
    vm = (await commands.create_vm(ALICE, name="web", cores=1, ram="256MB", disk="1GB", image="tiny")).result
    other = (await commands.create_vm(ALICE, name="db", cores=1, ram="256MB", disk="1GB", image="tiny")).result
    await commands.place_vm(SYSTEM, vm, one)
    await commands.place_vm(SYSTEM, other, two)
    await commands.report(SYSTEM, vm_domain.ReportStarted(vm_id=vm, host_id=one))
    await commands.vm_command(ALICE, vm_domain.StopVm(vm_id=vm))

    vm_stream, one_stream = vm_domain.stream_name(vm), host_domain.stream_name(one)
    assert await slice_of(store, one) == [
        (one_stream, "host.registered"),
        (one_stream, "host.up"),                # its agent's heartbeat session
        (one_stream, "host.capacity_claimed"),  # in one append with the placement
        (vm_stream, "vm.scheduled"),            # the VM arrives: vm.requested came before, sliceless
        (vm_stream, "vm.started"),
        (vm_stream, "vm.stop_requested"),
    ]
    two_slice = await slice_of(store, two)
    assert (vm_stream, "vm.scheduled") not in two_slice
    assert (vm_domain.stream_name(other), "vm.scheduled") in two_slice
    assert await store.slices_from() == 0

    # A VM taken off a lost host leaves its slice with the event that moves it away.
    await commands.declare_host_dead(SYSTEM, two, 1, "lease gone")
    await commands.evict(SYSTEM, two, [other], "its host was declared dead")
    assert (await slice_of(store, two))[-3:] == [
        (host_domain.stream_name(two), "host.declared_dead"),
        (vm_domain.stream_name(other), "vm.host_lost"),
        (host_domain.stream_name(two), "host.capacity_released"),
    ]


async def test_slice_reads_equal_the_full_log_filtered_by_host(store: EventStore) -> None:
    """The slice is exactly what a reader filtering the whole log by host would keep."""
    commands = CommandService(store)
    hosts = [(await up_host(commands, f"h{i}", 8, "16GB", "100GB")).result for i in range(3)]
    placed: dict[UUID, UUID] = {}
    for i in range(12):
        vm = (await commands.create_vm(ALICE, name=f"v{i}", cores=1, ram="256MB", disk="1GB", image="tiny")).result
        placed[vm] = hosts[i % 3]
        await commands.place_vm(SYSTEM, vm, placed[vm])
        if i % 2:
            await commands.report(SYSTEM, vm_domain.ReportStarted(vm_id=vm, host_id=placed[vm]))
    everything = await store.read_all()
    for host in hosts:
        expected = [r.position for r in everything
                    if r.stream == host_domain.stream_name(host)
                    or (r.stream.startswith("vm-") and placed.get(UUID(r.stream[3:])) == host
                        and r.type != "vm.requested")]
        assert [r.position for r in await store.read_slice(host_domain.slice_name(host))] == expected
