"""Accounts and coupons: who pays how, and money coming in.

An account is per owner (stream ``account-<uuid5(owner)>``). Without an event it is
postpaid, so a cloud with no billing set up behaves as before. Money comes in as
``account.credited`` with its source (an admin's grant, a coupon, a bank transfer, a
card); money goes out as issued invoices. The balance is credits minus invoices: it is
derived, never stored.

A coupon is a stream of its own keyed by a hash of its code; redeeming it appends
``coupon.redeemed`` to it and ``account.credited`` to the account in one atomic append
at the coupon's version, so of any number of concurrent redemptions exactly one wins.
The code itself never enters the log (only its stream id, a one-way hash).
"""

from __future__ import annotations

import enum
import hashlib
import re
import uuid
from datetime import datetime
from uuid import UUID

import msgspec

from .errors import InvalidValue, NotFound, OutOfBounds, Rejected
from .events import Command, Event
from .money import Money, require_same

ACCOUNT_NAMESPACE = uuid.UUID("6f1f1d2e-8d53-4c1e-9a0e-4b2f5bd0c015")
COUPON_NAMESPACE = uuid.UUID("6f1f1d2e-8d53-4c1e-9a0e-4b2f5bd0c016")
# The OpenAPI pattern too (ECMA-262 and Python alike); checked with fullmatch.
COUPON_CODE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{5,63}$"
COUPON_CODE_MAX_LENGTH = 64
COUPON_CODE_RULE = "6-64 letters, digits, '-' or '_', starting with a letter or digit"
_COUPON_CODE = re.compile(COUPON_CODE_PATTERN[1:-1], re.ASCII)


class Kind(enum.StrEnum):
    PREPAID = "prepaid"
    POSTPAID = "postpaid"


class Source(enum.StrEnum):
    GRANT = "grant"  # an admin granted account credit
    COUPON = "coupon"
    BANK_TRANSFER = "bank-transfer"
    CARD = "card"


def account_id_for(owner: str) -> UUID:
    return uuid.uuid5(ACCOUNT_NAMESPACE, owner)


def coupon_id_for(code: str) -> UUID:
    return uuid.uuid5(COUPON_NAMESPACE, hashlib.sha256(code.encode()).hexdigest())


class AccountConfigured(Event, tag="account.configured", frozen=True):
    """An admin made an account prepaid or postpaid."""

    owner: str
    kind: Kind


class AccountCredited(Event, tag="account.credited", frozen=True):
    """Money came into an account (``micros`` > 0) from ``source``; ``reference`` says which
    grant, coupon, transfer or card payment."""

    owner: str
    micros: int
    currency: str
    source: Source
    reference: str = ""


class CouponCreated(Event, tag="coupon.created", frozen=True):
    """An admin made a coupon worth ``micros``, redeemable once until ``expires``."""

    coupon_id: UUID
    micros: int
    currency: str
    expires: datetime


class CouponRedeemed(Event, tag="coupon.redeemed", frozen=True):
    """A coupon was redeemed by ``owner`` (appended with its ``account.credited``)."""

    coupon_id: UUID
    owner: str


class AccountDepleted(Event, tag="account.depleted", frozen=True):
    """A prepaid account's balance reached zero at ``at``; its VMs stop after the grace
    period unless it is topped up."""

    owner: str
    at: datetime
    grace_seconds: int


class AccountSuspended(Event, tag="account.suspended", frozen=True):
    """A prepaid account stayed at zero past its grace period: its running VMs are stopped
    (never deleted) for ``reason``; ``vm_ids`` start again after a top-up."""

    owner: str
    reason: str
    vm_ids: tuple[UUID, ...] = ()


class AccountResumed(Event, tag="account.resumed", frozen=True):
    """A depleted or suspended account was topped up; the VMs it stopped start again."""

    owner: str
    vm_ids: tuple[UUID, ...] = ()


class InvoiceReminded(Event, tag="invoice.reminded", frozen=True):
    """Dunning: invoice ``number`` was still unpaid ``level`` reminder intervals after it fell
    due (level 1 at the due date); ``due_micros`` is what is left to pay on it."""

    owner: str
    number: int
    level: int
    due: datetime
    due_micros: int


class PaymentSettled(Event, tag="payment.settled", frozen=True):
    """A card provider confirmed payment ``intent`` (a signed webhook); appended once, with
    its ``account.credited``, to the payment's own stream: a repeated webhook credits nothing."""

    payment_id: UUID
    provider: str
    intent: str
    owner: str
    micros: int
    currency: str


ACCOUNT_EVENT_TYPES: tuple[type[Event], ...] = (
    AccountConfigured, AccountCredited, CouponCreated, CouponRedeemed, AccountDepleted, AccountSuspended,
    AccountResumed, PaymentSettled, InvoiceReminded)
PAYMENT_NAMESPACE = uuid.UUID("6f1f1d2e-8d53-4c1e-9a0e-4b2f5bd0c017")


class Payment(msgspec.Struct, frozen=True, kw_only=True):
    id: UUID
    owner: str
    micros: int


def payment_id_for(provider: str, intent: str) -> UUID:
    return uuid.uuid5(PAYMENT_NAMESPACE, f"{provider}\0{intent}")


def payment_stream(payment_id: UUID) -> str:
    return f"payment-{payment_id}"


