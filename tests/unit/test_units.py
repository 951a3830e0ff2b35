"""Sizes as users write them."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ucloud.domain.errors import InvalidValue, OutOfBounds
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


@pytest.mark.parametrize("text", ["", "2XB", "GB", "-1GB", "two gigs", "1 2 GB", "2GB\n", " 2GB", "2  GB",
                                  "١٢GB", "1" + " " * 30 + "x", "9" * 49, "2Gi B", "2iB"])
def test_bad_sizes_name_the_field(text: str) -> None:
    with pytest.raises(InvalidValue, match="^ram: "):
        parse_size(text, "ram")


@pytest.mark.parametrize("text", ["0", "0.0G", "1.3B", "0.1K"])
def test_sizes_that_are_not_a_positive_whole_number_of_bytes_are_out_of_bounds(text: str) -> None:
    with pytest.raises(OutOfBounds, match="^ram: ") as raised:
        parse_size(text, "ram")
    assert raised.value.field == "ram"


def test_a_size_of_many_digits_is_exact_and_never_goes_through_float() -> None:
    assert parse_size("9" * 20 + "P") == int("9" * 20) * 1024**5
    assert parse_size("0.5K") == 512
    with pytest.raises(OutOfBounds, match="whole number"):
        parse_size("1.00000000000000000001P")


@given(st.text(alphabet=" 1xGiB.\n\t", max_size=60))
def test_any_text_is_a_size_or_a_clear_error(text: str) -> None:
    try:
        assert parse_size(text, "disk") > 0
    except (InvalidValue, OutOfBounds) as error:
        assert str(error).startswith("disk: ")


@given(st.integers(1, 2**50))
def test_format_then_parse_round_trips(value: int) -> None:
    assert parse_size(format_size(value)) == value


@pytest.mark.parametrize("bad", ["-2", "1.5", "x", True, "١٢", "2\n", " 2", "12345678"])
def test_bad_core_counts(bad: object) -> None:
    with pytest.raises(InvalidValue, match="^cores: "):
        parse_cores(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["0", 0, -3])
def test_core_counts_below_one_are_out_of_bounds(bad: object) -> None:
    with pytest.raises(OutOfBounds, match="^cores: "):
        parse_cores(bad)  # type: ignore[arg-type]


def test_cores_accept_numbers_and_numeric_strings() -> None:
    assert parse_cores("4") == 4 and parse_cores(2) == 2
