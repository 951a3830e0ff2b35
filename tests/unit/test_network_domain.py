"""Network value types and the network aggregate: pure, no fixtures."""

from __future__ import annotations

import ipaddress
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ucloud.domain import network as net
from ucloud.domain import vm as vm_domain
from ucloud.domain.errors import InvalidValue, NotFound, Rejected


def test_eui64_address_follows_rfc_4291() -> None:
    # RFC 4291 appendix A: 00:00:5e:10:00:01 -> interface id 0200:5eff:fe10:0001 (U/L bit flipped)
    assert net.eui64_address("2001:db8:1:2::/64", "00:00:5e:10:00:01") == "2001:db8:1:2:200:5eff:fe10:1"
    assert net.link_local_address("02:00:00:00:00:01") == "fe80::ff:fe00:1"


@given(st.integers(min_value=0, max_value=2**48 - 1))
def test_a_generated_mac_is_local_unicast_and_its_eui64_gives_it_back(bits: int) -> None:
    mac = net.mac_from_int(bits)
    assert net.check_mac(mac) == mac
    assert net.is_local_unicast(mac)
    address = net.eui64_address("fd00:1:2:3::/64", mac)
    assert ipaddress.IPv6Address(address) in ipaddress.IPv6Network("fd00:1:2:3::/64")
    assert net.mac_of_eui64(address) == mac


def test_multicast_group_is_derived_from_the_vni() -> None:
    assert net.multicast_group(42) == "ff05::2a"
    assert net.multicast_group(net.VNI_MAX) == "ff05::ff:ffff"
    with pytest.raises(InvalidValue):
        net.multicast_group(0)


def test_ula_pool_is_a_fd_48() -> None:
    pool = ipaddress.IPv6Network(net.ula_pool(0x12_3456_789A))
    assert str(pool) == "fd12:3456:789a::/48"
    assert net.prefixes_in(str(pool)) == 65536
    assert net.nth_prefix(str(pool), 1) == "fd12:3456:789a:1::/64"
    assert net.prefix_index(str(pool), "fd12:3456:789a:ff::/64") == 255
    assert net.prefix_index(str(pool), "fd00::/64") is None


@pytest.mark.parametrize("bad", ["ff05::/48", "fe80::/64", "fd00::/65", "fd00::1/48", "nonsense", "::1/128", 5])
def test_a_bad_pool_is_refused_naming_the_field(bad: object) -> None:
    with pytest.raises(InvalidValue, match="ipv6_pool"):
        net.check_pool(bad)


def _ready(ipam: net.Ipam = net.Ipam.AUTO) -> net.Network:
    network_id = net.network_id_for("alice", "lan")
    state = None
    for event in [*net.decide(None, net.CreateNetwork(network_id=network_id, owner="alice", name="lan", ipam=ipam))]:
        state = net.evolve(state, event)
    prefix = "" if ipam is net.Ipam.NONE else "fd00:0:0:1::/64"
    for event in net.decide(state, net.AllocateNetwork(network_id=network_id, vni=7, prefix=prefix)):
        state = net.evolve(state, event)
    assert state is not None and state.status is net.NetworkStatus.READY
    return state


def test_a_network_with_ports_cannot_be_deleted_and_names_its_vms() -> None:
    network = _ready()
    vm_id, nic_id = uuid.uuid4(), uuid.uuid4()
    [added] = net.decide(network, net.AddPort(network_id=network.id, vm_id=vm_id, nic_id=nic_id))
    network = net.evolve(network, added)
    assert network is not None
    with pytest.raises(Rejected, match=str(vm_id)):
        net.decide(network, net.DeleteNetwork(network_id=network.id))
    [removed] = net.decide(network, net.RemovePort(network_id=network.id, vm_id=vm_id, nic_id=nic_id))
    network = net.evolve(network, removed)
    assert network is not None
    [deleted] = net.decide(network, net.DeleteNetwork(network_id=network.id))
    network = net.evolve(network, deleted)
    with pytest.raises(NotFound):
        net.decide(network, net.AddPort(network_id=uuid.uuid4(), vm_id=vm_id, nic_id=nic_id))


def test_a_none_network_gets_no_prefix_and_an_ipam_network_needs_one() -> None:
    network_id = uuid.uuid4()
    state = net.evolve(None, net.NetworkRequested(network_id=network_id, owner="a", name="l2", ipam=net.Ipam.NONE))
    with pytest.raises(Rejected):
        net.decide(state, net.AllocateNetwork(network_id=network_id, vni=1, prefix="fd00::/64"))
    assert _ready(net.Ipam.NONE).prefix == ""


def test_a_claim_is_held_by_one_holder_until_released() -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    [claimed] = net.decide_claim(None, net.ClaimValue(resource="vni:1", holder=a))
    claim = net.evolve_claim(None, claimed)
    assert net.decide_claim(claim, net.ClaimValue(resource="vni:1", holder=a)) == []
    with pytest.raises(net.Taken):
        net.decide_claim(claim, net.ClaimValue(resource="vni:1", holder=b))
    assert net.decide_claim(claim, net.ReleaseValue(resource="vni:1", holder=b)) == []
    [released] = net.decide_claim(claim, net.ReleaseValue(resource="vni:1", holder=a))
    claim = net.evolve_claim(claim, released)
    assert net.decide_claim(claim, net.ClaimValue(resource="vni:1", holder=b))


def test_vm_nics_keep_their_order_and_a_network_once() -> None:
    vm_id = uuid.uuid4()
    vm = vm_domain.evolve(None, vm_domain.VmRequested(vm_id=vm_id, owner="a", name="v", cores=1, ram=1, disk=1,
                                                      image="tiny"))
    networks = [uuid.uuid4() for _ in range(3)]
    for index, network_id in enumerate(networks):
        [event] = vm_domain.decide(vm, vm_domain.AddNic(vm_id=vm_id, nic_id=uuid.UUID(int=index), network_id=network_id))
        vm = vm_domain.evolve(vm, event)
    assert vm is not None and [n.network_id for n in vm.nics] == networks
    with pytest.raises(Rejected, match="already on network"):
        vm_domain.decide(vm, vm_domain.AddNic(vm_id=vm_id, nic_id=uuid.uuid4(), network_id=networks[0]))
    [allocated] = vm_domain.decide(vm, vm_domain.AllocateNic(vm_id=vm_id, nic_id=uuid.UUID(int=1), mac="02:00:00:00:00:01"))
    vm = vm_domain.evolve(vm, allocated)
    [removed] = vm_domain.decide(vm, vm_domain.RemoveNic(vm_id=vm_id, network_id=networks[0]))
    vm = vm_domain.evolve(vm, removed)
    assert vm is not None and [(n.network_id, n.mac) for n in vm.nics] == [(networks[1], "02:00:00:00:00:01"),
                                                                            (networks[2], "")]


def test_a_bridge_name_gives_back_its_vni_and_nothing_else_does() -> None:
    from ucloud.domain.network import bridge_name, vni_of_bridge

    for vni in (1, 42, 4242, 2**24 - 1):
        assert vni_of_bridge(bridge_name(vni)) == vni
    assert bridge_name(42) == "ucbr2a"
    for other in ("eth0", "ucbr", "ucbr0", "ucbr02a", "ucbr2A", "ucbr1000000", "ucbrzz", "xucbr2a", "ucbr-1"):
        assert vni_of_bridge(other) is None, other
