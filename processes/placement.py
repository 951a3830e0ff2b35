"""Pure placement policy: filters, then weights, over a read-only view of hosts.

No I/O: given the hosts as the caller sees them and a VM's needs, it names a host
or says why none fits. The caller appends the claim at the host's version, so a
stale view loses cleanly and is asked again with fresher hosts.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from uuid import UUID

import msgspec

from ucloud.domain.host import Host, Overcommit, fits

DEFAULT_OVERCOMMIT = Overcommit()


class Strategy(enum.StrEnum):
    SPREAD = "spread"  # the emptiest host first: fewer VMs hurt by one host failing
    PACK = "pack"  # the fullest host that fits: keeps whole hosts free


class Needs(msgspec.Struct, frozen=True):
    cores: int
    ram: int
    disk: int


class Placed(msgspec.Struct, frozen=True):
    host_id: UUID


class NoRoom(msgspec.Struct, frozen=True):
    reason: str


def _load_after(host: Host, needs: Needs, overcommit: Overcommit) -> float:
    """The most-booked resource's share of its (overcommitted) capacity after placing."""
    return max(
        (host.used_cores + needs.cores) / (host.cores * overcommit.cpu),
        (host.used_ram + needs.ram) / (host.ram * overcommit.ram),
        (host.used_disk + needs.disk) / (host.disk * overcommit.disk),
    )


def place(
    hosts: Iterable[Host],
    needs: Needs,
    *,
    overcommit: Overcommit = DEFAULT_OVERCOMMIT,
    strategy: Strategy = Strategy.SPREAD,
    exclude: frozenset[UUID] = frozenset(),
) -> Placed | NoRoom:
    candidates: list[Host] = []
    refusals: list[str] = []
    for host in hosts:
        if host.id in exclude:
            continue
        reason = fits(host, needs.cores, needs.ram, needs.disk, overcommit)
        if reason is None:
            candidates.append(host)
        else:
            refusals.append(f"{host.hostname}: {reason}")
    if not candidates:
        if not refusals:
            return NoRoom("no hosts are registered" if not exclude else "no other host is available")
        shown = "; ".join(sorted(refusals)[:5])
        more = f" (and {len(refusals) - 5} more)" if len(refusals) > 5 else ""
        return NoRoom(f"no host has room for {needs.cores} cores, {needs.ram} B RAM, {needs.disk} B disk: {shown}{more}")
    # Deterministic tie-break by name, so two schedulers with one view agree.
    if strategy is Strategy.SPREAD:
        best = min(candidates, key=lambda h: (_load_after(h, needs, overcommit), h.hostname))
    else:
        best = min(candidates, key=lambda h: (-_load_after(h, needs, overcommit), h.hostname))
    return Placed(best.id)
