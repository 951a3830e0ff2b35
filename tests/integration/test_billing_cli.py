"""`ucloud price|usage|bill|balance|pay|account|coupon` against a real served gateway."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from tests.support.gateway import ServedGateway, drive_to_running, served_gateway
from ucloud.cli.main import main
from ucloud.commands.unit_of_work import SYSTEM
from ucloud.domain import vm as vm_domain
from ucloud.domain.metering import PeriodPolicy
from ucloud.processes.billing import BillingProcess, BillingSettings

DAY = PeriodPolicy(seconds=86400)  # the test does not cross a period end (except at midnight)


@pytest.fixture(scope="module")
def served() -> Iterator[ServedGateway]:
    patch = pytest.MonkeyPatch()
    patch.setenv("UCLOUD_BILLING_PERIOD", "1d")
    try:
        with served_gateway() as gateway:
            yield gateway
    finally:
        patch.undo()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, served: ServedGateway) -> Path:
    for name in ("UCLOUD_API", "UCLOUD_USER", "UCLOUD_REALM", "UCLOUD_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("UCLOUD_API", served.url)
    return tmp_path


def ucloud(*args: str, user: str) -> Result:
    realm = ["--realm", "ucloud-admin"] if user == "root" else []
    return CliRunner().invoke(main, ["--user", user, *realm, *args], catch_exceptions=False)


def ok(*args: str, user: str) -> Result:
    result = ucloud(*args, user=user)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result


def as_json(result: Result) -> Any:
    return json.loads(result.stdout)


def test_prices_usage_bills_balance_and_coupons_from_the_cli(home: Path, served: ServedGateway) -> None:
    alice = f"u{uuid.uuid4().hex[:8]}"
    ok("price", "set", "core", "0.36CHF/hour", user="root")
    ok("price", "set", "ram", "0.000001 CHF/second", user="root")
    listing = ok("price", "list", user=alice).stdout
    assert "0.36 CHF per core per hour" in listing and "0.000001 CHF per GiB per second" in listing

    bad = ucloud("price", "set", "core", "--", "-1CHF/hour", user="root")
    assert bad.exit_code == 1 and bad.stderr.startswith("error: amount:") and "negative" in bad.stderr
    bad = ucloud("price", "set", "gpu", "1CHF/hour", user="root")
    assert bad.exit_code == 1 and "resource" in bad.stderr
    refused = ucloud("price", "set", "core", "1CHF/hour", user=alice)
    assert refused.exit_code == 1 and "admin realm" in refused.stderr

    async def run_and_stop() -> None:
        commands = served.commands
        created = await commands.create_vm(SYSTEM, name="web", cores=1, ram="1GiB", disk="1GiB",
                                           image="debian-12", owner=alice)
        host = await drive_to_running(commands, created.result, hostname=f"h-{alice}")
        await commands.report(SYSTEM, vm_domain.ReportStopped(vm_id=created.result, host_id=host))

    served.run(run_and_stop())
    usage = as_json(ok("usage", "--json", user=alice))
    core = [line for line in usage["lines"] if line["resource"] == "core"]
    assert core and sum(line["quantity_seconds"] for line in core) == 60  # a short run counts 60 s
    assert "total so far" in ok("usage", user=alice).stdout

    end = DAY.bounds(int(time.time()))[1]
    process = BillingProcess(served.store, BillingSettings(periods=DAY, close_delay=5), clock=lambda: end + 10)
    served.run(process.run_until_idle())
    bills = as_json(ok("bill", "list", "--json", user=alice))
    assert bills, "the closed hour has an invoice"
    number = str(bills[-1]["number"])
    shown = ok("bill", "show", number, user=alice).stdout
    assert "web" in shown and "core" in shown and bills[-1]["total"] in shown
    page = ok("bill", "show", number, "--html", user=alice).stdout
    assert page.startswith("<!doctype html>") and f"Invoice {number}" in page
    other = ucloud("bill", "show", number, user=f"u{uuid.uuid4().hex[:8]}")
    assert other.exit_code == 1 and "does not exist" in other.stderr

    expires = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    code = f"GIFT-{uuid.uuid4().hex[:8]}"
    ok("coupon", "create", code, "10 CHF", "--expires", expires, user="root")
    assert "10.00 CHF credited" in ok("pay", "--coupon", code, user=alice).stdout
    transfer = ok("pay", "--invoice", number, user=alice).stdout
    assert bills[-1]["reference"] in transfer and bills[-1]["total"] in transfer
    refused = ucloud("pay", "--invoice", number, user=f"u{uuid.uuid4().hex[:8]}")
    assert refused.exit_code == 1 and "does not exist" in refused.stderr  # another user's invoice
    again = ucloud("pay", "--coupon", code, user=alice)
    assert again.exit_code == 1 and "redeemed already" in again.stderr
    balance = as_json(ok("balance", "--json", user=alice))
    assert balance["credited_micros"] == 10_000_000
    assert balance["balance_micros"] == 10_000_000 - balance["invoiced_micros"] - balance["unbilled_micros"]
    ok("account", "kind", alice, "prepaid", user="root")
    ok("account", "credit", alice, "5 CHF", "--transfer", bills[-1]["reference"], user="root")
    after = as_json(ok("balance", "--json", user=alice))
    assert (after["kind"], after["credited_micros"]) == ("prepaid", 15_000_000)
    assert ucloud("pay", user=alice).exit_code == 2
    assert ucloud("pay", "--coupon", code, "--invoice", number, user=alice).exit_code == 2
