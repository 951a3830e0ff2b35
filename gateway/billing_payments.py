"""Payment methods behind one interface: each is a plugin the gateway dispatches
``POST /v1/payments {"method": NAME, ...}`` to (docs/billing.md, "Payment methods").

- ``coupon``: redeem a code (credited once, race-free: commands/billing.py);
- ``bank-transfer``: answers how to pay (amount, the invoice's reference, the account to
  pay to); an admin records the receipt (``POST /v1/accounts/{owner}/credits``);
- ``card``: a card provider adapter. It creates a payment intent at the provider and
  answers where the card holder confirms it; the provider then calls our webhook, whose
  HMAC-SHA256 signature (``Provider-Signature: t=…,v1=…`` over ``"<t>.<body>"``) is checked
  before the account is credited, once per intent. The test provider
  (tests/support/cardprovider.py) speaks this protocol; a real provider's adapter is a
  subclass that changes the request and the signature header.

Account credit granted by an admin is not a user's payment method and has its own route.
"""

from __future__ import annotations

import abc
import hashlib
import hmac
import os
import time
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import aiohttp
import msgspec

from ucloud.commands.billing import BillingCommands
from ucloud.commands.unit_of_work import Actor
from ucloud.domain.account import COUPON_CODE_MAX_LENGTH, COUPON_CODE_PATTERN, COUPON_CODE_RULE
from ucloud.domain.errors import InvalidValue, NotFound, OutOfBounds, Rejected
from ucloud.domain.limits import CEILING
from ucloud.domain.money import (
    AMOUNT_MAX_LENGTH,
    AMOUNT_PATTERN,
    AMOUNT_RULE,
    Money,
    format_micros,
    parse_money,
)
from ucloud.projections.billing import BillingView

from .inputs import text
from .routes import UserName

Amount = Annotated[str, text(AMOUNT_MAX_LENGTH, AMOUNT_PATTERN, "20 CHF", AMOUNT_RULE)]
CouponCode = Annotated[str, text(COUPON_CODE_MAX_LENGTH, COUPON_CODE_PATTERN, "WELCOME-2027", COUPON_CODE_RULE)]


class PayBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Which fields a method needs is its own rule: a method given without them, or one not
    configured here, is refused with 422 naming the field."""

    method: Literal["coupon", "bank-transfer", "card"]
    amount: Amount | None = None  # card: how much; bank-transfer: default the invoice's total
    code: CouponCode | None = None  # coupon
    invoice: Annotated[int, msgspec.Meta(ge=1, le=CEILING)] | None = None  # bank-transfer: which invoice


class CardIntentMetadata(msgspec.Struct, kw_only=True):
    owner: UserName  # whose account the intent credits (set by CardMethod.pay)


class CardIntent(msgspec.Struct, kw_only=True):
    """The provider's payment intent as its webhook reports it (other fields are ignored)."""

    id: Annotated[str, text(128, r"^[A-Za-z0-9_-]{1,128}$", "pi_4f0c2a")]
    status: Annotated[str, text(64, r"^[a-z_]{1,64}$", "succeeded")]
    amount_micros: Annotated[int, msgspec.Meta(ge=0, le=CEILING)]
    currency: Annotated[str, text(3, r"^[A-Z]{3}$", "CHF")]
    metadata: CardIntentMetadata


class CardEvent(msgspec.Struct, kw_only=True):
    """The body of the provider's webhook: what happened, and to which intent."""

    type: Annotated[str, text(64, r"^[a-z0-9_.]{1,64}$", "payment_intent.succeeded")]
    intent: CardIntent | None = None


class PayOut(msgspec.Struct, kw_only=True, omit_defaults=True):
    method: str
    status: str  # "credited", "pending"
    position: int = 0
    credited_micros: int = 0
    amount: str = ""
    reference: str = ""
    instructions: str = ""
    intent: str = ""
    confirm_url: str = ""


class PaymentMethod(abc.ABC):
    """One way to pay. ``pay`` acts for ``actor`` only, on its own account and invoices."""

    name: ClassVar[str]

    @abc.abstractmethod
    async def pay(self, actor: Actor, body: PayBody, view: BillingView, commands: BillingCommands) -> PayOut: ...


class CouponMethod(PaymentMethod):
    name = "coupon"

    async def pay(self, actor: Actor, body: PayBody, view: BillingView, commands: BillingCommands) -> PayOut:
        if not body.code:
            raise Rejected("code: a coupon payment needs the coupon's code", "code")
        outcome = await commands.redeem_coupon(actor, body.code)
        return PayOut(method=self.name, status="credited", position=outcome.position,
                      credited_micros=outcome.result.micros, amount=str(outcome.result))


