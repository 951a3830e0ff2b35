"""The billing process manager: closes billing periods and issues numbered invoices.

Its decisions are a pure function of its view (projections.billing.BillingView) and the
clock: ``decide(view, now, settings)``. Every decision is appended at the version of the
stream it extends (``billing-periods``, ``invoices``) as the view saw it, so a stale or
second instance loses with a conflict, folds what the winner wrote, and decides again:
periods are closed once, invoices are numbered gap-free and issued once per owner and
period, with no tracking position needed.

It runs on the shared process-manager framework (processes/framework.py): a leader
lease, its view restored from its own snapshot, the log followed from there. Each run of
events is folded into the view and decided on (without the prepaid sweep); every
``tick`` seconds the clock is looked at too (periods to close, prepaid balances), so a
quiet log still closes its periods. What the process appends comes back to it through
the log like any other event; a decision taken again before that is refused by the
stream version it was taken at and costs nothing.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from ucloud.commands.billing import BillingCommands
from ucloud.commands.service import CommandService
from ucloud.commands.unit_of_work import Actor
from ucloud.domain import vm as vm_domain
from ucloud.domain.account import (
    AccountDepleted,
    AccountResumed,
    AccountSuspended,
    InvoiceReminded,
    Kind,
)
from ucloud.domain.catalogue import build_codec
from ucloud.domain.errors import DomainError
from ucloud.domain.invoice import InvoiceIssued, PeriodClosed, reference_for
from ucloud.domain.metering import PeriodPolicy
from ucloud.domain.order import Order
from ucloud.eventstore.errors import ConflictError
from ucloud.eventstore.interface import EventStore
from ucloud.eventstore.records import EventRecord
from ucloud.projections.billing import BILLING_TAGS, BillingView, periods_from_environment
from ucloud.projections.runner import ProjectionRunner

from .framework import ProcessManager

log = logging.getLogger(__name__)
BILLING_ACTOR = Actor("billing", "ucloud-system", is_admin=True)


@dataclass(frozen=True)
class BillingSettings:
    periods: PeriodPolicy = field(default_factory=periods_from_environment)
    close_delay: int = 60  # seconds after a period's end before it is closed (events in flight)
    chunk: int = 50  # invoices per append (two etcd operations each, under --max-txn-ops)
    tick: float = 5.0  # how often the clock is looked at when the log is quiet
    # Seconds a prepaid account may stay at zero before its VMs stop (UCLOUD_PREPAID_GRACE_SECONDS).
    grace: int = field(default_factory=lambda: int(os.environ.get("UCLOUD_PREPAID_GRACE_SECONDS", "3600")))
    # Dunning: an invoice falls due this long after its period ends (UCLOUD_INVOICE_DUE_DAYS, 30);
    # unpaid, it is reminded at the due date and every ``remind_every`` after, ``reminders`` times.
    due_after: int = field(default_factory=lambda: 86400 * int(os.environ.get("UCLOUD_INVOICE_DUE_DAYS", "30")))
    remind_every: int = 14 * 86400
    reminders: int = 3


@dataclass(frozen=True)
class ClosePeriod:
    event: PeriodClosed
    expected_version: int


@dataclass(frozen=True)
class IssueInvoices:
    events: tuple[InvoiceIssued, ...]
    expected_version: int


@dataclass(frozen=True)
class AccountChange:
    """Append to an account stream at the version the view saw."""

    owner: str
    events: tuple[AccountDepleted | AccountSuspended | AccountResumed | InvoiceReminded, ...]
    expected_version: int


@dataclass(frozen=True)
class StopVms:
    vm_ids: tuple[UUID, ...]


@dataclass(frozen=True)
class StartVms:
    vm_ids: tuple[UUID, ...]


@dataclass(frozen=True)
class Provision:
    """Create the VM a confirmed order asked for (retry-safe: keyed by the order)."""

    order: Order


Decision = ClosePeriod | IssueInvoices | AccountChange | StopVms | StartVms | Provision


def _at(t: int) -> datetime:
    return datetime.fromtimestamp(t, UTC)


def decide(view: BillingView, now: int, settings: BillingSettings, *, prepaid: bool = True) -> list[Decision]:
    """What to append next, on ``view`` at ``now`` (epoch seconds). Pure. ``prepaid``: also
    look at prepaid balances (a loop over every prepaid account; the loop asks at most once
    per tick)."""
    decisions: list[Decision] = []
    periods = view.meter.periods
    if view.meter.closed_until:
        start = view.meter.closed_until
    elif view.first_time is not None:
        start = periods.bounds(view.first_time)[0]
    else:
        start = None
    if start is not None:
        end = periods.bounds(start)[1]
        if end + settings.close_delay <= now:
            decisions.append(ClosePeriod(PeriodClosed(period_start=_at(start), period_end=_at(end)),
                                         view.periods_version))
    if view.pending:
        invoices: list[InvoiceIssued] = []
        number = view.invoices_version
        for (owner, period_start), period_end in sorted(view.pending.items(), key=lambda i: (i[0][1], i[0][0])):
            lines = tuple(view.meter.lines(owner, period_start))
            if not lines:
                continue
            number += 1
            invoices.append(InvoiceIssued(
                number=number, owner=owner, period_start=_at(period_start), period_end=_at(period_end),
                currency=view.currency, lines=lines, total=sum(line.amount for line in lines),
                reference=reference_for(number)))
            if len(invoices) == settings.chunk:
                break
        if invoices:
            decisions.append(IssueInvoices(tuple(invoices), view.invoices_version))
    decisions += [Provision(order) for order in view.confirmed_orders()]
    if prepaid:
        decisions += _prepaid(view, now, settings)
        decisions += _dunning(view, now, settings)
    return decisions


def _dunning(view: BillingView, now: int, settings: BillingSettings) -> list[Decision]:
    """Unpaid invoices past their due date: one ``invoice.reminded`` per level reached
    (level 1 at the due date, one more every ``remind_every``, at most ``reminders``),
    the highest level reached only, so a long outage does not send a burst."""
    decisions: list[Decision] = []
    for owner, numbers in view.by_owner.items():
        reminders: list[InvoiceReminded] = []
        for number in numbers:
            invoice = view.invoices[number]
            due = int(invoice.period_end.timestamp()) + settings.due_after
            if now < due:
                continue
            level = min(settings.reminders, 1 + (now - due) // settings.remind_every)
            if level <= view.reminder_level(invoice):
                continue
            left = view.left_to_pay(invoice)
            if left:
                reminders.append(InvoiceReminded(owner=owner, number=number, level=level, due=_at(due),
                                                 due_micros=left))
        if reminders:
            row = view.accounts.get(owner)
            decisions.append(AccountChange(owner, tuple(reminders), row.version if row is not None else 0))
    return decisions


def _prepaid(view: BillingView, now: int, settings: BillingSettings) -> list[Decision]:
    """Prepaid accounts at zero: told (depleted), then after the grace period their running
    VMs are stopped (never deleted) with the reason; a top-up starts them again. While
    suspended, a VM started anyway is stopped again."""
    decisions: list[Decision] = []
    for owner, row in view.accounts.items():
        waiting = row.depleted_at is not None or row.suspended is not None
        if row.kind is not Kind.PREPAID:
            if waiting:  # made postpaid meanwhile: nothing to wait for
                decisions += [AccountChange(owner, (AccountResumed(owner=owner, vm_ids=tuple(row.suspended or ())),),
                                            row.version), StartVms(tuple(row.suspended or ()))]
            continue
        balance = view.balance(owner, now).balance
        if balance > 0:
            if waiting:
                decisions += [AccountChange(owner, (AccountResumed(owner=owner, vm_ids=tuple(row.suspended or ())),),
                                            row.version), StartVms(tuple(row.suspended or ()))]
            continue
        running = tuple(view.meter.running(owner))
        if row.suspended is not None:
            if running:
                decisions.append(StopVms(running))
        elif row.depleted_at is None:
            decisions.append(AccountChange(owner, (AccountDepleted(owner=owner, at=_at(now),
                                                                   grace_seconds=settings.grace),), row.version))
        elif now >= row.depleted_at + row.grace_seconds:
            reason = (f"stopped: the prepaid balance of {owner} has been at zero since "
                      f"{_at(row.depleted_at).isoformat()}; top up to start the VMs again")
            decisions += [AccountChange(owner, (AccountSuspended(owner=owner, reason=reason, vm_ids=running),),
                                        row.version), StopVms(running)]
    return decisions


class BillingProcess(ProcessManager):
    """The billing view and ``decide`` as a process manager (``ProcessRunner`` runs it);
    ``step``/``run_until_idle`` drive the same view and decisions by hand (tests,
    benchmarks, a one-off close)."""

    name = "billing"
    snapshot_schema = 2  # 2: its view dumps one msgpack blob
    interested_in = BILLING_TAGS

    def __init__(self, store: EventStore, settings: BillingSettings | None = None,
                 clock: Callable[[], float] = time.time, actor: Actor = BILLING_ACTOR) -> None:
        self.store = store
        self.settings = settings or BillingSettings()
        self.tick_interval = self.settings.tick
        self.clock = clock
        self.actor = actor
        self.codec = build_codec()
        self.commands = BillingCommands(store, self.codec)
        self.vms = CommandService(store, self.codec)
        self.view = BillingView(self.settings.periods)
        # Folds records into the view (the projections' decoder routing); its position is the view's.
        self.folder = ProjectionRunner(store, self.codec, [self.view], name="billing-process")

    # -- on the framework ----------------------------------------------------------------

    async def handle_run(self, records: list[EventRecord]) -> None:
        for record in records:
            if record.position > self.folder.position:  # a step() by hand may have folded it
                self.folder.apply(record)
        await self._act(prepaid=False)

    async def tick(self) -> None:
        await self._act(prepaid=True)

    def dump(self) -> Any:
        return {"position": self.folder.position, "view": self.view.dump()}

    def load(self, data: Any) -> None:
        self.view.load(data["view"])
        self.folder.position = int(data["position"])

    # -- by hand -----------------------------------------------------------------------------

    async def step(self, prepaid: bool = True) -> int:
        """Catch up, decide once, append; the number of decisions appended."""
        await self.folder.catch_up()
        return await self._act(prepaid)

    async def _act(self, prepaid: bool) -> int:
        """Decide on the view as it is, append; the number of decisions appended."""
        appended = 0
        for decision in decide(self.view, int(self.clock()), self.settings, prepaid=prepaid):
            try:
                match decision:
                    case ClosePeriod():
                        await self.commands.close_period(self.actor, decision.event, decision.expected_version)
                    case IssueInvoices():
                        await self.commands.issue_invoices(self.actor, decision.events, decision.expected_version)
                    case AccountChange():
                        await self.commands.account_events(self.actor, decision.owner, decision.events,
                                                           decision.expected_version)
                    case Provision():
                        await self._provision(decision.order)
                    case StopVms() | StartVms():
                        await self._vms(decision)
                        continue  # idempotent commands: not progress by themselves
                appended += 1
            except ConflictError:
                log.info("billing: another writer was first; deciding again on fresh state")
                break
        return appended

    async def _provision(self, order: Order) -> None:
        """The ordering step: a confirmed order becomes the VM (``create_vm`` with the order as
        its idempotency key, so a retry after a crash gives the same VM); a refusal cancels
        the order with the reason (nothing was charged: nothing to refund)."""
        spec = order.quote
        try:
            created = await self.vms.create_vm(
                Actor(order.owner), name=spec.name, cores=spec.cores, ram=spec.ram, disk=spec.disk, image=spec.image,
                ssh_keys=spec.ssh_keys, restart_policy=spec.restart_policy, idempotency_key=f"order-{order.id}",
                user_data=spec.user_data)
        except DomainError as refused:
            await self.commands.order_outcome(self.actor, order.id, None, f"provisioning failed: {refused}")
            return
        await self.commands.order_outcome(self.actor, order.id, created.result)

    async def _vms(self, decision: StopVms | StartVms) -> None:
        for vm_id in decision.vm_ids:
            command = vm_domain.StopVm(vm_id=vm_id) if isinstance(decision, StopVms) else vm_domain.StartVm(vm_id=vm_id)
            try:
                await self.vms.vm_command(self.actor, command)
            except DomainError as refused:  # deleted meanwhile, or not in a state to start
                log.info("billing: %s of VM %s refused: %s", type(command).__name__, vm_id, refused)

    async def run_until_idle(self) -> None:
        """Step until nothing is left to decide (tests, ``ucloud billing close``)."""
        while await self.step():
            pass
