"""Money and prices: integer micro-units, exact parsing, one rounding rule."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ucloud.domain import pricing
from ucloud.domain.errors import InvalidValue, OutOfBounds
from ucloud.domain.money import CurrencyMismatch, Money, div_round, format_micros, parse_money

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


@given(st.integers(min_value=0, max_value=10**15), st.sampled_from(["CHF", "EUR", "JPY", "KWD"]))
def test_format_then_parse_gives_the_same_micros(micros: int, currency: str) -> None:
    assert parse_money(format_micros(micros, currency)) == Money(micros, currency)


@given(st.integers(min_value=-(10**18), max_value=10**18), st.integers(min_value=1, max_value=10**12))
def test_div_round_is_half_away_from_zero_of_the_exact_quotient(numerator: int, denominator: int) -> None:
    exact = Fraction(numerator, denominator)
    got = div_round(numerator, denominator)
    assert abs(Fraction(got) - exact) <= Fraction(1, 2)
    if abs(Fraction(got) - exact) == Fraction(1, 2):
        assert abs(got) > abs(exact)  # ties go away from zero


@pytest.mark.parametrize("text, micros, currency", [
    ("1.50 CHF", 1_500_000, "CHF"), ("CHF 1.5", 1_500_000, "CHF"), ("0.000001chf", 1, "CHF"),
    ("12 EUR", 12_000_000, "EUR"), ("0 CHF", 0, "CHF"),
])
def test_amounts_parse_exactly(text: str, micros: int, currency: str) -> None:
    assert parse_money(text) == Money(micros, currency)


@pytest.mark.parametrize("text, why", [
    ("-1 CHF", "negative"), ("1.0000001 CHF", "at most 6 decimals"), ("1.5", "currency exactly once"),
    ("CHF 1 EUR", "currency exactly once"), ("1,50 CHF", "not an amount"), ("1e3 CHF", "not an amount"),
    ("", "not an amount"), ("1.5 CH", "not an amount"),
])
def test_malformed_amounts_are_refused_naming_the_field(text: str, why: str) -> None:
    with pytest.raises(InvalidValue, match=why) as caught:
        parse_money(text, "amount")
    assert caught.value.field == "amount"


def test_adding_different_currencies_is_refused() -> None:
    with pytest.raises(CurrencyMismatch) as caught:
        _ = Money(1, "CHF") + Money(1, "EUR")
    assert caught.value.field == "currency"


@pytest.mark.parametrize("text, micros, per, seconds", [
    ("0.01 CHF/hour", 10_000, "hour", 3600), ("0.01CHF/h", 10_000, "hour", 3600),
    ("2 CHF / month", 2_000_000, "month", 2_592_000), ("0.000005 CHF/second", 5, "second", 1),
    ("1 CHF/min", 1_000_000, "minute", 60),
])
def test_prices_are_kept_as_written(text: str, micros: int, per: str, seconds: int) -> None:
    [event] = pricing.decide(None, pricing.SetPrice(resource="core", amount=text), NOW)
    assert isinstance(event, pricing.PriceSet)
    assert (event.micros, event.per, event.per_seconds, event.currency) == (micros, per, seconds, "CHF")
    assert event.effective_from == NOW


@pytest.mark.parametrize("resource, amount, field, why", [
    ("core", "-0.01 CHF/hour", "amount", "negative"),
    ("core", "0.01 CHF", "amount", "AMOUNT/UNIT"),
    ("core", "0.01 CHF/fortnight", "amount", "not a time unit"),
    ("gpu", "0.01 CHF/hour", "resource", "not a priced resource"),
    ("core", "abc/hour", "amount", "not an amount"),
])
def test_bad_prices_name_the_field(resource: str, amount: str, field: str, why: str) -> None:
    with pytest.raises(InvalidValue, match=why) as caught:
        pricing.decide(None, pricing.SetPrice(resource=resource, amount=amount), NOW)
    assert caught.value.field == field


def test_a_second_currency_is_refused_and_past_prices_too() -> None:
    """Both are well-formed values that this installation does not accept: OutOfBounds
    (422) naming the field, not malformed input (400)."""
    book = pricing.evolve(None, pricing.decide(None, pricing.SetPrice(resource="core", amount="1 CHF/h"), NOW)[0])
    with pytest.raises(CurrencyMismatch) as caught:
        pricing.decide(book, pricing.SetPrice(resource="ram", amount="1 EUR/h"), NOW)
    assert caught.value.field == "amount" and isinstance(caught.value, OutOfBounds)
    with pytest.raises(OutOfBounds) as past:
        pricing.decide(book, pricing.SetPrice(resource="ram", amount="1 CHF/h",
                                              effective_from=NOW - timedelta(seconds=5)), NOW)
    assert past.value.field == "effective_from"


def _schedule(*prices: tuple[int, int]) -> pricing.Schedule:
    schedule = pricing.Schedule()
    for version, (start, micros) in enumerate(prices, 1):
        schedule.add(pricing.Price(version=version, resource=pricing.Resource.CORE, micros=micros, currency="CHF",
                                   per="second", per_seconds=1, effective_from=start))
    return schedule


def test_segments_split_where_prices_change_and_later_versions_win_ties() -> None:
    schedule = _schedule((100, 1), (200, 2), (200, 3), (300, 4))
    assert list(schedule.segments("core", 50, 350)) == [(1, 100, 200), (3, 200, 300), (4, 300, 350)]
    assert list(schedule.segments("core", 0, 100)) == []  # before any price: free
    assert list(schedule.segments("core", 250, 260)) == [(3, 250, 260)]
    assert list(schedule.segments("ram", 0, 1000)) == []


@given(st.lists(st.tuples(st.integers(0, 500), st.integers(1, 10)), min_size=1, max_size=8),
       st.integers(0, 600), st.integers(0, 600))
def test_segments_cover_exactly_the_priced_seconds(prices: list[tuple[int, int]], a: int, b: int) -> None:
    schedule = _schedule(*prices)
    start, end = min(a, b), max(a, b)
    expected = {}
    for second in range(start, end):
        effective = [(t, v) for v, (t, _) in enumerate(prices, 1) if t <= second]
        if effective:
            expected[second] = max(effective)[1]
    got = {}
    for version, s, e in schedule.segments("core", start, end):
        for second in range(s, e):
            assert second not in got
            got[second] = version
    assert got == expected
