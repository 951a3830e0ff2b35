"""Money: integer micro-units of an ISO 4217 currency, never floats.

Every amount ucloud records is an integer count of micro-units (1e-6 of the currency's
main unit: 1 CHF = 1,000,000 micros), so per-second prices like 0.000005 CHF stay exact.
Rounding happens in one place (``div_round``: half away from zero) and only where an
exact rational has to become an amount: once per invoice line (docs/billing.md).
"""

from __future__ import annotations

import re

import msgspec

from .errors import InvalidValue, OutOfBounds

MICROS = 1_000_000
MAX_DECIMALS = 6

# Minor-unit exponents that are not 2 (ISO 4217); only used to show amounts.
_EXPONENTS = {"JPY": 0, "KRW": 0, "ISK": 0, "CLP": 0, "VND": 0, "BHD": 3, "KWD": 3, "OMR": 3, "JOD": 3, "TND": 3}
MAX_WHOLE_DIGITS = 12  # under 10**12 of a currency: micros stay far within a signed 64-bit integer
_CURRENCY = re.compile(r"[A-Z]{3}", re.ASCII)
# What the API declares an amount to be (the OpenAPI pattern, ECMA-262 and Python alike):
# the currency exactly once, before or after, at most one space; never negative.
AMOUNT_BODY = (r"(?:[A-Za-z]{3} ?[0-9]{1,12}(?:\.[0-9]{1,6})?"
                r"|[0-9]{1,12}(?:\.[0-9]{1,6})? ?[A-Za-z]{3})")
AMOUNT_PATTERN = f"^{AMOUNT_BODY}$"
AMOUNT_MAX_LENGTH = 24
AMOUNT_RULE = "an amount with its currency once, never negative, at most 6 decimals: '0.50 CHF' or 'CHF 0.50'"
# A wider grammar, read only to say precisely what is wrong; on a capped length, fullmatch.
_AMOUNT = re.compile(r" *(?:([A-Za-z]{3}) *)?(-?)([0-9]+)(?:\.([0-9]+))? *([A-Za-z]{3})? *", re.ASCII)
_READ_AT_MOST = 64


class CurrencyMismatch(OutOfBounds):
    """Two amounts (or an amount and the installation's prices) are in different currencies:
    each well-formed, not acceptable together (422 naming the field)."""


class Money(msgspec.Struct, frozen=True, gc=False):
    micros: int
    currency: str

    def __add__(self, other: Money) -> Money:
        require_same(self.currency, other.currency)
        return Money(self.micros + other.micros, self.currency)

    def __sub__(self, other: Money) -> Money:
        require_same(self.currency, other.currency)
        return Money(self.micros - other.micros, self.currency)

    def __str__(self) -> str:
        return format_micros(self.micros, self.currency)


def require_same(expected: str, got: str, field: str = "currency") -> None:
    if expected != got:
        raise CurrencyMismatch(field, f"{got} does not match this installation's currency {expected}")


def check_currency(code: str, field: str = "currency") -> str:
    if not _CURRENCY.fullmatch(code):
        raise InvalidValue(field, f"{code!r} is not an ISO 4217 currency code (three capital letters, e.g. CHF)")
    return code


def parse_money(text: str, field: str = "amount", *, allow_zero: bool = True) -> Money:
    """'1.50 CHF', 'CHF 1.50', '0.000005CHF' -> Money. Exactly one currency code, at most six
    decimals, never negative. Raises InvalidValue naming ``field`` (OutOfBounds for a zero
    amount where none is allowed). Linear: the length is capped before a fullmatch."""
    match = _AMOUNT.fullmatch(text) if isinstance(text, str) and len(text) <= _READ_AT_MOST else None
    if not match:
        raise InvalidValue(field, f"{text!r} is not an amount; write e.g. '0.50 CHF'")
    before, sign, whole, fraction, after = match.groups()
    if sign:
        raise InvalidValue(field, f"{text!r}: an amount must not be negative")
    if (before is None) == (after is None):
        raise InvalidValue(field, f"{text!r}: give the currency exactly once, e.g. '0.50 CHF'")
    fraction = fraction or ""
    if len(fraction) > MAX_DECIMALS:
        raise InvalidValue(field, f"{text!r}: at most {MAX_DECIMALS} decimals (micro-units)")
    if len(whole) > MAX_WHOLE_DIGITS:
        raise InvalidValue(field, f"{text!r}: at most {MAX_WHOLE_DIGITS} digits before the decimal point")
    currency = check_currency((before or after or "").upper(), field)
    micros = int(whole) * MICROS + int(fraction.ljust(MAX_DECIMALS, "0") or "0")
    if not allow_zero and micros == 0:
        raise OutOfBounds(field, f"{text!r}: must be more than zero")
    return Money(micros, currency)


def exponent(currency: str) -> int:
    return _EXPONENTS.get(currency, 2)


def format_micros(micros: int, currency: str) -> str:
    """12345 CHF-micros -> '0.012345 CHF'; 1500000 -> '1.50 CHF': at least the currency's
    minor digits, more only when the amount has them."""
    sign = "-" if micros < 0 else ""
    whole, fraction = divmod(abs(micros), MICROS)
    digits = f"{fraction:06d}".rstrip("0")
    digits = digits.ljust(exponent(currency), "0")
    return f"{sign}{whole}{'.' + digits if digits else ''} {currency}"


def div_round(numerator: int, denominator: int) -> int:
    """numerator / denominator rounded half away from zero, in integers (exact)."""
    if denominator <= 0:
        raise ValueError("denominator must be positive")
    quotient, remainder = divmod(abs(numerator), denominator)
    if 2 * remainder >= denominator:
        quotient += 1
    return quotient if numerator >= 0 else -quotient
