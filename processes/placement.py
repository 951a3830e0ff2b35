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

from ucloud.domain.host import Host, Overcommit
from ucloud.domain.units import readable_size

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


def place(
    hosts: Iterable[Host],
    needs: Needs,
    *,
    overcommit: Overcommit = DEFAULT_OVERCOMMIT,
    strategy: Strategy = Strategy.SPREAD,
    exclude: frozenset[UUID] = frozenset(),
    store: str = "",
) -> Placed | NoRoom:
    """The best host for ``needs``; with ``store`` (the VM's image store) only among the
    hosts that reach it."""
    # The weight is the most-booked resource's share of its (overcommitted) capacity after
    # placing. One pass, with the filter (the same comparisons as domain.host.fits) and the
    # weight written inline: this loop runs once per host per VM, and with 1,000
    # hosts the function calls and tuples of the plain version were most of the
    # scheduler's time (docs/performance.md, scheduler benchmark).
    cpu, ram, disk = overcommit.cpu, overcommit.ram, overcommit.disk
    cores_needed, ram_needed, disk_needed = needs.cores, needs.ram, needs.disk
    sign = 1.0 if strategy is Strategy.SPREAD else -1.0
    best: Host | None = None
    best_weight = 0.0
    refused: list[Host] = []
    unreached = 0
    for host in hosts:
        if exclude and host.id in exclude:
            continue
        if store and store not in host.stores:
            unreached += 1
            continue
        cores_cap = host.cores * cpu
        cores_after = host.used_cores + cores_needed
        ram_cap = host.ram * ram
        ram_after = host.used_ram + ram_needed
        disk_cap = host.disk * disk
        disk_after = host.used_disk + disk_needed
        if cores_after > cores_cap or ram_after > ram_cap or disk_after > disk_cap:
            refused.append(host)
            continue
        weight = cores_after / cores_cap
        share = ram_after / ram_cap
        if share > weight:
            weight = share
        share = disk_after / disk_cap
        if share > weight:
            weight = share
        weight *= sign
        # Deterministic tie-break by name, so two schedulers with one view agree.
        if best is None or weight < best_weight or (weight == best_weight and host.hostname < best.hostname):
            best, best_weight = host, weight
    if best is not None:
        return Placed(best.id)
    if not refused and unreached:
        return NoRoom(f"no host reaches image store {store!r}")
    if not refused:
        return NoRoom("no hosts are registered" if not exclude else "no other host is available")
    return NoRoom(no_room_reason(refused, needs, overcommit))


def _free(host: Host, overcommit: Overcommit) -> tuple[int, int, int]:
    """What a host can still take: cores, RAM and disk bytes under overcommit (never negative)."""
    return (max(0, int(host.cores * overcommit.cpu) - host.used_cores),
            max(0, int(host.ram * overcommit.ram) - host.used_ram),
            max(0, int(host.disk * overcommit.disk) - host.used_disk))


def no_room_reason(refused: list[Host], needs: Needs, overcommit: Overcommit) -> str:
    """Why no host fits, in units a person reads: per resource that no host has enough of,
    what the VM needs and the most any host has free (and where), e.g. "needs 500 GiB RAM;
    the largest free is 22 GiB on host vm"; then the first hosts' own shortfalls."""
    free = {host.hostname: _free(host, overcommit) for host in refused}
    wanted = (needs.cores, needs.ram, needs.disk)
    show = (lambda n: f"{n} cores" if n != 1 else "1 core", readable_size, readable_size)
    labels = ("", " RAM", " disk")
    short: list[str] = []
    for index in range(3):
        # The host with the most free of this resource (ties: the first name).
        hostname, most = min(((name, amounts[index]) for name, amounts in free.items()),
                             key=lambda item: (-item[1], item[0]))
        if wanted[index] > most:
            short.append(f"needs {show[index](wanted[index])}{labels[index]}; the largest free is "
                         f"{show[index](most)} on host {hostname}")
    if not short:
        short.append("each resource is free somewhere, but no one host has all of it")
    per_host = []
    for name in sorted(free)[:5]:
        lacks = [f"{show[i](free[name][i])}{labels[i]}" for i in range(3) if wanted[i] > free[name][i]]
        per_host.append(f"{name}: only {', '.join(lacks)} free")
    more = f" (and {len(free) - 5} more)" if len(free) > 5 else ""
    asked = f"{show[0](needs.cores)}, {readable_size(needs.ram)} RAM, {readable_size(needs.disk)} disk"
    return f"no host has room for {asked}: {'; '.join(short)} (hosts: {'; '.join(per_host)}{more})"
