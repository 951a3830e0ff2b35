"""Sizes as users write them, normalised to bytes.

The seeds ask that MB, Mb, mB and mb all mean megabytes; we follow QEMU and treat
every unit as binary (1 MB = 1 MiB = 2**20 bytes), so "512MB" of RAM is exactly what
the guest gets. "MiB" and friends are accepted too. A bare number is bytes.
"""

from __future__ import annotations

import re

from .errors import InvalidValue

_UNITS = {"": 0, "b": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str | int, field: str = "size") -> int:
    """'2GB', '512mb', '2 GiB', '1T', 1024 -> bytes. Raises InvalidValue naming ``field``."""
    if isinstance(text, bool):
        raise InvalidValue(field, "expected a size like 512MB or 2GiB")
    if isinstance(text, int):
        if text <= 0:
            raise InvalidValue(field, f"must be positive, got {text}")
        return text
    match = _SIZE.match(text)
    if not match:
        raise InvalidValue(field, f"{text!r} is not a size; write e.g. 512MB, 2GiB or 1T")
    number, unit, suffix = match.groups()
    if suffix.lower() == "i":  # "Gi" without the B
        suffix = "ib"
    if unit == "" and suffix.lower() in ("ib",):
        raise InvalidValue(field, f"{text!r} is not a size; write e.g. 512MB, 2GiB or 1T")
    value = float(number) * (1024 ** _UNITS[unit.lower()])
    if value != int(value):
        raise InvalidValue(field, f"{text!r} is not a whole number of bytes")
    if value <= 0:
        raise InvalidValue(field, f"must be positive, got {text!r}")
    return int(value)


def format_size(value: int) -> str:
    """Bytes -> the largest exact binary unit: 536870912 -> '512MiB'."""
    for exponent, unit in ((4, "TiB"), (3, "GiB"), (2, "MiB"), (1, "KiB")):
        if value and value % (1024**exponent) == 0:
            return f"{value // 1024**exponent}{unit}"
    return f"{value}B"


def parse_cores(value: str | int, field: str = "cores") -> int:
    if isinstance(value, bool):
        raise InvalidValue(field, "must be a whole number of cores")
    try:
        cores = int(value)
    except (TypeError, ValueError):
        raise InvalidValue(field, f"{value!r} is not a whole number of cores") from None
    if isinstance(value, str) and value.strip() != str(cores):
        raise InvalidValue(field, f"{value!r} is not a whole number of cores")
    if not 1 <= cores <= 1024:
        raise InvalidValue(field, f"must be between 1 and 1024, got {cores}")
    return cores
