"""Prepaid accounts on the real command side and log (SQLite and etcd): at zero balance the
account is told, after the grace period its running VMs are stopped (never deleted) with
the reason, and a top-up starts them again. The host agent's reports are made through the
command side as an agent would (the scheduler and agent themselves are not run here)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import open_store
from tests.support.gateway import drive_to_running
from ucloud.commands.aggregates import VM
from ucloud.commands.billing import BillingCommands
from ucloud.commands.service import CommandService
from ucloud.commands.unit_of_work import SYSTEM
from ucloud.domain import vm as vm_domain
from ucloud.domain.account import Source
from ucloud.domain.metering import PeriodPolicy
from ucloud.eventstore.interface import EventStore
from ucloud.processes.billing import BillingProcess, BillingSettings


@pytest.fixture(params=["sqlite", "etcd"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[EventStore]:
    if request.param == "etcd":
        request.applymarker(pytest.mark.etcd)
    backend = await open_store(request.param, tmp_path, request)
    try:
        yield backend
    finally:
        await backend.close()


async def test_a_prepaid_account_at_zero_is_stopped_after_the_grace_period_and_restarted_by_a_top_up(
        store: EventStore) -> None:
    commands, billing = CommandService(store), BillingCommands(store)
    await billing.set_price(SYSTEM, "core", "36 CHF/hour")  # 0.01 CHF per core-second
    await billing.configure_account(SYSTEM, "carol", "prepaid")
    await billing.credit(SYSTEM, "carol", "0.50 CHF", Source.GRANT)  # 50 core-seconds
    created = await commands.create_vm(SYSTEM, name="app", cores=1, ram="256MiB", disk="1GiB", image="debian-12",
                                       owner="carol")
    vm_id = created.result
    host = await drive_to_running(commands, vm_id, hostname="prepaid-host")
    clock = [time.time()]
    process = BillingProcess(store, BillingSettings(periods=PeriodPolicy(), grace=600), clock=lambda: clock[0])

    await process.run_until_idle()  # 60 s minimum = 0.60 CHF > 0.50 CHF: at zero already
    row = process.view.accounts["carol"]
    assert row.depleted_at is not None and row.suspended is None
    assert "reached zero" in process.view.balance("carol", int(clock[0])).reason
    vm = (await commands.repository.load(VM, vm_domain.stream_name(vm_id))).state
    assert vm is not None and vm.status is vm_domain.Status.RUNNING  # not before the grace period ends

    clock[0] += 601
    await process.run_until_idle()
    row = process.view.accounts["carol"]
    assert row.suspended == [vm_id]
    assert "prepaid balance of carol has been at zero" in row.reason
    vm = (await commands.repository.load(VM, vm_domain.stream_name(vm_id))).state
    assert vm is not None and vm.desired is vm_domain.Desired.STOPPED and vm.status is vm_domain.Status.STOPPING
    await commands.report(SYSTEM, vm_domain.ReportStopped(vm_id=vm_id, host_id=host))  # the agent stops it

    # Started anyway while suspended: stopped again.
    await commands.vm_command(SYSTEM, vm_domain.StartVm(vm_id=vm_id))
    await commands.report(SYSTEM, vm_domain.ReportStarted(vm_id=vm_id, host_id=host))
    await process.run_until_idle()
    await process.step()
    vm = (await commands.repository.load(VM, vm_domain.stream_name(vm_id))).state
    assert vm is not None and vm.desired is vm_domain.Desired.STOPPED
    await commands.report(SYSTEM, vm_domain.ReportStopped(vm_id=vm_id, host_id=host))

    # A top-up: resumed, and the VM the suspension stopped is started again; never deleted.
    await billing.credit(SYSTEM, "carol", "100 CHF", Source.GRANT)
    await process.run_until_idle()
    row = process.view.accounts["carol"]
    assert row.suspended is None and row.depleted_at is None and row.reason == ""
    vm = (await commands.repository.load(VM, vm_domain.stream_name(vm_id))).state
    assert vm is not None and vm.desired is vm_domain.Desired.RUNNING
    types = [r.type for r in await store.read_stream(vm_domain.stream_name(vm_id))]
    assert "vm.delete_requested" not in types
    account_types = [r.type for r in await store.read_all() if r.stream.startswith("account-")]
    assert account_types == ["account.configured", "account.credited", "account.depleted", "account.suspended",
                             "account.credited", "account.resumed"]


async def test_an_unpaid_invoice_is_reminded_at_its_due_date_and_every_interval_after_until_paid(
        store: EventStore) -> None:
    commands, billing = CommandService(store), BillingCommands(store)
    await billing.set_price(SYSTEM, "core", "36 CHF/hour")
    created = await commands.create_vm(SYSTEM, name="app", cores=1, ram="256MiB", disk="1GiB", image="debian-12",
                                       owner="dave")  # postpaid: invoiced afterwards
    host = await drive_to_running(commands, created.result, hostname="dunning-host")
    await commands.report(SYSTEM, vm_domain.ReportStopped(vm_id=created.result, host_id=host))
    hour = PeriodPolicy(seconds=3600)
    period_end = hour.bounds(int(time.time()))[1]
    clock = [float(period_end + 10)]
    day = 600  # short "days": every hour the clock moves is a period the process closes
    process = BillingProcess(store, BillingSettings(periods=hour, close_delay=5, due_after=10 * day,
                                                    remind_every=7 * day, reminders=3), clock=lambda: clock[0])
    await process.run_until_idle()
    [number] = process.view.by_owner["dave"]
    invoice = process.view.invoices[number]
    assert invoice.total == 600_000 and process.view.left_to_pay(invoice) == 600_000  # 60 s minimum at 0.01 CHF/s

    def reminders() -> list[tuple[int, int]]:
        return sorted(process.view.accounts["dave"].reminded.items())

    clock[0] = period_end + 10 * day - 1  # not yet due
    await process.run_until_idle()
    assert "dave" not in process.view.accounts or not process.view.accounts["dave"].reminded
    clock[0] = period_end + 10 * day + 30 * day  # due long ago: the highest level reached, once
    await process.run_until_idle()
    await process.run_until_idle()
    assert reminders() == [(number, 3)]
    events = [r for r in await store.read_all() if r.type == "invoice.reminded"]
    assert len(events) == 1 and b'"level":3' in events[0].data and b'"due_micros":600000' in events[0].data

    # Paid (a bank transfer quoting the reference): nothing more, and the view says so.
    await billing.credit(SYSTEM, "dave", "0.60 CHF", Source.BANK_TRANSFER, invoice.reference)
    clock[0] += 21 * day
    await process.run_until_idle()
    assert process.view.left_to_pay(invoice) == 0 and process.view.paid(invoice)
    assert len([r for r in await store.read_all() if r.type == "invoice.reminded"]) == 1


async def test_reminders_climb_one_level_per_interval(store: EventStore) -> None:
    commands, billing = CommandService(store), BillingCommands(store)
    await billing.set_price(SYSTEM, "core", "36 CHF/hour")
    created = await commands.create_vm(SYSTEM, name="app", cores=1, ram="256MiB", disk="1GiB", image="debian-12",
                                       owner="erin")
    host = await drive_to_running(commands, created.result, hostname="climb-host")
    await commands.report(SYSTEM, vm_domain.ReportStopped(vm_id=created.result, host_id=host))
    hour = PeriodPolicy(seconds=3600)
    period_end = hour.bounds(int(time.time()))[1]
    clock = [float(period_end + 10)]
    process = BillingProcess(store, BillingSettings(periods=hour, close_delay=5, due_after=100, remind_every=50,
                                                    reminders=3), clock=lambda: clock[0])
    levels = []
    for offset in (100, 120, 150, 200, 400):
        clock[0] = period_end + offset
        await process.run_until_idle()
        levels.append(max(process.view.accounts["erin"].reminded.values(), default=0))
    assert levels == [1, 1, 2, 3, 3]
    assert [r.type for r in await store.read_all() if r.stream.startswith("account-")].count("invoice.reminded") == 3
