"""Billing intents: prices, accounts, credit, coupons, transfers; period closings and
invoices for the billing process. Load, decide (domain), append; retries in Repository."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from uuid import UUID

from ucloud.domain import account as account_domain
from ucloud.domain import order as order_domain
from ucloud.domain import pricing
from ucloud.domain import vm as vm_domain
from ucloud.domain.catalogue import build_codec
from ucloud.domain.errors import InvalidValue, NotFound
from ucloud.domain.events import Event, EventCodec
from ucloud.domain.invoice import INVOICES_STREAM, PERIODS_STREAM, InvoiceIssued, PeriodClosed
from ucloud.domain.limits import DEFAULT_LIMITS, Limits, vm_request
from ucloud.domain.money import Money, parse_money
from ucloud.eventstore.interface import EventStore
from ucloud.eventstore.records import NewEvent, StreamAppend, Tracking

from .unit_of_work import Actor, AggregateType, Outcome, Repository, Session

PRICEBOOK = AggregateType("pricebook", pricing.Pricebook, pricing.evolve, pricing.stream_name)
ACCOUNT = AggregateType("account", account_domain.Account, account_domain.evolve_account,
                        account_domain.account_stream)
PAYMENT = AggregateType("payment", account_domain.Payment, account_domain.evolve_payment,
                        account_domain.payment_stream)
ORDER = AggregateType("order", order_domain.Order, order_domain.evolve, order_domain.stream_name)
COUPON = AggregateType("coupon", account_domain.Coupon, account_domain.evolve_coupon, account_domain.coupon_stream)


def _admin(actor: Actor, what: str) -> None:
    if not actor.is_admin:
        raise NotFound(f"{what} is done in the admin realm")


def _now() -> datetime:
    return datetime.now(UTC)


class BillingCommands:
    def __init__(self, store: EventStore, codec: EventCodec | None = None) -> None:
        self.store = store
        self.codec = codec or build_codec()
        self.repository = Repository(store, self.codec)

    async def _currency(self, session: Session) -> str | None:
        book = await session.load(PRICEBOOK, pricing.PRICEBOOK_ID)
        return book.currency if book else None

    # -- prices -------------------------------------------------------------------------------

    async def set_price(self, actor: Actor, resource: str, amount: str,
                        effective_from: datetime | None = None) -> Outcome[int]:
        """Record a price version; the result is its version number."""
        _admin(actor, "setting prices")
        command = pricing.SetPrice(resource=resource, amount=amount, effective_from=effective_from)

        async def work(session: Session) -> int:
            book = await session.load(PRICEBOOK, pricing.PRICEBOOK_ID)
            session.record(PRICEBOOK, pricing.PRICEBOOK_ID, pricing.decide(book, command, _now()))
            return len(book.prices) + 1 if book else 1

        return await self.repository.transact(work, actor)

    # -- accounts -----------------------------------------------------------------------------

    async def configure_account(self, actor: Actor, owner: str, kind: str) -> Outcome[None]:
        _admin(actor, "configuring accounts")
        command = account_domain.ConfigureAccount(owner=owner, kind=kind)
        account_id = account_domain.account_id_for(owner)

        async def work(session: Session) -> None:
            await session.load(ACCOUNT, account_id)
            session.record(ACCOUNT, account_id, account_domain.decide_configure(command))

        return await self.repository.transact(work, actor)

    async def credit(self, actor: Actor, owner: str, amount: str, source: account_domain.Source,
                     reference: str = "") -> Outcome[None]:
        """Admin: grant credit, or record a bank transfer's receipt (or a card payment's)."""
        _admin(actor, "crediting accounts")
        money = parse_money(amount, "amount")
        if len(reference) > 200:
            raise InvalidValue("reference", "at most 200 characters")
        command = account_domain.Credit(owner=owner, amount=money, source=source, reference=reference)
        account_id = account_domain.account_id_for(owner)

        async def work(session: Session) -> None:
            currency = await self._currency(session)
            await session.load(ACCOUNT, account_id)
            session.record(ACCOUNT, account_id, account_domain.decide_credit(command, currency))

        return await self.repository.transact(work, actor)

    # -- coupons ------------------------------------------------------------------------------

    async def create_coupon(self, actor: Actor, code: str, amount: str, expires: datetime) -> Outcome[UUID]:
        _admin(actor, "creating coupons")
        command = account_domain.CreateCoupon(code=account_domain.check_coupon_code(code),
                                              amount=parse_money(amount, "amount"), expires=expires)
        coupon_id = account_domain.coupon_id_for(code)

        async def work(session: Session) -> UUID:
            currency = await self._currency(session)
            coupon = await session.load(COUPON, coupon_id)
            session.record(COUPON, coupon_id, account_domain.decide_create_coupon(coupon, command, _now(), currency))
            return coupon_id

        return await self.repository.transact(work, actor)

    async def redeem_coupon(self, actor: Actor, code: str) -> Outcome[Money]:
        """Credit the coupon to the caller's account, once: the coupon's stream version is
        the guard, so concurrent redemptions conflict and all but one are then refused."""
        command = account_domain.RedeemCoupon(code=account_domain.check_coupon_code(code), owner=actor.name)
        coupon_id = account_domain.coupon_id_for(code)
        account_id = account_domain.account_id_for(actor.name)

        async def work(session: Session) -> Money:
            coupon = await session.load(COUPON, coupon_id)
            await session.load(ACCOUNT, account_id)
            coupon_events, account_events = account_domain.decide_redeem(coupon, command, _now())
            session.record(COUPON, coupon_id, coupon_events)
            session.record(ACCOUNT, account_id, account_events)
            assert coupon is not None
            return Money(coupon.micros, coupon.currency)

        return await self.repository.transact(work, actor, attempts=100)

    async def settle_card_payment(self, actor: Actor, provider: str, intent: str, owner: str,
                                  amount: Money) -> Outcome[bool]:
        """A provider's verified webhook: credit ``owner`` once per intent (True if credited
        now, False if this intent was settled before)."""
        payment_id = account_domain.payment_id_for(provider, intent)
        account_id = account_domain.account_id_for(owner)

        async def work(session: Session) -> bool:
            currency = await self._currency(session)
            payment = await session.load(PAYMENT, payment_id)
            await session.load(ACCOUNT, account_id)
            payment_events, account_events = account_domain.decide_settle(
                payment, provider, intent, owner, amount, currency)
            session.record(PAYMENT, payment_id, payment_events)
            session.record(ACCOUNT, account_id, account_events)
            return bool(payment_events)

        return await self.repository.transact(work, actor)

    # -- orders -------------------------------------------------------------------------------

    async def quote_order(self, actor: Actor, *, name: str, cores: int | str, ram: int | str, disk: int | str,
                          image: str, ssh_keys: Sequence[str] = (), restart_policy: str = "always",
                          owner: str | None = None, user_data: str = "",
                          limits: Limits = DEFAULT_LIMITS) -> Outcome[order_domain.Order]:
        """Record a quote for a VM at the prices in force now (the VM's name, image and keys
        are checked when it is provisioned: a bad one cancels the order with the reason)."""
        if owner is not None and owner != actor.name and not actor.is_admin:
            raise NotFound("only the admin realm may order for another user")
        owner = owner or actor.name
        vm_domain.check_user_data(user_data, limits.vm_user_data)
        cores_count, ram_bytes, disk_bytes = vm_request(limits, cores, ram, disk, ssh_keys)
        order_id = uuid.uuid4()
        now = _now()

        async def work(session: Session) -> order_domain.Order:
            book = await session.load(PRICEBOOK, pricing.PRICEBOOK_ID)
            schedule = pricing.Schedule.load(list(book.prices) if book else [])
            await session.load(ORDER, order_id)
            quoted = order_domain.quote(
                schedule, pricing.epoch_seconds(now), order_id=order_id, owner=owner, name=name,
                cores=cores_count, ram=ram_bytes, disk=disk_bytes, image=image,
                ssh_keys=tuple(ssh_keys), restart_policy=restart_policy, user_data=user_data)
            session.record(ORDER, order_id, [quoted])
            order = order_domain.evolve(None, quoted)
            assert order is not None
            return order

        return await self.repository.transact(work, actor)

    async def confirm_order(self, actor: Actor, order_id: UUID, *, prepaid: bool, available: int,
                            hours: int) -> Outcome[order_domain.Order]:
        """Confirm one's own order; ``prepaid``/``available``: the owner's account as the
        caller's billing view sees it now."""

        async def work(session: Session) -> order_domain.Order:
            order = await session.load(ORDER, order_id)
            if order is not None and order.owner != actor.name and not actor.is_admin:
                order = None  # another user's order does not exist for you
            events = order_domain.decide_confirm(order, order_domain.ConfirmOrder(
                order_id=order_id, prepaid=prepaid, available=available, hours=hours))
            session.record(ORDER, order_id, events)
            for event in events:
                order = order_domain.evolve(order, event)
            assert order is not None
            return order

        return await self.repository.transact(work, actor)

    async def order_outcome(self, actor: Actor, order_id: UUID, vm_id: UUID | None, reason: str = "") -> Outcome[None]:
        async def work(session: Session) -> None:
            order = await session.load(ORDER, order_id)
            session.record(ORDER, order_id, order_domain.decide_outcome(order, vm_id, reason))

        return await self.repository.transact(work, actor)

    # -- the billing process ------------------------------------------------------------------

    async def close_period(self, actor: Actor, closing: PeriodClosed, expected_version: int,
                           tracking: Tracking | None = None) -> list[int]:
        """Append one period closing at the version the caller saw (StreamConflict if stale)."""
        return await self.store.append(
            StreamAppend(PERIODS_STREAM, expected_version, [self._new(closing, actor)]), tracking=tracking)

    async def issue_invoices(self, actor: Actor, invoices: Sequence[InvoiceIssued], expected_version: int,
                             tracking: Tracking | None = None) -> list[int]:
        """Append invoices numbered ``expected_version + 1, ...`` in one append; the stream's
        version guarantees gap-free numbers and no invoice issued twice."""
        for offset, invoice in enumerate(invoices, 1):
            if invoice.number != expected_version + offset:
                raise ValueError(f"invoice number {invoice.number} is not {expected_version + offset}")
        return await self.store.append(
            StreamAppend(INVOICES_STREAM, expected_version, [self._new(i, actor) for i in invoices]),
            tracking=tracking)

    async def account_events(self, actor: Actor, owner: str, events: Sequence[Event], expected_version: int) -> list[int]:
        """The billing process's account decisions (depleted, suspended, resumed), appended at
        the account stream's version it decided on (StreamConflict if stale)."""
        stream = account_domain.account_stream(account_domain.account_id_for(owner))
        return await self.store.append(StreamAppend(stream, expected_version, [self._new(e, actor) for e in events]))

    def _new(self, event: Event, actor: Actor) -> NewEvent:
        return self.repository._new_event(event, actor, None, uuid.uuid4())
