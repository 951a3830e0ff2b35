"""Metering: usage from VM lifecycle events at one-second resolution. Pure, no I/O.

A ``Meter`` folds, in log order, the VM events, the price book and the period closings,
each with its record time in whole epoch seconds (floor). It accumulates integer
quantity-seconds per (owner, period, VM, resource, price version):

- cores and RAM while the VM runs: from ``vm.started`` to ``vm.stopped``, ``vm.crashed``,
  ``vm.failed`` or ``vm.deleted``; each start is billed at least 60 s (a run shorter than
  that counts as [start, start + 60));
- disk for as long as the VM exists: from ``vm.requested`` to ``vm.deleted``;
- a network for as long as it is usable: from ``network.allocated`` to ``network.deleted``
  (one network per network; a network whose allocation failed costs nothing);
- image storage for as long as the image is in its store: from ``image.imported`` to
  ``image.deleted``, its stored size in bytes (a failed import costs nothing).

Invoice lines name what they meter by ``vm_id``/``vm_name``: the VM's, or the network's or
image's id and name for those resources.

An interval is split where a price changes (one line per price version) and where a
billing period ends. Quantity-seconds are exact integers and addition is associative,
so the totals do not depend on how the log was cut into batches, folded, snapshotted or
restored; the only rounding is per invoice line (``line_amount``).

Time only moves forward for billing: an event whose time lies before the end of the
last closed period counts from that end (its period is final).
"""

from __future__ import annotations

import calendar
import re
from datetime import UTC, datetime
from uuid import UUID

import msgspec

from . import image as image_domain
from . import network as network_domain
from . import vm as vm_domain
from .errors import InvalidValue
from .events import Event
from .invoice import InvoiceLine, PeriodClosed
from .money import div_round
from .pricing import QUANTUM, Price, PriceSet, Resource, Schedule, epoch_seconds

MINIMUM_RUN = 60  # seconds billed at least per start (as AWS and GCP do)
_CORE, _RAM, _DISK = Resource.CORE.value, Resource.RAM.value, Resource.DISK.value
_NETWORK, _IMAGE = Resource.NETWORK.value, Resource.IMAGE_STORAGE.value
# Every event type the meter folds (besides prices and period closings).
METERED_EVENTS: tuple[type[Event], ...] = (
    vm_domain.VmRequested, vm_domain.VmStarted, vm_domain.VmStopped, vm_domain.VmCrashed, vm_domain.VmFailed,
    vm_domain.VmDeleted, network_domain.NetworkRequested, network_domain.NetworkAllocated,
    network_domain.NetworkAllocationFailed, network_domain.NetworkDeleted, image_domain.ImageRequested,
    image_domain.ImageImported, image_domain.ImageImportFailed, image_domain.ImageDeleted)
_SIZES = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_PERIOD = re.compile(r"^\s*(\d+)\s*([smhd])\s*$")


