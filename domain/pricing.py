"""Prices: what one unit of a resource costs per unit of time, versioned, from a time on.

An admin writes ``0.01 CHF/hour`` for a core, or ``2 CHF/month`` for a GiB of disk. The
price is kept exactly as written: integer micros per ``per_seconds`` seconds per
``QUANTUM`` of the resource (1 core, 1 GiB = 2**30 bytes). Nothing is converted to a
per-second rate in floating point: usage is integer quantity-seconds (core-seconds,
byte-seconds) and the amount of a line is ``quantity_seconds * micros / (per_seconds *
QUANTUM)``, rounded once (money.div_round). A month is 30 days (2,592,000 s).

Every ``price.set`` is a version of the one installation-wide price book (stream
``pricebook``): the version number is the event's place in that stream. A price applies
from ``effective_from`` (never in the past when set) until a later one for the same
resource takes over; the first price fixes the installation's currency.
"""

from __future__ import annotations

import bisect
import enum
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from uuid import UUID

import msgspec

from .errors import InvalidValue, OutOfBounds
from .events import Command, Event
from .money import AMOUNT_BODY, AMOUNT_MAX_LENGTH, check_currency, parse_money, require_same

PRICEBOOK_ID = uuid.UUID("6f1f1d2e-8d53-4c1e-9a0e-4b2f5bd0c012")
GIB = 1 << 30


class Resource(enum.StrEnum):
    CORE = "core"
    RAM = "ram"
    DISK = "disk"
    NETWORK = "network"
    IMAGE_STORAGE = "image-storage"


# The quantity one price is for, in the unit usage is counted in (cores, bytes, networks).
QUANTUM: dict[str, int] = {
    Resource.CORE: 1, Resource.RAM: GIB, Resource.DISK: GIB, Resource.NETWORK: 1, Resource.IMAGE_STORAGE: GIB,
}
QUANTUM_NAME: dict[str, str] = {
    Resource.CORE: "core", Resource.RAM: "GiB", Resource.DISK: "GiB", Resource.NETWORK: "network",
    Resource.IMAGE_STORAGE: "GiB",
}
_RESOURCE_ALIASES = {"cores": "core", "cpu": "core", "memory": "ram", "image": "image-storage",
                     "images": "image-storage", "image_storage": "image-storage", "net": "network"}

# Time units a price may be per; a month is 30 days.
PER_SECONDS: dict[str, int] = {"second": 1, "minute": 60, "hour": 3600, "day": 86400, "month": 30 * 86400}
_PER_ALIASES = {"s": "second", "sec": "second", "seconds": "second", "min": "minute", "minutes": "minute",
                "h": "hour", "hr": "hour", "hours": "hour", "d": "day", "days": "day", "mo": "month",
                "months": "month"}


def parse_resource(text: str, field: str = "resource") -> Resource:
    name = (text or "").strip().lower()
    name = _RESOURCE_ALIASES.get(name, name)
    try:
        return Resource(name)
    except ValueError:
        raise InvalidValue(field, f"{text!r} is not a priced resource; one of "
                                  f"{', '.join(r.value for r in Resource)}") from None


def parse_per(text: str, field: str = "amount") -> str:
    unit = _PER_ALIASES.get(text.strip().lower(), text.strip().lower())
    if unit not in PER_SECONDS:
        raise InvalidValue(field, f"{text!r} is not a time unit; one of {', '.join(PER_SECONDS)}")
    return unit


# What the API declares a price to be (the OpenAPI pattern): an amount, "/", a time unit
# (one optional space either side of the slash).
_UNITS = sorted({*PER_SECONDS, *_PER_ALIASES}, key=lambda unit: (-len(unit), unit))
PRICE_PATTERN = f"^{AMOUNT_BODY} ?/ ?(?:{'|'.join(_UNITS)})$"
PRICE_MAX_LENGTH = AMOUNT_MAX_LENGTH + 10
PRICE_RULE = ("AMOUNT/UNIT: an amount with its currency once, never negative, then a time unit (second, minute, hour, day, "
              "month), e.g. '0.01 CHF/hour'")
_READ_AT_MOST = 80


def parse_price(text: str, field: str = "amount") -> tuple[int, str, str]:
    """'0.01 CHF/hour' -> (micros, currency, per). Raises InvalidValue naming ``field``.
    Split at the last '/', no regular expression over the whole text: linear."""
    if not isinstance(text, str) or len(text) > _READ_AT_MOST or "/" not in text:
        raise InvalidValue(field, f"{text!r:.80} is not a price; write AMOUNT/UNIT, e.g. '0.01 CHF/hour'")
    amount, _, unit = text.rpartition("/")
    money = parse_money(amount.rstrip(" "), field)
    return money.micros, money.currency, parse_per(unit, field)