class BankTransferMethod(PaymentMethod):
    """Instructions only: money arrives outside ucloud and an admin records it."""

    name = "bank-transfer"

    def __init__(self, account: str) -> None:
        self.account = account  # the IBAN (or whatever the operator prints) to pay to

    async def pay(self, actor: Actor, body: PayBody, view: BillingView, commands: BillingCommands) -> PayOut:
        if body.invoice is None:
            raise Rejected("invoice: say which invoice the transfer pays", "invoice")
        invoice = view.invoices.get(body.invoice)
        if invoice is None or invoice.owner != actor.name:
            raise NotFound(f"invoice {body.invoice} does not exist")  # nor can you pay another user's
        amount = parse_money(body.amount, "amount") if body.amount else Money(invoice.total, invoice.currency)
        if amount.currency != invoice.currency:
            raise OutOfBounds("amount", f"the invoice is in {invoice.currency}, not {amount.currency}")
        shown = format_micros(amount.micros, amount.currency)
        return PayOut(method=self.name, status="pending", amount=shown, reference=invoice.reference,
                      instructions=f"transfer {shown} to {self.account} quoting {invoice.reference}; "
                                   "the account is credited when the transfer is received")


class CardMethod(PaymentMethod):
    """A card provider adapter for the intent → confirmation → signed webhook protocol."""

    name = "card"
    provider = "testcard"
    signature_header = "Provider-Signature"
    tolerance = 300  # seconds a signature's timestamp may be off (replays of old webhooks)

    def __init__(self, provider_url: str, secret: bytes, webhook_url: str) -> None:
        self.provider_url = provider_url.rstrip("/")
        self.secret = secret
        self.webhook_url = webhook_url

    async def pay(self, actor: Actor, body: PayBody, view: BillingView, commands: BillingCommands) -> PayOut:
        if not body.amount:
            raise Rejected("amount: a card payment needs an amount, e.g. '20 CHF'", "amount")
        amount = parse_money(body.amount, "amount", allow_zero=False)
        if view.currency and amount.currency != view.currency:
            raise OutOfBounds("amount", f"{amount.currency} does not match this installation's currency "
                                        f"{view.currency}")
        request = {"amount_micros": amount.micros, "currency": amount.currency, "webhook_url": self.webhook_url,
                   "metadata": {"owner": actor.name}}
        timeout = aiohttp.ClientTimeout(total=30)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session, session.post(
                    f"{self.provider_url}/v1/intents", json=request) as answer:
                created: dict[str, Any] = await answer.json(content_type=None)
                if answer.status != 201:
                    raise Rejected(f"the card provider refused the payment: {created}")
        except (aiohttp.ClientError, TimeoutError) as error:
            raise Rejected(f"the card provider cannot be reached: {error}") from None
        return PayOut(method=self.name, status="pending", amount=str(amount), intent=str(created["id"]),
                      confirm_url=str(created["confirm_url"]))

    def verify(self, headers: Any, body: bytes, now: float | None = None) -> None:
        """Nothing if the webhook's signature is right and fresh; InvalidValue otherwise."""
        header = headers.get(self.signature_header, "")
        parts = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
        if "t" not in parts or "v1" not in parts or not parts["t"].isdigit():
            raise InvalidValue(self.signature_header, "missing or malformed signature")
        expected = hmac.new(self.secret, f"{parts['t']}.".encode() + body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, parts["v1"]):
            raise InvalidValue(self.signature_header, "the signature does not match: not from the card provider")
        if abs((time.time() if now is None else now) - int(parts["t"])) > self.tolerance:
            raise InvalidValue(self.signature_header, "the signature is too old (a replay?)")


def methods_from_environment() -> dict[str, PaymentMethod]:
    """Coupons always; bank transfers with UCLOUD_BANK_ACCOUNT; cards with
    UCLOUD_CARD_PROVIDER_URL, UCLOUD_CARD_SECRET_FILE (the shared webhook secret, outside the
    log) and UCLOUD_CARD_WEBHOOK_URL (where the provider reaches this gateway's webhook)."""
    methods: dict[str, PaymentMethod] = {CouponMethod.name: CouponMethod()}
    methods[BankTransferMethod.name] = BankTransferMethod(os.environ.get("UCLOUD_BANK_ACCOUNT", "the operator's account"))
    provider = os.environ.get("UCLOUD_CARD_PROVIDER_URL")
    secret_file = os.environ.get("UCLOUD_CARD_SECRET_FILE")
    webhook = os.environ.get("UCLOUD_CARD_WEBHOOK_URL")
    if provider and secret_file and webhook:
        methods[CardMethod.name] = CardMethod(provider, Path(secret_file).read_bytes().strip(), webhook)
    return methods
