"""Invariants of the VM aggregate, checked over random command sequences (no I/O)."""

from __future__ import annotations

import uuid

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ucloud.domain import vm
from ucloud.domain.catalogue import build_codec
from ucloud.domain.errors import DomainError, NotFound, Rejected
from ucloud.domain.events import Event

VM_ID = uuid.UUID(int=1)
HOSTS = [uuid.UUID(int=100 + i) for i in range(3)]
CODEC = build_codec()

create = vm.CreateVm(vm_id=VM_ID, owner="alice", name="a", cores=1, ram=2**28, disk=2**30, image="tiny")
host_ids = st.sampled_from(HOSTS)
commands = st.one_of(
    st.just(create),
    st.builds(vm.StartVm, vm_id=st.just(VM_ID)),
    st.builds(vm.StopVm, vm_id=st.just(VM_ID)),
    st.builds(vm.RebootVm, vm_id=st.just(VM_ID)),
    st.builds(vm.DeleteVm, vm_id=st.just(VM_ID)),
    st.builds(vm.PlaceVm, vm_id=st.just(VM_ID), host_id=host_ids),
    st.builds(vm.MarkUnschedulable, vm_id=st.just(VM_ID), reason=st.just("full")),
    st.builds(vm.ReportStarted, vm_id=st.just(VM_ID), host_id=host_ids),
    st.builds(vm.ReportStopped, vm_id=st.just(VM_ID), host_id=host_ids),
    st.builds(vm.ReportRebooted, vm_id=st.just(VM_ID), host_id=host_ids),
    st.builds(vm.ReportCrashed, vm_id=st.just(VM_ID), host_id=host_ids, reason=st.just("segv")),
    st.builds(vm.ReportFailed, vm_id=st.just(VM_ID), host_id=host_ids, reason=st.just("no image")),
    st.builds(vm.ReportDeleted, vm_id=st.just(VM_ID), host_id=host_ids),
)


def run(sequence: list[vm.VmCommand]) -> tuple[vm.Vm | None, list[Event]]:
    state: vm.Vm | None = None
    log: list[Event] = []
    for command in sequence:
        try:
            events = vm.decide(state, command)
        except DomainError:
            continue
        for event in events:
            state = vm.evolve(state, event)
        log.extend(events)
    return state, log


@settings(max_examples=300)
@given(st.lists(commands, max_size=40))
def test_a_deleted_vm_accepts_no_command(sequence: list[vm.VmCommand]) -> None:
    state, _ = run(sequence)
    if state is not None and state.status is vm.Status.DELETED:
        for command in [create, vm.StartVm(vm_id=VM_ID), vm.StopVm(vm_id=VM_ID), vm.DeleteVm(vm_id=VM_ID),
                        vm.PlaceVm(vm_id=VM_ID, host_id=HOSTS[0]), vm.ReportStarted(vm_id=VM_ID, host_id=HOSTS[0])]:
            with pytest.raises((Rejected, NotFound)):
                vm.decide(state, command)


@settings(max_examples=300)
@given(st.lists(commands, max_size=40))
def test_a_vm_is_placed_on_at_most_one_host_at_a_time(sequence: list[vm.VmCommand]) -> None:
    _, log = run(sequence)
    placements = [e for e in log if isinstance(e, vm.VmScheduled)]
    assert len(placements) <= 1  # no migration yet: once placed, never placed again
    placed_on = placements[0].host_id if placements else None
    for event in log:  # and only that host's observations are ever accepted
        host = getattr(event, "host_id", None)
        if host is not None and not isinstance(event, vm.VmScheduled):
            assert host == placed_on


@settings(max_examples=200)
@given(st.lists(commands, max_size=40))
def test_replaying_the_stream_rebuilds_the_same_state(sequence: list[vm.VmCommand]) -> None:
    state, log = run(sequence)
    replayed: vm.Vm | None = None
    for event in log:  # through the codec, as the store would hand it back
        tag, schema, data = CODEC.encode(event)
        replayed = vm.evolve(replayed, CODEC.decode(tag, schema, data))
    assert replayed == state
    if state is not None:  # and a snapshot of the state decodes to the same state
        assert msgspec.msgpack.decode(msgspec.msgpack.encode(state), type=vm.Vm) == state


def test_deleting_a_never_placed_vm_is_immediate() -> None:
    state, log = run([create, vm.DeleteVm(vm_id=VM_ID)])
    assert state is not None and state.status is vm.Status.DELETED
    assert [type(e) for e in log] == [vm.VmRequested, vm.VmDeleteRequested, vm.VmDeleted]


def test_lifecycle_through_a_host() -> None:
    h = HOSTS[0]
    state, _ = run([create, vm.PlaceVm(vm_id=VM_ID, host_id=h), vm.ReportStarted(vm_id=VM_ID, host_id=h)])
    assert state is not None and state.status is vm.Status.RUNNING
    with pytest.raises(Rejected, match="placed on"):
        vm.decide(state, vm.ReportStopped(vm_id=VM_ID, host_id=HOSTS[1]))
    state, _ = run([create, vm.PlaceVm(vm_id=VM_ID, host_id=h), vm.ReportStarted(vm_id=VM_ID, host_id=h),
                    vm.StopVm(vm_id=VM_ID), vm.ReportStopped(vm_id=VM_ID, host_id=h)])
    assert state is not None and state.status is vm.Status.STOPPED and state.desired is vm.Desired.STOPPED


def test_commands_on_a_missing_vm_are_not_found() -> None:
    with pytest.raises(NotFound):
        vm.decide(None, vm.StopVm(vm_id=VM_ID))


def test_an_old_event_schema_is_upcast_not_rewritten() -> None:
    codec = build_codec()

    class VmRequestedV2(vm.VmRequested, tag="vm.requested"):
        schema = 2

    codec2 = type(codec)([t for t in codec._types.values() if t is not vm.VmRequested] + [VmRequestedV2])
    # schema 1 had "memory" instead of "ram"
    codec2.register_upcaster("vm.requested", 1, lambda raw: {**{k: v for k, v in raw.items() if k != "memory"},
                                                             "ram": raw["memory"]})
    old = msgspec.json.encode({"type": "vm.requested", "vm_id": str(VM_ID), "owner": "a", "name": "a", "cores": 1,
                               "memory": 5, "disk": 6, "image": "tiny"})
    event = codec2.decode("vm.requested", 1, old)
    assert isinstance(event, vm.VmRequested) and event.ram == 5
    with pytest.raises(ValueError, match="newer"):
        codec.decode("vm.requested", 3, old)
