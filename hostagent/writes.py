"""Everything a host agent writes, behind one narrow port with two adapters.

An agent writes four things: its registration (measured capacity, hypervisor, stores),
``host.up`` for each life of its heartbeat lease, the end of an evacuation, and what it
observed of its VMs. ``HostWrites`` is that and nothing more; the agent holds no other
way to write.

- ``DirectWrites``: straight into the command side, in the same process (``ucloud up``,
  where gateway, processes and agent are one trusted process on one machine).
- ``GatewayWrites``: through the gateway's host routes (``/v1/host-agent/...``) with the
  host's own credential (``ucloud host join``). The gateway takes the host from the
  credential, never from the request, and accepts a report only about a VM placed on
  that host; the agent needs no write access to the log (docs/operations.md, "Host
  credentials").

Both return the log position their write reached (the agent waits for its own reports to
be in its view before it acts again) and raise the same errors: a refusal is a
DomainError (Rejected, NotFound, Forbidden), an unreachable writer UnavailableError.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol
from uuid import UUID

import aiohttp

from ucloud.commands.service import CommandService
from ucloud.commands.unit_of_work import Actor
from ucloud.domain import host as host_domain
from ucloud.domain import vm as vm_domain
from ucloud.domain.errors import Forbidden, InvalidValue, NotFound, Rejected
from ucloud.eventstore.errors import UnavailableError

EVACUATED_REASON = "its host was evacuated"


class HostWrites(Protocol):
    """What a host agent may write: only about itself and the VMs placed on it."""

    async def register(self, cores: int, ram: int, disk: int, hypervisor: str, stores: tuple[str, ...]) -> int: ...

    async def up(self, session: int, lease_ttl: float) -> int: ...

    async def evacuated(self, vm_ids: Sequence[UUID]) -> int: ...

    async def report(self, command: vm_domain.VmReport) -> int: ...

    async def close(self) -> None: ...


def host_actor(hostname: str) -> Actor:
    """Who a host agent is in the log (``host/<name>@ucloud-system``), either way it writes."""
    return Actor(f"host/{hostname}", "ucloud-system", is_admin=True)


class DirectWrites:
    """The command side in this process (``ucloud up``)."""

    def __init__(self, commands: CommandService, hostname: str) -> None:
        self.commands = commands
        self.hostname = hostname
        self.host_id = host_domain.host_id_for(hostname)
        self.actor = host_actor(hostname)

    async def register(self, cores: int, ram: int, disk: int, hypervisor: str, stores: tuple[str, ...]) -> int:
        outcome = await self.commands.register_host(self.actor, self.hostname, cores, ram, disk,
                                                    hypervisor=hypervisor, stores=stores)
        return outcome.position

    async def up(self, session: int, lease_ttl: float) -> int:
        return (await self.commands.mark_host_up(self.actor, self.host_id, session, lease_ttl)).position

    async def evacuated(self, vm_ids: Sequence[UUID]) -> int:
        outcome = await self.commands.evict(self.actor, self.host_id, list(vm_ids), EVACUATED_REASON, evacuated=True)
        return outcome.position

    async def report(self, command: vm_domain.VmReport) -> int:
        return (await self.commands.report(self.actor, command)).position

    async def close(self) -> None:
        pass


# The report kinds of the gateway's report route, by command type.
REPORT_KINDS: dict[type[vm_domain.VmReport], str] = {
    vm_domain.ReportStarted: "started", vm_domain.ReportStopped: "stopped", vm_domain.ReportRebooted: "rebooted",
    vm_domain.ReportCrashed: "crashed", vm_domain.ReportFailed: "failed", vm_domain.ReportDeleted: "deleted",
    vm_domain.ReportDiskResized: "disk_resized",
}


class CredentialError(ValueError):
    """The credential file cannot be used (missing, readable by others, not a credential)."""


def read_credential(path: Path) -> str:
    """A host credential from its file: owned by us and readable by nobody else (0600)."""
    try:
        info = path.stat()
        text = path.read_text().strip()
    except OSError as error:
        raise CredentialError(f"cannot read the host credential {path}: {error.strerror}") from None
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise CredentialError(f"the host credential {path} is readable by others "
                              f"(mode {stat.S_IMODE(info.st_mode):o}); chmod 600 it")
    if info.st_uid != os.geteuid():
        raise CredentialError(f"the host credential {path} belongs to another user")
    if host_domain.credential_host(text) is None:
        raise CredentialError(f"{path} holds no host credential (from 'ucloud host join')")
    return text


class GatewayWrites:
    """The gateway's host routes, authenticated by this host's credential."""

    def __init__(self, url: str, credential: str, *, timeout: float = 30.0) -> None:
        host_id = host_domain.credential_host(credential)
        if host_id is None:
            raise CredentialError("not a host credential (from 'ucloud host join')")
        self.url = url.rstrip("/")
        self.host_id = host_id
        self._headers = {"Authorization": f"Bearer {credential}"}
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._http: aiohttp.ClientSession | None = None

    async def _post(self, path: str, body: dict[str, Any]) -> int:
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        try:
            async with self._http.post(self.url + path, json=body) as response:
                text = await response.text()
                status = response.status
        except (TimeoutError, aiohttp.ClientError, OSError) as error:
            raise UnavailableError(f"the gateway at {self.url} cannot be reached: {error}") from error
        try:
            answer = json.loads(text) if text else {}
        except ValueError:
            answer = {}
        if status < 300:
            return int(answer.get("position", 0))
        detail = str(answer.get("detail") or text[:300] or f"HTTP {status}")
        field = answer.get("field")
        if status == 400:
            raise InvalidValue(str(field or "body"), detail)
        if status == 403:
            raise Forbidden(detail)
        if status == 404:
            raise NotFound(detail)
        if status in (409, 422):
            raise Rejected(detail, field)
        if status == 401:
            # Not retried as if the gateway were away: the credential must change.
            raise Forbidden(f"the gateway refused this host's credential: {detail}")
        raise UnavailableError(f"the gateway answered {status}: {detail}")

    async def register(self, cores: int, ram: int, disk: int, hypervisor: str, stores: tuple[str, ...]) -> int:
        return await self._post("/v1/host-agent/register", {"cores": cores, "ram": ram, "disk": disk,
                                                            "hypervisor": hypervisor, "stores": list(stores)})

    async def up(self, session: int, lease_ttl: float) -> int:
        return await self._post("/v1/host-agent/up", {"session": session, "lease_ttl": lease_ttl})

    async def evacuated(self, vm_ids: Sequence[UUID]) -> int:
        return await self._post("/v1/host-agent/evacuated", {"vms": [str(v) for v in vm_ids]})

    async def report(self, command: vm_domain.VmReport) -> int:
        body: dict[str, Any] = {"observed": REPORT_KINDS[type(command)]}
        for name in ("reason", "accelerator", "disk", "online"):
            if hasattr(command, name):
                body[name] = getattr(command, name)
        return await self._post(f"/v1/host-agent/vms/{command.vm_id}/reports", body)

    async def close(self) -> None:
        if self._http is not None:
            with contextlib.suppress(Exception):
                await self._http.close()
            self._http = None