def epoch_seconds(when: datetime) -> int:
    """Whole seconds since the epoch (floor): the one clock resolution of billing."""
    if when.tzinfo is None:
        raise ValueError("naive datetime")
    return int(when.timestamp() // 1)


# -- events, commands, state -------------------------------------------------------------


class PriceSet(Event, tag="price.set", frozen=True):
    """An admin set the price of a resource from ``effective_from`` on: ``micros`` per
    ``per`` (``per_seconds`` seconds) per quantum (1 core, 1 GiB, 1 network)."""

    resource: Resource
    micros: int
    currency: str
    per: str
    per_seconds: int
    effective_from: datetime


PRICING_EVENT_TYPES: tuple[type[Event], ...] = (PriceSet,)


class SetPrice(Command, tag="price.set", frozen=True):
    resource: str
    amount: str  # "0.01 CHF/hour"
    effective_from: datetime | None = None


class Price(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    version: int
    resource: Resource
    micros: int
    currency: str
    per: str
    per_seconds: int
    effective_from: int  # epoch seconds

    @property
    def denominator(self) -> int:
        return self.per_seconds * QUANTUM[self.resource]


class Pricebook(msgspec.Struct, frozen=True, kw_only=True):
    currency: str
    prices: tuple[Price, ...] = ()


def evolve(book: Pricebook | None, event: Event) -> Pricebook | None:
    if not isinstance(event, PriceSet):
        return book
    prices = book.prices if book else ()
    price = Price(version=len(prices) + 1, resource=event.resource, micros=event.micros, currency=event.currency,
                  per=event.per, per_seconds=event.per_seconds, effective_from=epoch_seconds(event.effective_from))
    return Pricebook(currency=book.currency if book else event.currency, prices=(*prices, price))


def decide(book: Pricebook | None, command: SetPrice, now: datetime) -> list[Event]:
    """Validate and record a price. ``now`` is the handler's clock (the domain reads none)."""
    resource = parse_resource(command.resource)
    micros, currency, per = parse_price(command.amount)
    check_currency(currency)
    if book is not None:
        require_same(book.currency, currency, "amount")
    effective = command.effective_from or now
    if effective.tzinfo is None:
        raise InvalidValue("effective_from", "give a time zone (e.g. 2026-01-01T00:00:00Z)")
    if epoch_seconds(effective) < epoch_seconds(now):
        raise OutOfBounds("effective_from", "must not be in the past: billed usage is never re-priced")
    return [PriceSet(resource=resource, micros=micros, currency=currency, per=per,
                     per_seconds=PER_SECONDS[per], effective_from=effective.astimezone(UTC))]


def stream_name(_: UUID = PRICEBOOK_ID) -> str:
    return "pricebook"


class Schedule:
    """The prices of each resource over time, for metering: which price is effective at a
    second, and how an interval splits where prices change. Mutable, fed in log order."""

    __slots__ = ("_prices", "_starts", "currency")

    def __init__(self) -> None:
        self._starts: dict[str, list[tuple[int, int]]] = {}  # resource -> sorted (effective_from, version)
        self._prices: dict[int, Price] = {}
        self.currency: str | None = None

    def add(self, price: Price) -> None:
        self._prices[price.version] = price
        if self.currency is None:
            self.currency = price.currency
        bisect.insort(self._starts.setdefault(price.resource, []), (price.effective_from, price.version))

    @property
    def count(self) -> int:
        return len(self._prices)

    def price(self, version: int) -> Price:
        return self._prices[version]

    def all(self) -> list[Price]:
        return [self._prices[v] for v in sorted(self._prices)]

    def latest(self, resource: str, start: int) -> int:
        """The version in force from ``start`` on for good (no change after it); 0 if prices
        change later or none is set. The fast path of metering."""
        starts = self._starts.get(resource)
        if starts and starts[-1][0] <= start:
            return starts[-1][1]
        return 0

    def segments(self, resource: str, start: int, end: int) -> Iterator[tuple[int, int, int]]:
        """(version, seconds from, seconds to) covering [start, end) where a price applies.
        At equal effective times the later version wins; unpriced stretches are free."""
        starts = self._starts.get(resource)
        if not starts or start >= end:
            return
        # The last change at or before ``start``: (start, big) sorts after every version at start.
        index = bisect.bisect_right(starts, (start, 1 << 62)) - 1
        cursor = start
        while cursor < end:
            next_index = index + 1  # entries after ``index`` start strictly later
            upto = min(starts[next_index][0], end) if next_index < len(starts) else end
            if index >= 0 and upto > cursor:
                yield starts[index][1], cursor, upto
            cursor = upto
            if next_index >= len(starts):
                break
            index = next_index  # several versions at one time: the last one counts
            while index + 1 < len(starts) and starts[index + 1][0] == starts[index][0]:
                index += 1

    def dump(self) -> list[Price]:
        return self.all()

    @classmethod
    def load(cls, prices: list[Price]) -> Schedule:
        schedule = cls()
        for price in prices:
            schedule.add(price)
        return schedule
