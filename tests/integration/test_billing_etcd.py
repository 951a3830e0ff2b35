"""Coupons on a real etcd: of 50 concurrent redemptions of one coupon exactly one credits."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from tests.conftest import unique_prefix
from tests.support.etcd import EtcdCluster
from ucloud.commands.billing import BillingCommands
from ucloud.commands.unit_of_work import SYSTEM, Actor
from ucloud.domain.account import Source
from ucloud.domain.catalogue import build_codec
from ucloud.domain.errors import Rejected
from ucloud.eventstore.etcd import EtcdEventStore

pytestmark = [pytest.mark.etcd]


async def test_fifty_concurrent_redemptions_of_one_coupon_credit_it_once(etcd: EtcdCluster) -> None:
    prefix = unique_prefix()
    # Five clients (as five gateways would be), ten redemptions each, all at once.
    stores = [EtcdEventStore(etcd.endpoints, prefix=prefix) for _ in range(5)]
    try:
        admin = BillingCommands(stores[0])
        await admin.set_price(SYSTEM, "core", "0.01 CHF/hour")
        await admin.create_coupon(SYSTEM, "RACE-COUPON-1", "7.50 CHF", datetime.now(UTC) + timedelta(hours=1))
        commands = [BillingCommands(store) for store in stores]

        async def redeem(index: int) -> str:
            try:
                await commands[index % 5].redeem_coupon(Actor(f"user{index}"), "RACE-COUPON-1")
            except Rejected as refused:
                return str(refused)
            return "credited"

        results = await asyncio.gather(*(redeem(i) for i in range(50)))
        assert results.count("credited") == 1, results
        assert all("redeemed already" in r for r in results if r != "credited")

        codec = build_codec()
        credits = [codec.decode(r.type, r.schema, r.data) for r in await stores[0].read_all()
                   if r.type == "account.credited"]
        assert len(credits) == 1
        assert credits[0].source is Source.COUPON and credits[0].micros == 7_500_000  # type: ignore[attr-defined]
        redemptions = [r for r in await stores[0].read_all() if r.type == "coupon.redeemed"]
        assert len(redemptions) == 1
    finally:
        for store in stores:
            await store.close()