def evolve_payment(payment: Payment | None, event: Event) -> Payment | None:
    if isinstance(event, PaymentSettled):
        return Payment(id=event.payment_id, owner=event.owner, micros=event.micros)
    return payment


def decide_settle(payment: Payment | None, provider: str, intent: str, owner: str, amount: Money,
                  currency: str | None) -> tuple[list[Event], list[Event]]:
    """(payment stream events, account stream events); nothing if already settled."""
    if payment is not None:
        return [], []
    if amount.micros <= 0:
        raise InvalidValue("amount", "must be more than zero")
    if currency is not None:
        require_same(currency, amount.currency)
    payment_id = payment_id_for(provider, intent)
    return ([PaymentSettled(payment_id=payment_id, provider=provider, intent=intent, owner=owner,
                            micros=amount.micros, currency=amount.currency)],
            [AccountCredited(owner=owner, micros=amount.micros, currency=amount.currency, source=Source.CARD,
                             reference=f"{provider}:{intent}")])


class Account(msgspec.Struct, frozen=True, kw_only=True):
    owner: str
    kind: Kind = Kind.POSTPAID
    credited: int = 0  # micros
    currency: str = ""


class Coupon(msgspec.Struct, frozen=True, kw_only=True):
    id: UUID
    micros: int
    currency: str
    expires: datetime
    redeemed_by: str | None = None


# -- commands -------------------------------------------------------------------------------


class ConfigureAccount(Command, tag="account.configure", frozen=True):
    owner: str
    kind: str


class Credit(Command, tag="account.credit", frozen=True):
    owner: str
    amount: Money
    source: Source
    reference: str = ""


class CreateCoupon(Command, tag="coupon.create", frozen=True):
    code: str
    amount: Money
    expires: datetime


class RedeemCoupon(Command, tag="coupon.redeem", frozen=True):
    code: str
    owner: str


def evolve_account(account: Account | None, event: Event) -> Account | None:
    match event:
        case AccountConfigured():
            base = account or Account(owner=event.owner)
            return msgspec.structs.replace(base, kind=event.kind)
        case AccountCredited():
            base = account or Account(owner=event.owner)
            return msgspec.structs.replace(base, credited=base.credited + event.micros, currency=event.currency)
    return account


def evolve_coupon(coupon: Coupon | None, event: Event) -> Coupon | None:
    match event:
        case CouponCreated():
            return Coupon(id=event.coupon_id, micros=event.micros, currency=event.currency, expires=event.expires)
        case CouponRedeemed() if coupon is not None:
            return msgspec.structs.replace(coupon, redeemed_by=event.owner)
    return coupon


def decide_configure(command: ConfigureAccount) -> list[Event]:
    try:
        kind = Kind(command.kind)
    except ValueError:
        raise InvalidValue("kind", f"{command.kind!r}: one of prepaid, postpaid") from None
    return [AccountConfigured(owner=command.owner, kind=kind)]


def decide_credit(command: Credit, currency: str | None) -> list[Event]:
    """``currency``: the installation's (from its prices); None before any price exists."""
    if command.amount.micros <= 0:
        raise OutOfBounds("amount", "must be more than zero")
    if currency is not None:
        require_same(currency, command.amount.currency, "amount")
    return [AccountCredited(owner=command.owner, micros=command.amount.micros, currency=command.amount.currency,
                            source=command.source, reference=command.reference)]


def check_coupon_code(code: str) -> str:
    if not isinstance(code, str) or len(code) > COUPON_CODE_MAX_LENGTH or not _COUPON_CODE.fullmatch(code):
        raise InvalidValue("code", f"a coupon code is {COUPON_CODE_RULE}")
    return code


def decide_create_coupon(coupon: Coupon | None, command: CreateCoupon, now: datetime,
                         currency: str | None) -> list[Event]:
    check_coupon_code(command.code)
    if coupon is not None:
        raise Rejected("a coupon with this code exists already")
    if command.amount.micros <= 0:
        raise OutOfBounds("amount", "must be more than zero")
    if currency is not None:
        require_same(currency, command.amount.currency, "amount")
    if command.expires.tzinfo is None:
        raise InvalidValue("expires", "give a time zone (e.g. 2027-01-01T00:00:00Z)")
    if command.expires <= now:
        raise OutOfBounds("expires", "must be in the future")
    return [CouponCreated(coupon_id=coupon_id_for(command.code), micros=command.amount.micros,
                          currency=command.amount.currency, expires=command.expires)]


def decide_redeem(coupon: Coupon | None, command: RedeemCoupon, now: datetime) -> tuple[list[Event], list[Event]]:
    """(events for the coupon stream, events for the account stream)."""
    check_coupon_code(command.code)
    if coupon is None:
        raise NotFound("no such coupon")
    if coupon.redeemed_by is not None:
        raise Rejected("this coupon has been redeemed already")
    if coupon.expires <= now:
        raise Rejected(f"this coupon expired at {coupon.expires.isoformat()}")
    return ([CouponRedeemed(coupon_id=coupon.id, owner=command.owner)],
            [AccountCredited(owner=command.owner, micros=coupon.micros, currency=coupon.currency,
                             source=Source.COUPON, reference=str(coupon.id))])


def account_stream(account_id: UUID) -> str:
    return f"account-{account_id}"


def coupon_stream(coupon_id: UUID) -> str:
    return f"coupon-{coupon_id}"
