"""The one rule for names: VMs, SSH keys, networks, images, and each label of a host name.

A name is a DNS label, lower case: 1 to 63 characters from a-z, 0-9 and '-', starting
and ending with a letter or digit. It can then serve as a guest's hostname, a DNS
record, a file name and a URL path segment without quoting. Host names are DNS names:
such labels joined by dots, 253 characters at most.

The check caps the length first and then uses ``fullmatch`` on an ASCII-only pattern,
so it runs in time linear in (and bounded by) the cap, and "web\\n" or Unicode look-alikes
are refused (Python's ``$`` would accept a trailing newline).
"""

from __future__ import annotations

import re

from .errors import InvalidValue

NAME_MAX_LENGTH = 63
HOSTNAME_MAX_LENGTH = 253
# The same text serves as the OpenAPI pattern (ECMA-262: "$" is the very end there).
NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
HOSTNAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$"
_NAME = re.compile(NAME_PATTERN[1:-1], re.ASCII)
_HOSTNAME = re.compile(HOSTNAME_PATTERN[1:-1], re.ASCII)
NAME_RULE = "1-63 lower-case letters, digits and '-', starting and ending with a letter or digit"


def _shown(value: str) -> str:
    return repr(value if len(value) <= 70 else value[:64] + "…")


def check_name(value: object, field: str = "name") -> str:
    """``value`` if it is a valid name, else InvalidValue naming ``field``."""
    if not isinstance(value, str):
        raise InvalidValue(field, "must be a string")
    if len(value) > NAME_MAX_LENGTH or not _NAME.fullmatch(value):
        raise InvalidValue(field, f"{_shown(value)} is not a name: use {NAME_RULE}")
    return value


def check_hostname(value: object, field: str = "hostname") -> str:
    """``value`` if it is a DNS name whose every label follows the name rule."""
    if not isinstance(value, str):
        raise InvalidValue(field, "must be a string")
    if len(value) > HOSTNAME_MAX_LENGTH or not _HOSTNAME.fullmatch(value):
        raise InvalidValue(field, f"{_shown(value)} is not a host name: use labels of {NAME_RULE}, "
                                  f"joined by dots, {HOSTNAME_MAX_LENGTH} characters at most")
    return value


def is_name(value: str) -> bool:
    return len(value) <= NAME_MAX_LENGTH and _NAME.fullmatch(value) is not None


# Who owns a resource: a user name of the directory (LDAP or built-in). Wider than the
# name rule, as directories are; still ASCII without spaces or control characters.
USER_NAME_MAX_LENGTH = 256
USER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,255}$"
_USER_NAME = re.compile(USER_NAME_PATTERN[1:-1], re.ASCII)


def check_user_name(value: object, field: str = "owner") -> str:
    if not isinstance(value, str):
        raise InvalidValue(field, "must be a string")
    if len(value) > USER_NAME_MAX_LENGTH or not _USER_NAME.fullmatch(value):
        raise InvalidValue(field, f"{_shown(value)} is not a user name: 1-256 ASCII letters, digits "
                                  "and ._@+-, starting with a letter or digit")
    return value
