"""The metadata projection folded from events: a NIC is found while it exists and not
after it is removed or its VM deleted; keys follow additions and deletions; the formats
say the same as the projection; a snapshot round trip answers alike."""

from __future__ import annotations

import ipaddress
import uuid
from datetime import UTC, datetime

import msgspec

from ucloud.domain import network as net
from ucloud.domain import sshkey as sshkey_domain
from ucloud.domain import vm as vm_domain
from ucloud.domain.events import Event
from ucloud.eventstore.records import EventRecord
from ucloud.gateway import metadata_formats as fmt
from ucloud.projections.metadata import MetadataView

KEY_A = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICvYBsl/DgCvGh/DMo+nY6kmlyPI24+sT5OvcdsYbW6Q alice@laptop"
KEY_B = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIG2N9j80sbaY1nmljEToRcN55XktyW4TR4LTP2exYzp alice@desk"
PREFIX = "fd00:1:2:3::/64"
MAC = "02:00:5e:00:00:07"


def fold(view: MetadataView, *events: Event) -> None:
    for event in events:
        record = EventRecord(id=uuid.uuid4(), type="", stream="", version=1, position=1,
                             time=datetime.now(UTC), data=b"")
        view.apply(record, event)


def test_a_nic_is_found_while_it_exists_with_its_owners_keys_and_its_network() -> None:
    view = MetadataView()
    network_id, vm_id, nic_id = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    key_a, key_b = sshkey_domain.key_id_for("alice", "a"), sshkey_domain.key_id_for("alice", "b")
    fold(view,
         net.NetworkRequested(network_id=network_id, owner="alice", name="lan", ipam=net.Ipam.AUTO),
         net.NetworkAllocated(network_id=network_id, vni=42, group=net.multicast_group(42), prefix=PREFIX),
         sshkey_domain.SshKeyAdded(key_id=key_a, owner="alice", name="a", public_key=KEY_A, fingerprint="x"),
         sshkey_domain.SshKeyAdded(key_id=key_b, owner="alice", name="b", public_key=KEY_B, fingerprint="y"),
         vm_domain.VmRequested(vm_id=vm_id, owner="alice", name="web", cores=1, ram=2**28, disk=2**30,
                               image="tiny", ssh_keys=("b",), user_data="#!/bin/sh\n"),
         vm_domain.VmNicAdded(vm_id=vm_id, nic_id=nic_id, network_id=network_id))
    assert view.vm_of(network_id, MAC) is None  # no MAC yet
    fold(view, vm_domain.VmNicAllocated(vm_id=vm_id, nic_id=nic_id, mac=MAC))
    vm = view.vm_of(network_id, MAC)
    assert vm is not None and vm.id == vm_id
    assert view.network_of_vni(42) == network_id
    assert view.network_of_address(ipaddress.IPv6Address(net.eui64_address(PREFIX, MAC))) == network_id
    md = view.metadata(vm)
    assert [name for name, _ in md.ssh_keys] == ["b", "a"]  # the VM's chosen key first, then the owner's others
    [nic] = md.nics
    assert (nic.name, nic.address, nic.gateway) == ("eth0", net.eui64_address(PREFIX, MAC), net.router_address(PREFIX))
    assert fmt.authorized_keys(md) == f"{KEY_B}\n{KEY_A}\n"
    assert msgspec.json.decode(fmt.openstack_meta_data(md))["public_keys"] == {"b": KEY_B, "a": KEY_A}

    fold(view, sshkey_domain.SshKeyDeleted(key_id=key_b))
    assert view.metadata(vm).ssh_keys == (("a", KEY_A),)  # what was made before the event is not served

    copy = MetadataView()
    copy.load(msgspec.msgpack.decode(msgspec.msgpack.encode(view.dump())))
    again = copy.vm_of(network_id, MAC)
    assert again is not None and copy.metadata(again) == view.metadata(vm)

    fold(view, vm_domain.VmNicRemoved(vm_id=vm_id, nic_id=nic_id))
    assert view.vm_of(network_id, MAC) is None
    fold(copy, vm_domain.VmDeleteRequested(vm_id=vm_id), vm_domain.VmDeleted(vm_id=vm_id))
    assert copy.vm_of(network_id, MAC) is None and vm_id not in copy.vms
    fold(copy, net.NetworkDeleted(network_id=network_id))
    assert copy.network_of_vni(42) is None
