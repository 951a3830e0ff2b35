"""Sizes as users write them."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ucloud.domain.errors import InvalidValue
from ucloud.domain.units import format_size, parse_cores, parse_size

MiB, GiB, TiB = 2**20, 2**30, 2**40


@pytest.mark.parametrize(
    ("text", "expected"),
    [("512MB", 512 * MiB), ("512mb", 512 * MiB), ("512Mb", 512 * MiB), ("512mB", 512 * MiB),
     ("2 GiB", 2 * GiB), ("2gb", 2 * GiB), ("2G", 2 * GiB), ("1T", TiB), ("1 TiB", TiB), ("1.5GB", 3 * GiB // 2),
     ("4096", 4096), (4096, 4096), ("10k", 10 * 1024)],
)
def test_sizes_as_users_write_them(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "2XB", "GB", "-1GB", "0", "1.3B", "two gigs", "1 2 GB"])
def test_bad_sizes_name_the_field(text: str) -> None:
    with pytest.raises(InvalidValue, match="^ram: "):
        parse_size(text, "ram")


@given(st.integers(1, 2**50))
def test_format_then_parse_round_trips(value: int) -> None:
    assert parse_size(format_size(value)) == value


@pytest.mark.parametrize("bad", ["0", "-2", "1.5", "x", True, 2000])
def test_bad_core_counts(bad: object) -> None:
    with pytest.raises(InvalidValue, match="^cores: "):
        parse_cores(bad)  # type: ignore[arg-type]


def test_cores_accept_numbers_and_numeric_strings() -> None:
    assert parse_cores("4") == 4 and parse_cores(2) == 2
