"""Sizes as users write them, normalised to bytes.

The seeds ask that MB, Mb, mB and mb all mean megabytes; we follow QEMU and treat
every unit as binary (1 MB = 1 MiB = 2**20 bytes), so "512MB" of RAM is exactly what
the guest gets. "MiB" and friends are accepted too. A bare number is bytes.

The grammar is checked with ``fullmatch`` of an unambiguous, ASCII-only pattern on a
string whose length is capped first, and the arithmetic is exact integer arithmetic
(no float), so parsing takes time linear in a short input and a number of hundreds of
digits cannot overflow: it is refused by length, or its value by a limit.
"""

from __future__ import annotations

import re

from .errors import InvalidValue, OutOfBounds

SIZE_MAX_LENGTH = 48
# The same text is the OpenAPI pattern (ECMA-262 and Python read it alike here).
SIZE_PATTERN = r"^([0-9]{1,20})(\.[0-9]{1,20})?(?: ?([KMGTPkmgtp])([Ii])?[Bb]?| ?[Bb])?$"
CORES_PATTERN = r"^[0-9]{1,7}$"
_SIZE = re.compile(SIZE_PATTERN[1:-1], re.ASCII)
_CORES = re.compile(CORES_PATTERN[1:-1], re.ASCII)
_EXPONENT = {"k": 1, "m": 2, "g": 3, "t": 4, "p": 5}
_EXAMPLES = "write e.g. 512MB, 2GiB or 1T (binary units), or a number of bytes"


def _shown(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:32] + "…")


def parse_size(text: str | int, field: str = "size") -> int:
    """'2GB', '512mb', '2 GiB', '1T', 1024 -> bytes.

    InvalidValue (400) naming ``field`` when the text is not a size; OutOfBounds (422)
    when it is one but not a positive whole number of bytes. Upper bounds are the
    caller's (domain.limits)."""
    if isinstance(text, bool) or not isinstance(text, int | str):
        raise InvalidValue(field, f"expected a size: {_EXAMPLES}")
    if isinstance(text, int):
        if text <= 0:
            raise OutOfBounds(field, f"must be positive, got {text}")
        return text
    match = _SIZE.fullmatch(text) if len(text) <= SIZE_MAX_LENGTH else None
    if match is None:
        raise InvalidValue(field, f"{_shown(text)} is not a size; {_EXAMPLES}")
    whole, fraction, unit, _ = match.groups()
    fraction = (fraction or ".")[1:]
    scale = 10 ** len(fraction)
    # Exact: (whole + fraction / scale) * 1024**exponent, in integers.
    numerator = (int(whole) * scale + int(fraction or "0")) * 1024 ** _EXPONENT.get((unit or "").lower(), 0)
    value, remainder = divmod(numerator, scale)
    if remainder:
        raise OutOfBounds(field, f"{_shown(text)} is not a whole number of bytes")
    if value <= 0:
        raise OutOfBounds(field, f"must be positive, got {_shown(text)}")
    return value


def format_size(value: int) -> str:
    """Bytes -> the largest exact binary unit: 536870912 -> '512MiB'."""
    for exponent, unit in ((4, "TiB"), (3, "GiB"), (2, "MiB"), (1, "KiB")):
        if value and value % (1024**exponent) == 0:
            return f"{value // 1024**exponent}{unit}"
    return f"{value}B"


def readable_size(value: int) -> str:
    """Bytes for a person, rounded to one decimal when it is not exact: '22 GiB', '1.5 TiB'."""
    for exponent, unit in ((5, "PiB"), (4, "TiB"), (3, "GiB"), (2, "MiB"), (1, "KiB")):
        step = 1024**exponent
        if value >= step:
            if value % step == 0:
                return f"{value // step} {unit}"
            return f"{value / step:.1f} {unit}"
    return f"{value} B"


def parse_cores(value: str | int, field: str = "cores") -> int:
    """A whole number of cores, as an int or ASCII digits; OutOfBounds below 1.
    Upper bounds are the caller's (domain.limits)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidValue(field, "must be a whole number of cores")
    if isinstance(value, str):
        if len(value) > 7 or not _CORES.fullmatch(value):
            raise InvalidValue(field, f"{_shown(value)} is not a whole number of cores")
        value = int(value)
    if value < 1:
        raise OutOfBounds(field, f"must be at least 1, got {value}")
    return value
