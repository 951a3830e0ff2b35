"""ucloud-audit's own parsing: times (ISO 8601 and durations ago), name patterns, summaries."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from ucloud.cli.audit import Pattern, parse_when, summarise

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(("text", "ago"), [
    ("30s", timedelta(seconds=30)),
    ("10m", timedelta(minutes=10)),
    ("2h", timedelta(hours=2)),
    ("1d", timedelta(days=1)),
    ("1w", timedelta(weeks=1)),
    ("1h30m", timedelta(hours=1, minutes=30)),
    ("0s", timedelta()),
    (" 5m ", timedelta(minutes=5)),
    ("now", timedelta()),
])
def test_durations_are_ago_from_now(text: str, ago: timedelta) -> None:
    assert parse_when(text, NOW) == NOW - ago


def test_iso_times() -> None:
    assert parse_when("2024-04-30T08:15:00Z", NOW) == datetime(2024, 4, 30, 8, 15, tzinfo=UTC)
    assert parse_when("2024-04-30T10:15:00+02:00", NOW) == datetime(2024, 4, 30, 8, 15, tzinfo=UTC)
    assert parse_when("2024-04-30 08:15:00.250", NOW) == datetime(2024, 4, 30, 8, 15, 0, 250000, tzinfo=UTC)
    naive = parse_when("2024-04-30T08:15", NOW)
    assert naive.tzinfo is UTC  # a time without zone is UTC, like the log's own times
    assert parse_when("2024-04-30", NOW) == datetime(2024, 4, 30, tzinfo=UTC)
    offset = parse_when("2024-04-30T08:15:00-05:00", NOW)
    assert offset.utcoffset() == timezone(timedelta(hours=-5)).utcoffset(None)


@pytest.mark.parametrize("text", ["", "10", "10x", "10M", "-5m", "5 m", "m", "yesterday", "2024-13-01", "1h-30m"])
def test_bad_times_name_the_accepted_forms(text: str) -> None:
    with pytest.raises(ValueError) as error:
        parse_when(text, NOW)
    assert f"{text!r} is not a time" in str(error.value)
    assert "ISO 8601" in str(error.value) and "10m" in str(error.value)


def test_durations_too_far_back() -> None:
    with pytest.raises(ValueError, match="reaches too far back"):
        parse_when("99999999999w", NOW)


def test_patterns() -> None:
    exact = Pattern.parse("vm-a", "stream")
    assert exact.matches("vm-a") and not exact.matches("vm-ab") and not exact.matches("vm")
    prefix = Pattern.parse("vm-*", "stream")
    assert prefix.matches("vm-a") and prefix.matches("vm-") and not prefix.matches("vmx")
    assert Pattern.parse("*", "type").matches("anything")
    with pytest.raises(ValueError, match="'\\*' may only stand at the end"):
        Pattern.parse("vm-*-x", "stream")
    with pytest.raises(ValueError, match="'\\*' may only stand at the end"):
        Pattern.parse("**", "type")
    with pytest.raises(ValueError, match="an empty actor pattern"):
        Pattern.parse("", "actor")


def test_summaries_of_event_data() -> None:
    assert summarise(b'{"owner":"alice","cores":2,"ram":2147483648}') == "owner=alice cores=2 ram=2147483648"
    assert summarise(b'{"note":"two words","tags":["a","b"],"x":null}') == 'note="two words" tags=["a","b"] x=null'
    assert summarise(b'{}') == "{}"
    assert summarise(b'[1,2]') == "[1,2]"
    assert summarise(b'"plain"') == "plain"
    assert summarise(b"\x00\x01binary") == "<8 bytes, not JSON>"
