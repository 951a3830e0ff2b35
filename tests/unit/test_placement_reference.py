"""place() is written as one inlined loop for speed; it must choose exactly what the plain
policy chooses: filter with domain.host.fits, then the lowest (SPREAD) or highest (PACK)
most-booked share after placing, ties broken by host name."""

from __future__ import annotations

import uuid

from hypothesis import given, settings
from hypothesis import strategies as st

from ucloud.domain.host import (
    CapacityClaimed,
    CapacityReleased,
    Claim,
    Host,
    Overcommit,
    evolve,
    fits,
)
from ucloud.processes.placement import Needs, NoRoom, Placed, Strategy, place

GiB = 1024**3


def reference(hosts: list[Host], needs: Needs, overcommit: Overcommit, strategy: Strategy) -> Placed | None:
    def share_after(h: Host) -> float:
        return max((h.used_cores + needs.cores) / (h.cores * overcommit.cpu),
                   (h.used_ram + needs.ram) / (h.ram * overcommit.ram),
                   (h.used_disk + needs.disk) / (h.disk * overcommit.disk))

    candidates = [h for h in hosts if fits(h, needs.cores, needs.ram, needs.disk, overcommit) is None]
    if not candidates:
        return None
    sign = 1 if strategy is Strategy.SPREAD else -1
    return Placed(min(candidates, key=lambda h: (sign * share_after(h), h.hostname)).id)


host_specs = st.lists(
    st.tuples(st.integers(1, 16), st.integers(1, 16), st.integers(1, 16),  # cores, RAM GiB, disk GiB
              st.lists(st.tuples(st.integers(1, 8), st.integers(1, 8), st.integers(1, 8)), max_size=6)),
    max_size=12,
)


@settings(max_examples=300)
@given(host_specs, st.integers(1, 8), st.integers(1, 8), st.integers(1, 8),
       st.sampled_from(list(Strategy)), st.sampled_from([Overcommit(), Overcommit(1.0, 1.0, 1.0),
                                                         Overcommit(2.0, 1.5, 1.2)]))
def test_place_chooses_what_the_plain_policy_chooses(specs: list, cores: int, ram: int, disk: int,
                                                     strategy: Strategy, overcommit: Overcommit) -> None:
    hosts = [
        Host(id=uuid.uuid4(), hostname=f"h{i % 5}{i}", cores=c, ram=r * GiB, disk=d * GiB, hypervisor="qemu",
             claims={uuid.uuid4(): Claim(cc, cr * GiB, cd * GiB) for cc, cr, cd in claims})
        for i, (c, r, d, claims) in enumerate(specs)
    ]
    needs = Needs(cores, ram * GiB, disk * GiB)
    decision = place(hosts, needs, overcommit=overcommit, strategy=strategy)
    expected = reference(hosts, needs, overcommit, strategy)
    if expected is None:
        assert isinstance(decision, NoRoom)
    else:
        assert decision == expected


def test_equal_shares_go_to_the_first_name_whatever_the_order() -> None:
    a, b = (Host(id=uuid.uuid4(), hostname=name, cores=4, ram=8 * GiB, disk=8 * GiB, hypervisor="qemu")
            for name in ("a", "b"))
    for strategy in Strategy:
        assert place([b, a], Needs(1, GiB, GiB), strategy=strategy) == Placed(a.id)
        assert place([a, b], Needs(1, GiB, GiB), strategy=strategy) == Placed(a.id)


def test_cached_usage_follows_each_new_host_state() -> None:
    host = Host(id=uuid.uuid4(), hostname="a", cores=4, ram=8 * GiB, disk=8 * GiB, hypervisor="qemu")
    assert (host.used_cores, host.used_ram, host.used_disk) == (0, 0, 0)
    vm = uuid.uuid4()
    claimed = evolve(host, CapacityClaimed(host_id=host.id, vm_id=vm, cores=2, ram=GiB, disk=2 * GiB))
    assert claimed is not None and (claimed.used_cores, claimed.used_ram, claimed.used_disk) == (2, GiB, 2 * GiB)
    released = evolve(claimed, CapacityReleased(host_id=host.id, vm_id=vm))
    assert released is not None and released.used_cores == 0
    assert host.used_cores == 0  # the old state's cached figure is its own
