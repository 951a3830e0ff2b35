"""The host-failure detector: declares a host dead when its heartbeat lease is gone.

Every host agent holds a lease ``host-<id>`` (eventstore/leases.py) and records each
life of it as ``host.up`` with the lease's id as its session. The detector follows the
hosts in the log and, every ``tick_interval``, asks which host leases are alive. A host
the log says is up whose lease has been gone for ``declare_after`` seconds is declared
dead (``host.declared_dead``, naming the session and the evidence); the scheduler then
moves its VMs elsewhere. The declaration is appended at the host stream's version, so a
host that came back meanwhile (a newer ``host.up``) refutes it: exactly one of the two
wins, never both.

Order of deadlines (docs/operations.md, "Fencing"): the agent's own fence deadline is
before its lease can expire in the store, and the detector only sees the lease gone
after it expired: so a host's guests are dead before the detector declares anything.
A detector that just took over waits one lease TTL of a host before declaring it: it
cannot know how long that lease has been gone, and a restarted agent resumes its lease.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast
from uuid import UUID

from ucloud.commands.aggregates import HOST
from ucloud.commands.service import CommandService
from ucloud.commands.unit_of_work import Actor, Loaded
from ucloud.domain import host as host_domain
from ucloud.domain.errors import DomainError
from ucloud.domain.events import tag_of
from ucloud.eventstore.errors import ConflictError, EventStoreError
from ucloud.eventstore.leases import Leases
from ucloud.eventstore.records import EventRecord
from ucloud.projections.views import HostsView

from .framework import ProcessManager, ProcessRunner

log = logging.getLogger(__name__)

_HOST_EVENTS = frozenset(tag_of(t) for t in host_domain.HOST_EVENT_TYPES)


@dataclass(frozen=True)
class Verdict:
    host_id: UUID
    session: int
    evidence: str


def verdicts(hosts: Iterable[host_domain.Host], alive: Mapping[str, str], missing_since: dict[UUID, float],
             now: float, *, declare_after: float, leading_since: float) -> list[Verdict]:
    """Pure: which up hosts to declare dead now. ``missing_since`` (updated in place)
    remembers when each host's lease was first seen gone; a host seen alive is forgotten."""
    found = []
    for host in hosts:
        if host.status is not host_domain.HostStatus.UP or host_domain.slice_name(host.id) in alive:
            missing_since.pop(host.id, None)
            continue
        since = missing_since.setdefault(host.id, now)
        gone = now - since
        if gone < declare_after or now - leading_since < host.lease_ttl:
            continue  # suspect: not yet
        found.append(Verdict(host.id, host.session,
                             f"the heartbeat lease of session {host.session} (TTL {host.lease_ttl:g}s) "
                             f"was gone for {gone:.1f}s"))
    return found


class FailureDetector(ProcessManager):
    name = "failure-detector"
    interested_in = _HOST_EVENTS
    snapshot_schema = 2  # 2: its hosts view dumps msgpack blobs

    def __init__(self, commands: CommandService, leases: Leases, *, instance: str = "",
                 declare_after: float = 0.25, tick_interval: float = 0.1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.commands = commands
        self.leases = leases
        self.instance = instance or "detector"
        self.declare_after = declare_after
        self.tick_interval = tick_interval
        self.clock = clock
        self.actor = Actor(f"failure-detector-{self.instance}", "ucloud-system", is_admin=True)
        self.hosts = HostsView()
        self.missing_since: dict[UUID, float] = {}
        self.leading_since: float | None = None
        self.declared = 0
        self.refuted = 0  # declarations the host's comeback refused
        self.suspects = 0

    async def run(self) -> None:
        """Without election (tests, one process); `ucloud processes` elects a leader."""
        await ProcessRunner(self, self.commands.store, instance=self.instance).run()

    def on_lead(self) -> None:
        self.leading_since = None  # a new leader does not know how long a lease was gone
        self.missing_since.clear()

    async def handle_run(self, records: list[EventRecord]) -> None:
        codec = self.commands.codec
        for record in records:
            event = codec.decode(record.type, record.schema, record.data)
            if record.version > self.hosts.versions.get(cast(host_domain.HostEvent, event).host_id, 0):
                self.hosts.apply(record, event)
        self.tracked = max(self.tracked, records[-1].position)  # it acts on time, not on events

    async def tick(self) -> None:
        now = self.clock()
        if self.leading_since is None:
            self.leading_since = now
        try:
            alive = await self.leases.holders("host-")
        except EventStoreError as error:
            log.info("cannot read host leases now (%s); no verdict this time", error)
            return
        found = verdicts(self.hosts.by_id.values(), alive, self.missing_since, now,
                         declare_after=self.declare_after, leading_since=self.leading_since)
        self.suspects = len(self.missing_since)
        for verdict in found:
            await self._declare(verdict)

    async def _declare(self, verdict: Verdict) -> None:
        host = self.hosts.by_id[verdict.host_id]
        stream = host_domain.stream_name(verdict.host_id)
        known = {stream: Loaded(host, self.hosts.versions.get(verdict.host_id, 0), 0)}
        try:
            outcome = await self.commands.declare_host_dead(self.actor, verdict.host_id, verdict.session,
                                                            verdict.evidence, known=known)
        except (DomainError, ConflictError) as error:
            self.refuted += 1
            log.info("host %s not declared dead: %s", host.hostname, error)
            await self._refresh(verdict.host_id)
            return
        if outcome.events:
            self.declared += 1
            log.warning("declared host %s dead: %s", host.hostname, verdict.evidence)
        await self._refresh(verdict.host_id)

    async def _refresh(self, host_id: UUID) -> None:
        loaded = await self.commands.repository.load(HOST, host_domain.stream_name(host_id))
        if loaded.state is not None:
            self.hosts.by_id[host_id] = loaded.state
            self.hosts.versions[host_id] = loaded.version
        self.missing_since.pop(host_id, None)

    def dump(self) -> Any:
        return self.hosts.dump()

    def load(self, data: Any) -> None:
        self.hosts.load(data)
