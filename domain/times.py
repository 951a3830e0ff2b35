"""Points in time as users write them: RFC 3339 with a time zone, read without surprises.

The API declares the text form (``TIME_PATTERN``, the OpenAPI pattern: a date, ``T``, a
time, optional fraction, ``Z`` or an offset); text of that form that names no real
moment (month 13, 24:00, a leap second) is well-formed but not a time here: 422 naming
the field, not 400. The check caps the length and uses ``fullmatch`` (ASCII digits only).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from .errors import InvalidValue, OutOfBounds

TIME_PATTERN = (r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,9})?"
                r"(?:[Zz]|[+-][0-9]{2}:[0-9]{2})$")
TIME_MAX_LENGTH = 35
TIME_RULE = "an RFC 3339 time with a time zone, e.g. 2027-01-01T00:00:00Z"
_TIME = re.compile(TIME_PATTERN[1:-1], re.ASCII)


def parse_time(text: str, field: str) -> datetime:
    """'2027-01-01T00:00:00Z' -> an aware datetime in UTC (microseconds: a longer fraction is cut)."""
    if not isinstance(text, str) or len(text) > TIME_MAX_LENGTH or not _TIME.fullmatch(text):
        raise InvalidValue(field, f"{text!r:.60} is not {TIME_RULE}")
    date, time = text[:10], text[11:].upper()
    zone_at = len(time) - 1 if time.endswith("Z") else len(time) - 6
    clock, zone = time[:zone_at], time[zone_at:]
    if "." in clock:
        seconds, fraction = clock.split(".")
        clock = f"{seconds}.{fraction[:6].ljust(6, '0')}"
    try:
        # In UTC: a moment whose offset takes it past year 1 or 9999 is refused here, not later.
        return datetime.fromisoformat(f"{date}T{clock}{'+00:00' if zone == 'Z' else zone}").astimezone(UTC)
    except (ValueError, OverflowError) as error:
        raise OutOfBounds(field, f"{text!r} is not a real moment ({error})") from None
