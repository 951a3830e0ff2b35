"""The billing read model: prices, metered usage, accounts, invoices, balances.

One view folds everything billing needs, in log order: the metering fold
(domain.metering.Meter) over VM lifecycle events, prices and period closings; accounts
and credits; issued invoices. The gateway answers from it and the billing process
decides on it, so both always agree with a rebuild from the log.
"""

from __future__ import annotations

import os
from typing import Any
from uuid import UUID

import msgspec

from ucloud.domain import account as account_domain
from ucloud.domain import order as order_domain
from ucloud.domain.events import Event, tag_of
from ucloud.domain.invoice import InvoiceIssued, InvoiceLine, PeriodClosed
from ucloud.domain.metering import METERED_EVENTS, Meter, MeterSnapshot, PeriodPolicy
from ucloud.domain.pricing import PriceSet
from ucloud.eventstore.records import EventRecord

from .runner import Projection

_METERED = METERED_EVENTS
_FOLDED: tuple[type[Event], ...] = (
    *_METERED, PriceSet, PeriodClosed, InvoiceIssued, account_domain.AccountConfigured,
    account_domain.AccountCredited, account_domain.AccountDepleted, account_domain.AccountSuspended,
    account_domain.AccountResumed, account_domain.InvoiceReminded, *order_domain.ORDER_EVENT_TYPES)
BILLING_TAGS = frozenset(tag_of(t) for t in _FOLDED)
_ACCOUNT_EVENTS = (account_domain.AccountConfigured, account_domain.AccountCredited, account_domain.AccountDepleted,
                   account_domain.AccountSuspended, account_domain.AccountResumed, account_domain.InvoiceReminded)


def periods_from_environment() -> PeriodPolicy:
    """UCLOUD_BILLING_PERIOD (``month`` by default, or ``1d``, ``12h``, ``3600s``): the gateway
    and the billing process must agree on it, and it must change only at a period's end."""
    return PeriodPolicy.parse(os.environ.get("UCLOUD_BILLING_PERIOD", "month"))


class Credit(msgspec.Struct, frozen=True, kw_only=True):
    time: int
    micros: int
    currency: str
    source: str
    reference: str


class AccountRow(msgspec.Struct, kw_only=True):
    owner: str
    kind: account_domain.Kind = account_domain.Kind.POSTPAID
    credited: int = 0
    invoiced: int = 0
    credits: list[Credit] = msgspec.field(default_factory=list)
    version: int = 0  # of the account stream
    depleted_at: int | None = None  # prepaid, at zero since (epoch seconds)
    grace_seconds: int = 0
    suspended: list[UUID] | None = None  # the VMs stopped for a zero balance
    reason: str = ""
    reminded: dict[int, int] = msgspec.field(default_factory=dict)  # invoice number -> dunning level


class Balance(msgspec.Struct, frozen=True, kw_only=True):
    owner: str
    kind: str
    currency: str
    credited: int  # micros, all money in
    invoiced: int  # micros, all invoices issued
    unbilled: int  # micros, usage not yet invoiced (up to now)
    balance: int  # credited - invoiced - unbilled
    suspended: bool = False
    reason: str = ""


class BillingState(msgspec.Struct, kw_only=True):
    meter: MeterSnapshot
    accounts: list[AccountRow]
    invoices: list[InvoiceIssued]
    invoices_version: int
    periods_version: int
    first_time: int | None
    pending: list[tuple[str, int, int]]
    orders: list[tuple[order_domain.Order, int]] = []


_ENCODE = msgspec.msgpack.Encoder().encode
_STATE = msgspec.msgpack.Decoder(BillingState)