class PeriodPolicy(msgspec.Struct, frozen=True):
    """Billing periods: calendar months (UTC) by default, or fixed lengths of ``seconds``
    aligned to the epoch (``1d``, ``3600s``)."""

    seconds: int = 0  # 0: calendar months

    @classmethod
    def parse(cls, text: str) -> PeriodPolicy:
        text = text.strip().lower()
        if text in ("month", "monthly", "1mo"):
            return cls()
        aliases = {"day": "1d", "daily": "1d", "hour": "1h", "hourly": "1h"}
        match = _PERIOD.match(aliases.get(text, text))
        if not match or int(match.group(1)) <= 0:
            raise InvalidValue("period", f"{text!r}: 'month' or a length like 1d, 12h, 3600s")
        return cls(seconds=int(match.group(1)) * _SIZES[match.group(2)])

    def bounds(self, t: int) -> tuple[int, int]:
        """[start, end) of the period holding second ``t``."""
        if self.seconds:
            start = t - t % self.seconds
            return start, start + self.seconds
        moment = datetime.fromtimestamp(t, UTC)
        start = calendar.timegm((moment.year, moment.month, 1, 0, 0, 0))
        year, month = (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
        return start, calendar.timegm((year, month, 1, 0, 0, 0))

    def describe(self) -> str:
        return "month" if not self.seconds else f"{self.seconds}s"


class VmMeter(msgspec.Struct, kw_only=True, gc=False):
    """What the meter knows of one VM. Mutable: the fold updates it in place."""

    id: UUID
    owner: str
    name: str
    cores: int
    ram: int
    disk: int
    disk_from: int  # disk charged up to here
    run_from: int = -1  # -1: not running; else run charged up to here
    run_until_at_least: int = 0  # the run's start + MINIMUM_RUN


class Holding(msgspec.Struct, kw_only=True, gc=False):
    """A network or an image that costs while it exists. Mutable: charged up to ``since``."""

    id: UUID
    owner: str
    name: str
    resource: str
    quantity: int  # networks: 1; images: stored bytes
    since: int


# (vm as an int, resource, price version) -> quantity-seconds. VMs are keyed by ``UUID.int``
# inside the fold: a UUID's __hash__ and __eq__ are Python code, an int's are not (the
# rebuild benchmark spends a third of its time hashing UUIDs otherwise).
Lines = dict[tuple[int, str, int], int]


def line_amount(price: Price, quantity_seconds: int) -> int:
    """Micros for ``quantity_seconds`` at ``price``: the one rounding (half away from zero)."""
    return div_round(quantity_seconds * price.micros, price.per_seconds * QUANTUM[price.resource])


class Meter:
    """The metering fold. ``apply(event, t)`` in log order; nothing else changes it."""

    def __init__(self, periods: PeriodPolicy | None = None) -> None:
        self.periods = periods or PeriodPolicy()
        self.schedule = Schedule()
        self.vms: dict[int, VmMeter] = {}
        self.names: dict[int, tuple[UUID, str]] = {}  # every VM ever seen, for invoice lines
        self.usage: dict[tuple[str, int], Lines] = {}  # (owner, period start) -> lines
        self.periods_of: dict[str, set[int]] = {}  # owner -> period starts with usage
        self.vms_of: dict[str, set[int]] = {}  # owner -> VMs that exist
        self.announced: dict[int, tuple[UUID, str, str]] = {}  # network/image requested: (id, owner, name)
        self.holdings: dict[int, Holding] = {}  # networks and images that cost now
        self.holdings_of: dict[str, set[int]] = {}
        self.closed_until = 0
        self.closed: list[tuple[int, int]] = []
        self._period = (0, 0)

    # -- the fold --------------------------------------------------------------------------

    def apply(self, event: Event, t: int) -> None:
        if t < self.closed_until:
            t = self.closed_until
        kind = type(event)
        # The hot cases first, by exact type (a match on classes is a chain of isinstance).
        if kind is vm_domain.VmStarted:
            meter = self.vms.get(event.vm_id.int)  # type: ignore[attr-defined]
            if meter is not None and meter.run_from < 0:
                meter.run_from = t
                meter.run_until_at_least = t + MINIMUM_RUN
            return
        if kind is vm_domain.VmStopped or kind is vm_domain.VmCrashed or kind is vm_domain.VmFailed:
            key = event.vm_id.int  # type: ignore[attr-defined]
            meter = self.vms.get(key)
            if meter is not None and meter.run_from >= 0:
                self._end_run(key, meter, t)
            return
        match event:
            case vm_domain.VmRequested():
                key = event.vm_id.int
                if key not in self.vms:
                    self.vms[key] = VmMeter(id=event.vm_id, owner=event.owner, name=event.name, cores=event.cores,
                                            ram=event.ram, disk=event.disk, disk_from=t)
                    self.names[key] = (event.vm_id, event.name)
                    self.vms_of.setdefault(event.owner, set()).add(key)
            case vm_domain.VmDeleted():
                key = event.vm_id.int
                meter = self.vms.pop(key, None)
                if meter is not None:
                    self.vms_of.get(meter.owner, set()).discard(key)
                    if meter.run_from >= 0:
                        self._end_run(key, meter, t)
                    self._charge(meter.owner, key, _DISK, meter.disk, meter.disk_from, t)
            case network_domain.NetworkRequested():
                self.announced[event.network_id.int] = (event.network_id, event.owner, event.name)
            case network_domain.NetworkAllocated():
                self._hold(event.network_id.int, _NETWORK, 1, t)
            case image_domain.ImageRequested():
                self.announced[event.image_id.int] = (event.image_id, event.owner, event.name)
            case image_domain.ImageImported():
                self._hold(event.image_id.int, _IMAGE, event.stored_size, t)
            case network_domain.NetworkAllocationFailed() | image_domain.ImageImportFailed():
                key = (event.network_id if isinstance(event, network_domain.NetworkAllocationFailed)
                       else event.image_id).int
                self.announced.pop(key, None)
            case network_domain.NetworkDeleted() | image_domain.ImageDeleted():
                key = (event.network_id if isinstance(event, network_domain.NetworkDeleted) else event.image_id).int
                self.announced.pop(key, None)
                held = self.holdings.pop(key, None)
                if held is not None:
                    self.holdings_of.get(held.owner, set()).discard(key)
                    self._charge(held.owner, key, held.resource, held.quantity, held.since, t)
            case PriceSet():
                self.schedule.add(Price(
                    version=self.schedule.count + 1, resource=event.resource, micros=event.micros,
                    currency=event.currency, per=event.per, per_seconds=event.per_seconds,
                    effective_from=epoch_seconds(event.effective_from)))
            case PeriodClosed():
                self.close(epoch_seconds(event.period_start), epoch_seconds(event.period_end))

    def _hold(self, key: int, resource: str, quantity: int, t: int) -> None:
        known = self.announced.pop(key, None)
        if known is None or key in self.holdings:
            return
        uuid, owner, name = known
        self.holdings[key] = Holding(id=uuid, owner=owner, name=name, resource=resource, quantity=quantity, since=t)
        self.holdings_of.setdefault(owner, set()).add(key)
        self.names[key] = (uuid, name)

    def _end_run(self, vm_id: int, meter: VmMeter, t: int) -> None:
        end = t if t > meter.run_until_at_least else meter.run_until_at_least
        self._charge(meter.owner, vm_id, _CORE, meter.cores, meter.run_from, end)
        self._charge(meter.owner, vm_id, _RAM, meter.ram, meter.run_from, end)
        meter.run_from = -1

    def _charge(self, owner: str, vm_id: int, resource: str, quantity: int, start: int, end: int,
                into: dict[tuple[str, int], Lines] | None = None) -> None:
        usage = self.usage if into is None else into
        while start < end:
            period_start, period_end = self._period
            if not period_start <= start < period_end:
                period_start, period_end = self._period = self.periods.bounds(start)
            upto = end if end < period_end else period_end
            lines = usage.get((owner, period_start))
            if lines is None:
                lines = usage[(owner, period_start)] = {}
                if into is None:
                    self.periods_of.setdefault(owner, set()).add(period_start)
            latest = self.schedule.latest(resource, start)
            if latest:  # one price covers it all (the common case): no segments to walk
                key = (vm_id, resource, latest)
                lines[key] = lines.get(key, 0) + quantity * (upto - start)
            else:
                for version, a, b in self.schedule.segments(resource, start, upto):
                    key = (vm_id, resource, version)
                    lines[key] = lines.get(key, 0) + quantity * (b - a)
            start = upto

    def close(self, start: int, end: int) -> None:
        """Cut everything still running or existing at ``end``; later events count from there."""
        if end <= self.closed_until:
            return
        for vm_id, meter in self.vms.items():
            if 0 <= meter.run_from < end:
                self._charge(meter.owner, vm_id, _CORE, meter.cores, meter.run_from, end)
                self._charge(meter.owner, vm_id, _RAM, meter.ram, meter.run_from, end)
                meter.run_from = end
            if meter.disk_from < end:
                self._charge(meter.owner, vm_id, _DISK, meter.disk, meter.disk_from, end)
                meter.disk_from = end
        for key, held in self.holdings.items():
            if held.since < end:
                self._charge(held.owner, key, held.resource, held.quantity, held.since, end)
                held.since = end
        self.closed_until = end
        self.closed.append((start, end))

    # -- questions -------------------------------------------------------------------------

    def lines(self, owner: str, period_start: int, now: int | None = None) -> list[InvoiceLine]:
        """An owner's lines in a period; with ``now``, what runs or exists is counted up to
        ``now`` as well (usage so far: the 60 s minimum included), without changing the fold."""
        return self.to_lines(self.usage_of(owner, now).get(period_start, {}))

    def usage_of(self, owner: str, now: int | None = None) -> dict[int, Lines]:
        """An owner's quantity-seconds by period start; with ``now`` including what is open."""
        result = {start: dict(self.usage[(owner, start)]) for start in self.periods_of.get(owner, ())}
        if now is None:
            return result
        extra: dict[tuple[str, int], Lines] = {}
        for vm_id in self.vms_of.get(owner, ()):
            meter = self.vms[vm_id]
            if meter.run_from >= 0:
                end = max(now, meter.run_until_at_least)
                self._charge(owner, vm_id, _CORE, meter.cores, meter.run_from, end, extra)
                self._charge(owner, vm_id, _RAM, meter.ram, meter.run_from, end, extra)
            self._charge(owner, vm_id, _DISK, meter.disk, meter.disk_from, max(now, meter.disk_from), extra)
        for held_key in self.holdings_of.get(owner, ()):
            held = self.holdings[held_key]
            self._charge(owner, held_key, held.resource, held.quantity, held.since, max(now, held.since), extra)
        for (_, start), lines in extra.items():
            merged = result.setdefault(start, {})
            for key, value in lines.items():
                merged[key] = merged.get(key, 0) + value
        return result

    def to_lines(self, usage: Lines) -> list[InvoiceLine]:
        result = []
        for (vm_id, resource, version), quantity_seconds in usage.items():
            if quantity_seconds == 0:
                continue
            price = self.schedule.price(version)
            uuid, name = self.names[vm_id]
            result.append(InvoiceLine(
                vm_id=uuid, vm_name=name, resource=resource, price_version=version,
                quantity_seconds=quantity_seconds, micros=price.micros, per=price.per,
                per_seconds=price.per_seconds, quantum=QUANTUM[resource], amount=line_amount(price, quantity_seconds)))
        return sorted(result, key=lambda line: (line.vm_name, str(line.vm_id), line.resource, line.price_version))

    def running(self, owner: str) -> list[UUID]:
        """The owner's VMs that run now, as far as the log says."""
        return sorted(self.vms[v].id for v in self.vms_of.get(owner, ()) if self.vms[v].run_from >= 0)

    def owners_in(self, period_start: int) -> list[str]:
        return sorted(owner for owner, starts in self.periods_of.items() if period_start in starts)

    # -- snapshots -------------------------------------------------------------------------

    def dump(self) -> MeterSnapshot:
        return MeterSnapshot(
            periods=self.periods.seconds, prices=self.schedule.all(), vms=list(self.vms.values()),
            names={uuid: name for uuid, name in self.names.values()}, closed=list(self.closed),
            closed_until=self.closed_until, holdings=list(self.holdings.values()),
            announced=list(self.announced.values()),
            usage=[(owner, start, [(self.names[v][0], r, ver, q) for (v, r, ver), q in lines.items()])
                   for (owner, start), lines in self.usage.items()])

    @classmethod
    def load(cls, snapshot: MeterSnapshot) -> Meter:
        meter = cls(PeriodPolicy(seconds=snapshot.periods))
        meter.schedule = Schedule.load(snapshot.prices)
        meter.vms = {vm.id.int: vm for vm in snapshot.vms}
        for key, vm in meter.vms.items():
            meter.vms_of.setdefault(vm.owner, set()).add(key)
        meter.names = {uuid.int: (uuid, name) for uuid, name in snapshot.names.items()}
        meter.usage = {(owner, start): {(v.int, r, ver): q for v, r, ver, q in lines}
                       for owner, start, lines in snapshot.usage}
        for owner, start in meter.usage:
            meter.periods_of.setdefault(owner, set()).add(start)
        meter.holdings = {held.id.int: held for held in snapshot.holdings}
        for key, held in meter.holdings.items():
            meter.holdings_of.setdefault(held.owner, set()).add(key)
        meter.announced = {uuid.int: (uuid, owner, name) for uuid, owner, name in snapshot.announced}
        meter.closed = list(snapshot.closed)
        meter.closed_until = snapshot.closed_until
        return meter


class MeterSnapshot(msgspec.Struct, kw_only=True):
    """The meter's whole state, for snapshots (msgpack or JSON)."""

    periods: int
    prices: list[Price]
    vms: list[VmMeter]
    names: dict[UUID, str]
    usage: list[tuple[str, int, list[tuple[UUID, str, int, int]]]]
    closed: list[tuple[int, int]]
    closed_until: int
    holdings: list[Holding] = []  # networks and images that cost now (older snapshots had none)
    announced: list[tuple[UUID, str, str]] = []


def totals(meter: Meter) -> dict[tuple[str, int, UUID, str, int], int]:
    """Every quantity-second the meter holds, flat: for comparing two folds."""
    return {(owner, start, meter.names[vm][0], r, v): q for (owner, start), lines in meter.usage.items()
            for (vm, r, v), q in lines.items() if q}
