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