class BillingView(Projection):
    name = "billing"
    handles = BILLING_TAGS
    snapshot_schema = 2  # 2: one msgpack blob (1: plain values)

    def __init__(self, periods: PeriodPolicy | None = None) -> None:
        self.meter = Meter(periods)
        self.accounts: dict[str, AccountRow] = {}
        self.invoices: dict[int, InvoiceIssued] = {}
        self.by_owner: dict[str, list[int]] = {}
        self.invoiced: set[tuple[str, int]] = set()  # (owner, period start)
        self.pending: dict[tuple[str, int], int] = {}  # closed, not invoiced: (owner, start) -> end
        self.invoices_version = 0
        self.periods_version = 0
        self.first_time: int | None = None  # the first metered second: periods count from its period
        self.orders: dict[UUID, tuple[order_domain.Order, int]] = {}  # order -> (state, stream version)

    def apply(self, record: EventRecord, event: Event) -> None:
        t = int(record.time.timestamp())
        if isinstance(event, _METERED):
            if self.first_time is None:
                self.first_time = t
            self.meter.apply(event, t)
        elif isinstance(event, PriceSet):
            self.meter.apply(event, t)
        elif isinstance(event, PeriodClosed):
            self.meter.apply(event, t)
            self.periods_version = record.version
            end = int(event.period_end.timestamp())
            for owner, starts in self.meter.periods_of.items():
                for start in starts:
                    if start < end and (owner, start) not in self.invoiced:
                        self.pending[(owner, start)] = self.meter.periods.bounds(start)[1]
        elif isinstance(event, InvoiceIssued):
            self.invoices[event.number] = event
            self.by_owner.setdefault(event.owner, []).append(event.number)
            start = int(event.period_start.timestamp())
            self.invoiced.add((event.owner, start))
            self.pending.pop((event.owner, start), None)
            self.account(event.owner).invoiced += event.total
            self.invoices_version = record.version
        elif isinstance(event, order_domain.ORDER_EVENT_TYPES):
            order_id: UUID = event.order_id  # type: ignore[attr-defined]
            known = self.orders.get(order_id)
            order = order_domain.evolve(known[0] if known else None, event)
            if order is not None:
                self.orders[order_id] = (order, record.version)
        elif isinstance(event, _ACCOUNT_EVENTS):
            self._account_event(event, t).version = record.version

    def _account_event(self, event: Event, t: int) -> AccountRow:
        match event:
            case account_domain.AccountConfigured():
                row = self.account(event.owner)
                row.kind = event.kind
            case account_domain.AccountCredited():
                row = self.account(event.owner)
                row.credited += event.micros
                row.credits.append(Credit(time=t, micros=event.micros, currency=event.currency,
                                          source=event.source.value, reference=event.reference))
            case account_domain.AccountDepleted():
                row = self.account(event.owner)
                row.depleted_at, row.grace_seconds = int(event.at.timestamp()), event.grace_seconds
                row.reason = (f"the prepaid balance reached zero at {event.at.isoformat()}; VMs stop "
                              f"{event.grace_seconds} s later unless the account is topped up")
            case account_domain.AccountSuspended():
                row = self.account(event.owner)
                row.suspended, row.reason = list(event.vm_ids), event.reason
            case account_domain.AccountResumed():
                row = self.account(event.owner)
                row.depleted_at, row.suspended, row.reason = None, None, ""
            case account_domain.InvoiceReminded():
                row = self.account(event.owner)
                row.reminded[event.number] = event.level
            case _:
                raise TypeError(f"not an account event: {event!r}")
        return row

    def confirmed_orders(self) -> list[order_domain.Order]:
        return [o for o, _ in self.orders.values() if o.status is order_domain.OrderStatus.CONFIRMED]

    def account(self, owner: str) -> AccountRow:
        row = self.accounts.get(owner)
        if row is None:
            row = self.accounts[owner] = AccountRow(owner=owner)
        return row

    # -- questions ----------------------------------------------------------------------------

    @property
    def currency(self) -> str:
        return self.meter.schedule.currency or ""

    def unbilled(self, owner: str, now: int) -> int:
        total = 0
        for start, usage in self.meter.usage_of(owner, now).items():
            if (owner, start) not in self.invoiced:
                total += sum(line.amount for line in self.meter.to_lines(usage))
        return total

    def balance(self, owner: str, now: int) -> Balance:
        row = self.accounts.get(owner) or AccountRow(owner=owner)
        unbilled = self.unbilled(owner, now)
        return Balance(owner=owner, kind=row.kind.value, currency=self.currency, credited=row.credited,
                       invoiced=row.invoiced, unbilled=unbilled, balance=row.credited - row.invoiced - unbilled,
                       suspended=row.suspended is not None, reason=row.reason)

    def usage(self, owner: str, now: int) -> tuple[int, int, list[InvoiceLine]]:
        """(period start, period end, lines) of the period ``now`` is in, so far."""
        start, end = self.meter.periods.bounds(max(now, self.meter.closed_until))
        return start, end, self.meter.lines(owner, start, now)

    def invoices_of(self, owner: str | None) -> list[InvoiceIssued]:
        numbers = sorted(self.invoices) if owner is None else self.by_owner.get(owner, [])
        return [self.invoices[n] for n in numbers]

    def paid(self, invoice: InvoiceIssued) -> bool:
        """Invoices are settled oldest first from the account's credits."""
        return self.left_to_pay(invoice) == 0

    def left_to_pay(self, invoice: InvoiceIssued) -> int:
        """Micros still owed on ``invoice`` once the credits went to it and those before it."""
        row = self.accounts.get(invoice.owner)
        credited = row.credited if row is not None else 0
        owed = sum(self.invoices[n].total for n in self.by_owner.get(invoice.owner, []) if n <= invoice.number)
        return min(invoice.total, max(0, owed - credited))

    def reminder_level(self, invoice: InvoiceIssued) -> int:
        row = self.accounts.get(invoice.owner)
        return row.reminded.get(invoice.number, 0) if row is not None else 0

    # -- snapshots ----------------------------------------------------------------------------

    def dump(self) -> Any:
        """One msgpack blob, read back by a typed decoder (see VmsView.dump)."""
        return _ENCODE(BillingState(
            meter=self.meter.dump(), accounts=list(self.accounts.values()), invoices=list(self.invoices.values()),
            invoices_version=self.invoices_version, periods_version=self.periods_version,
            first_time=self.first_time, pending=[(o, s, e) for (o, s), e in self.pending.items()],
            orders=list(self.orders.values())))

    def load(self, data: Any) -> None:
        """From ``dump``'s blob, or from plain values (schema 1)."""
        state = _STATE.decode(data) if isinstance(data, bytes) else msgspec.convert(data, BillingState)
        self.__init__(PeriodPolicy(seconds=state.meter.periods))  # type: ignore[misc]
        self.meter = Meter.load(state.meter)
        self.accounts = {row.owner: row for row in state.accounts}
        for invoice in state.invoices:
            self.invoices[invoice.number] = invoice
            self.by_owner.setdefault(invoice.owner, []).append(invoice.number)
            self.invoiced.add((invoice.owner, int(invoice.period_start.timestamp())))
        self.invoices_version = state.invoices_version
        self.periods_version = state.periods_version
        self.first_time = state.first_time
        self.pending = {(o, s): e for o, s, e in state.pending}
        self.orders = {order.id: (order, version) for order, version in state.orders}
