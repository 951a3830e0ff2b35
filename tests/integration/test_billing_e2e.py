"""Billing end to end with a real guest: etcd, `ucloud up --no-agent` (gateway, scheduler and
the billing process), `ucloud-host` running a QEMU/TCG guest, the CLI. A VM runs for a
measured time and stops; usage and the invoice line equal price x seconds, to the unit."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Callable
from datetime import datetime

import pytest

from tests.integration.test_vm_lifecycle_e2e import (
    ADMIN,
    BIN,
    Cloud,
    _alive,
    cloud,
    qemu_pids,
    wait_for_marker,
)
from ucloud.domain.metering import PeriodPolicy
from ucloud.eventstore.url import open_store
from ucloud.processes.billing import BillingProcess, BillingSettings

pytestmark = [pytest.mark.etcd, pytest.mark.qemu, pytest.mark.slow]
__all__ = ["cloud"]  # the fixture, shared with the lifecycle end-to-end tests


def _times(cloud: Cloud, vm_id: str) -> dict[str, int]:
    audit = subprocess.run([str(BIN / "ucloud-audit"), "--store", cloud.store_url, "show", f"vm-{vm_id}", "--json"],
                           capture_output=True, text=True, env=cloud.env, timeout=60)
    assert audit.returncode == 0, audit.stderr
    records = [json.loads(line) for line in audit.stdout.splitlines()]
    return {r["type"]: int(datetime.fromisoformat(r["time"]).timestamp()) for r in records}


def test_a_guest_run_for_a_measured_time_is_billed_price_times_seconds(cloud: Cloud) -> None:
    cloud.ucloud(*ADMIN, "price", "set", "core", "0.36CHF/hour")  # 100 micros per core-second
    cloud.ucloud(*ADMIN, "price", "set", "ram", "3.6CHF/hour")  # 1000 micros per GiB-second
    cloud.ucloud(*ADMIN, "price", "set", "disk", "0.0036CHF/hour")  # 1 micro per GiB-second
    # Prices are set: the VM is ordered (quoted, confirmed with --yes, provisioned by the
    # ordering process inside `ucloud up`).
    created = json.loads(cloud.ucloud("vm", "create", "--image", "tiny", "--cores", "2", "--ram", "256MB",
                                      "--disk", "1GB", "--yes", "--wait", "--timeout", "150", "--json").stdout)
    vm_id = created["id"]
    wait_for_marker(cloud, vm_id)  # the guest really runs
    time.sleep(65)  # past the 60 s minimum, so the measured time is what is billed
    cloud.ucloud("vm", "stop", vm_id, "--wait", "--timeout", "90")
    times = _times(cloud, vm_id)
    seconds = times["vm.stopped"] - times["vm.started"]
    assert seconds >= 60

    usage = json.loads(cloud.ucloud("usage", "--json").stdout)
    lines = {line["resource"]: line for line in usage["lines"]}
    assert lines["core"]["quantity_seconds"] == 2 * seconds
    assert lines["core"]["amount_micros"] == 2 * seconds * 100
    assert lines["ram"]["quantity_seconds"] == (256 << 20) * seconds
    assert lines["ram"]["amount_micros"] == seconds * 1000 // 4

    cloud.ucloud("vm", "delete", vm_id, "--wait", "--timeout", "60")
    times = _times(cloud, vm_id)
    disk_seconds = times["vm.deleted"] - times["vm.requested"]

    # Close this month now: a billing process whose clock reads just after the month's end.
    month_end = PeriodPolicy().bounds(int(time.time()))[1]

    async def close() -> None:
        store = open_store(cloud.store_url)
        try:
            await BillingProcess(store, BillingSettings(close_delay=1), clock=lambda: month_end + 5).run_until_idle()
        finally:
            await store.close()

    asyncio.run(close())
    [invoice] = json.loads(cloud.ucloud("bill", "list", "--json").stdout)
    lines = {line["resource"]: line for line in invoice["lines"]}
    assert lines["core"]["amount_micros"] == 2 * seconds * 100
    assert lines["ram"]["amount_micros"] == seconds * 1000 // 4
    assert lines["disk"]["quantity_seconds"] == (1 << 30) * disk_seconds
    assert lines["disk"]["amount_micros"] == disk_seconds
    assert invoice["total_micros"] == 2 * seconds * 100 + seconds * 250 + disk_seconds
    shown = cloud.ucloud("bill", "show", str(invoice["number"])).stdout
    assert invoice["total"] in shown


@pytest.fixture
def short_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the cloud starts: `ucloud up`'s billing process stops VMs 5 s after a prepaid
    balance reaches zero, and a prepaid order needs no balance ahead."""
    monkeypatch.setenv("UCLOUD_PREPAID_GRACE_SECONDS", "5")
    monkeypatch.setenv("UCLOUD_PREPAID_ORDER_HOURS", "0")


def _vm(cloud: Cloud, vm_id: str) -> dict[str, object]:
    shown: dict[str, object] = json.loads(cloud.ucloud("vm", "show", vm_id, "--json").stdout)
    return shown


def _until(cloud: Cloud, what: str, check: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} did not happen\n{cloud.agent_log()}"
        time.sleep(0.5)


def test_a_prepaid_guest_is_stopped_at_zero_after_the_grace_period_and_started_by_a_top_up(
        short_grace: None, cloud: Cloud) -> None:
    cloud.ucloud(*ADMIN, "price", "set", "core", "36CHF/hour")  # 0.01 CHF per core-second
    cloud.ucloud(*ADMIN, "account", "kind", "alice", "prepaid")
    cloud.ucloud(*ADMIN, "account", "credit", "alice", "0.05 CHF")  # 5 s of one core; a start bills 60 s
    created = json.loads(cloud.ucloud("vm", "create", "--image", "tiny", "--cores", "1", "--ram", "256MB",
                                      "--disk", "1GB", "--yes", "--wait", "--timeout", "150", "--json").stdout)
    vm_id = created["id"]
    wait_for_marker(cloud, vm_id)
    (pid,) = qemu_pids(vm_id)

    # At zero: told, and after the 5 s grace period the guest is stopped (not deleted).
    _until(cloud, "the stop at zero balance", lambda: _vm(cloud, vm_id)["status"] == "stopped")
    assert qemu_pids(vm_id) == [] and not _alive(pid)
    balance = json.loads(cloud.ucloud("balance", "--json").stdout)
    assert balance["suspended"] and "has been at zero" in balance["reason"], balance
    assert "top up" in cloud.ucloud("balance").stdout

    # A top-up: the billing process starts it again; the guest boots a second time (the old
    # console log is removed first, so the marker must come from the new boot).
    (cloud.run_dir(vm_id) / "serial.log").unlink(missing_ok=True)
    cloud.ucloud(*ADMIN, "account", "credit", "alice", "100 CHF")
    _until(cloud, "the start after the top-up", lambda: _vm(cloud, vm_id)["status"] == "running")
    wait_for_marker(cloud, vm_id)
    (new_pid,) = qemu_pids(vm_id)
    assert new_pid != pid
    balance = json.loads(cloud.ucloud("balance", "--json").stdout)
    assert not balance["suspended"] and balance["reason"] == ""
