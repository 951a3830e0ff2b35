"""The placement policy, as a pure function over a view of hosts."""

from __future__ import annotations

import uuid

from hypothesis import given
from hypothesis import strategies as st

from ucloud.domain.host import Claim, Host, Overcommit
from ucloud.processes.placement import Needs, NoRoom, Placed, Strategy, place

GiB = 1024**3


def host(name: str, cores: int = 8, ram: int = 16 * GiB, disk: int = 100 * GiB, used: int = 0) -> Host:
    claims = {uuid.uuid4(): Claim(1, GiB, GiB) for _ in range(used)}
    return Host(id=uuid.uuid5(uuid.NAMESPACE_DNS, name), hostname=name, cores=cores, ram=ram, disk=disk,
                hypervisor="qemu", claims=claims)


def test_spread_picks_the_emptiest_host() -> None:
    hosts = [host("a", used=3), host("b", used=1), host("c", used=2)]
    assert place(hosts, Needs(1, GiB, GiB)) == Placed(hosts[1].id)


def test_pack_picks_the_fullest_host_that_fits() -> None:
    hosts = [host("a", used=3), host("b", used=1), host("c", used=2)]
    assert place(hosts, Needs(1, GiB, GiB), strategy=Strategy.PACK) == Placed(hosts[0].id)


def test_cpu_overcommit_allows_four_times_the_cores_by_default() -> None:
    small = host("a", cores=2)
    assert isinstance(place([small], Needs(8, GiB, GiB)), Placed)
    assert isinstance(place([small], Needs(9, GiB, GiB)), NoRoom)
    assert isinstance(place([small], Needs(3, GiB, GiB), overcommit=Overcommit(cpu=1.0)), NoRoom)


def test_ram_is_not_overcommitted_by_default_and_the_reason_names_it() -> None:
    decision = place([host("a", ram=2 * GiB)], Needs(1, 3 * GiB, GiB))
    assert isinstance(decision, NoRoom)
    assert "a: only 2 GiB RAM free" in decision.reason


def test_an_unschedulable_vm_says_what_it_needs_and_the_most_any_host_has_free() -> None:
    busy = host("vm", cores=4, ram=24 * GiB, disk=500 * GiB, used=2)  # 2 GiB RAM and 2 GiB disk claimed
    small = host("small", cores=2, ram=8 * GiB, disk=100 * GiB)
    decision = place([small, busy], Needs(2, 500 * GiB, 10 * GiB))
    assert isinstance(decision, NoRoom)
    assert decision.reason.startswith("no host has room for 2 cores, 500 GiB RAM, 10 GiB disk: "
                                      "needs 500 GiB RAM; the largest free is 22 GiB on host vm ")
    assert "disk;" not in decision.reason and "cores;" not in decision.reason  # those fit somewhere
    assert "small: only 8 GiB RAM free" in decision.reason

    decision = place([small, busy], Needs(20, GiB, 2 * 1024 * GiB))
    assert isinstance(decision, NoRoom)
    assert "needs 20 cores; the largest free is 14 cores on host vm" in decision.reason  # 4 x 4.0 - 2
    assert "needs 2 TiB disk; the largest free is 498 GiB on host vm" in decision.reason


def test_when_each_resource_fits_somewhere_but_not_together_the_reason_says_so() -> None:
    cpu_rich = host("cpu", cores=64, ram=2 * GiB)
    ram_rich = host("ram", cores=1, ram=256 * GiB)
    decision = place([cpu_rich, ram_rich], Needs(16, 64 * GiB, GiB))
    assert isinstance(decision, NoRoom)
    assert "no one host has all of it" in decision.reason


def test_no_hosts_is_a_clear_reason() -> None:
    decision = place([], Needs(1, GiB, GiB))
    assert isinstance(decision, NoRoom) and "no hosts" in decision.reason


def test_excluded_hosts_are_not_chosen() -> None:
    a, b = host("a"), host("b", used=5)
    assert place([a, b], Needs(1, GiB, GiB), exclude=frozenset({a.id})) == Placed(b.id)


@given(
    st.lists(st.tuples(st.integers(1, 16), st.integers(1, 64), st.integers(0, 10)), min_size=1, max_size=8),
    st.integers(1, 32), st.integers(1, 64),
)
def test_a_chosen_host_always_has_room(specs: list[tuple[int, int, int]], cores: int, ram_gib: int) -> None:
    hosts = [host(f"h{i}", cores=c, ram=r * GiB, used=u) for i, (c, r, u) in enumerate(specs)]
    needs = Needs(cores, ram_gib * GiB, GiB)
    decision = place(hosts, needs)
    if isinstance(decision, Placed):
        chosen = next(h for h in hosts if h.id == decision.host_id)
        assert chosen.used_cores + cores <= chosen.cores * 4
        assert chosen.used_ram + needs.ram <= chosen.ram
    else:
        for h in hosts:  # "no room" must be true of every host
            assert h.used_cores + cores > h.cores * 4 or h.used_ram + needs.ram > h.ram or h.used_disk + GiB > h.disk
