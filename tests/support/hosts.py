"""Hosts for tests that run no host agent: registered, then marked up as an agent would
(a heartbeat session), because only up hosts get placements."""

from __future__ import annotations

from uuid import UUID

from ucloud.commands.service import CommandService
from ucloud.commands.unit_of_work import SYSTEM, Actor, Outcome


async def up_host(commands: CommandService, hostname: str, cores: int | str, ram: int | str, disk: int | str,
                  actor: Actor = SYSTEM) -> Outcome[UUID]:
    """Register a host and bring it up (session 1); the registration's outcome."""
    outcome = await commands.register_host(actor, hostname, cores, ram, disk)
    up = await commands.mark_host_up(actor, outcome.result, 1, 3.0)
    outcome.position = max(outcome.position, up.position)
    return outcome
