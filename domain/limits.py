"""Upper (and lower) bounds on what one request may ask for, per installation.

The defaults fit any real machine of today with room to spare; an installation may
narrow or widen them (``GatewayConfig.limits``, ``ucloud up --limits FILE``). The domain
checks every size and count against them after reading the user's units, so a 16 EiB
VM or a host declaring 2^80 bytes is refused with a problem naming the field.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import msgspec

from .errors import OutOfBounds
from .units import format_size, parse_cores, parse_size

KiB, MiB, GiB, TiB, PiB = (1024**n for n in range(1, 6))
# What no configuration may exceed: sizes stay within a signed 64-bit integer, which
# QEMU, SQLite and every client language can hold.
CEILING = 2**63 - 1

_Positive = Annotated[int, msgspec.Meta(ge=1, le=CEILING)]


class Limits(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Bounds on a VM, a host and their lists; sizes in bytes."""

    vm_cores: _Positive = 1024
    vm_ram: _Positive = 4 * TiB
    vm_disk: _Positive = 64 * TiB
    vm_min_ram: _Positive = 16 * MiB
    vm_min_disk: _Positive = 1 * MiB
    vm_ssh_keys: _Positive = 32  # names in one VM's ssh_keys
    vm_user_data: _Positive = 16 * KiB  # characters of a VM's user data (it is in the log)
    host_cores: _Positive = 16384
    host_ram: _Positive = 256 * TiB
    host_disk: _Positive = 16 * PiB
    public_key_length: _Positive = 16 * KiB  # an OpenSSH key line, comment included

    def __post_init__(self) -> None:
        if self.vm_min_ram > self.vm_ram:
            raise ValueError(f"vm_min_ram ({self.vm_min_ram}) is above vm_ram ({self.vm_ram})")
        if self.vm_min_disk > self.vm_disk:
            raise ValueError(f"vm_min_disk ({self.vm_min_disk}) is above vm_disk ({self.vm_disk})")


DEFAULT_LIMITS = Limits()


def load_limits(raw: bytes) -> Limits:
    """Limits from a JSON object naming only the bounds to change; a clear ValueError otherwise."""
    try:
        return msgspec.json.decode(raw or b"{}", type=Limits)
    except msgspec.MsgspecError as error:
        raise ValueError(f"bad limits: {error}") from None


def check_at_most(value: int, limit: int, field: str, what: str) -> int:
    if value > limit:
        raise OutOfBounds(field, f"{value} is more than this installation allows for {what} ({limit})")
    return value


def vm_request(limits: Limits, cores: int | str, ram: int | str, disk: int | str,
               ssh_keys: Sequence[str] = ()) -> tuple[int, int, int]:
    """A VM's cores, RAM and disk as the user wrote them -> (cores, bytes, bytes), within
    ``limits``; OutOfBounds naming the field otherwise (also for too many key names).
    One rule for creating a VM and for quoting one (an order)."""
    if len(ssh_keys) > limits.vm_ssh_keys:
        raise OutOfBounds("ssh_keys", f"{len(ssh_keys)} names; at most {limits.vm_ssh_keys} are allowed")
    cores_count = check_at_most(parse_cores(cores), limits.vm_cores, "cores", "a VM's cores")
    ram_bytes = check_at_most(parse_size(ram, "ram"), limits.vm_ram, "ram", "a VM's RAM")
    disk_bytes = check_at_most(parse_size(disk, "disk"), limits.vm_disk, "disk", "a VM's disk")
    if ram_bytes < limits.vm_min_ram:
        raise OutOfBounds("ram", f"must be at least {format_size(limits.vm_min_ram)}")
    if ram_bytes % MiB:
        raise OutOfBounds("ram", "must be a whole number of MiB")
    if disk_bytes < limits.vm_min_disk:
        raise OutOfBounds("disk", f"must be at least {format_size(limits.vm_min_disk)}")
    return cores_count, ram_bytes, disk_bytes
