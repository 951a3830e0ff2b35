"""What operators did to authentication on the server itself, recorded in the log.

``ucloud admin recover`` (root on the machine that holds the state dir) enrols a fresh
admin identity outside the API. The seed stays in the secret store; the log records
that it happened, by whom (``root@local``), for whom and what changed, so a recovery
is never silent. One stream per admin name.
"""

from __future__ import annotations

import uuid
from uuid import UUID

import msgspec

from .errors import InvalidValue, Rejected
from .events import Command, Event

ADMIN_NAMESPACE = uuid.UUID("6f1f1d2e-8d53-4c1e-9a0e-4b2f5bd0c004")


def admin_id_for(name: str) -> UUID:
    return uuid.uuid5(ADMIN_NAMESPACE, name)


class AdminRecovered(Event, tag="admin.recovered", frozen=True):
    """Root on the server enrolled a fresh admin identity (``ucloud admin recover``); no secret."""

    admin_id: UUID
    name: str  # the admin's canonical name in the directory
    realm: str  # the admin realm the new seed is for
    created_user: bool  # the built-in directory had no such user: it was added
    reenabled: bool  # the user was disabled and is enabled again
    granted_realm: bool  # the directory did not grant the admin realm: it does now
    replaced_seed: bool  # an older seed in that realm was replaced (it stopped working)
    machine: str  # the host name of the machine it ran on


OPERATOR_EVENT_TYPES: tuple[type[Event], ...] = (AdminRecovered,)


class RecordAdminRecovery(Command, tag="admin.record_recovery", frozen=True):
    name: str
    realm: str
    created_user: bool
    reenabled: bool
    granted_realm: bool
    replaced_seed: bool
    machine: str


class AdminAccount(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    id: UUID
    name: str
    recoveries: int = 0


def evolve(account: AdminAccount | None, event: Event) -> AdminAccount | None:
    match event:
        case AdminRecovered():
            recoveries = account.recoveries if account is not None else 0
            return AdminAccount(id=event.admin_id, name=event.name, recoveries=recoveries + 1)
    return account


def decide(account: AdminAccount | None, command: Command) -> list[Event]:
    match command:
        case RecordAdminRecovery():
            for field in ("name", "realm", "machine"):
                value = getattr(command, field)
                if not value or not value.isprintable() or len(value) > 256:
                    raise InvalidValue(field, "must be 1-256 printable characters")
            return [AdminRecovered(admin_id=admin_id_for(command.name), name=command.name, realm=command.realm,
                                   created_user=command.created_user, reenabled=command.reenabled,
                                   granted_realm=command.granted_realm, replaced_seed=command.replaced_seed,
                                   machine=command.machine)]
    raise Rejected(f"{type(command).__name__} is not an admin account command")


def stream_name(admin_id: UUID) -> str:
    return f"admin-{admin_id}"
