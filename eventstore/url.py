"""Store URLs: one string names a log, for every tool that opens one (``ucloud-audit``,
``ucloud up --store``, daemons' configuration).

    sqlite:///var/lib/ucloud/log.sqlite     a SQLite file; everything after ``sqlite://`` is
                                            the path, so three slashes make it absolute
    sqlite://log.sqlite                     relative to the working directory
    /var/lib/ucloud/log.sqlite              a bare path (no ``scheme://``) is a SQLite file too
    etcd://10.0.0.1:2379,10.0.0.2:2379/v1   etcd members and the key prefix of the log
    etcd://[2001:db8::1]:2379               IPv6 addresses in brackets; default prefix /v1
    etcd://h:2379?timeout=2&max_txn_ops=1024   options of the etcd backend
    etcd://h:2379?ca=/etc/ucloud/etcd/ca.pem&cert=/etc/ucloud/etcd/me.pem&key=/etc/ucloud/etcd/me-key.pem
                                            TLS: verify the server with ``ca``, present a client
                                            certificate; ``user`` and ``password_file`` for etcd's
                                            own authentication (never a password in the URL);
                                            ``server_name`` to check another name than the host
    memory://                               a fresh, empty log inside this process (tests, demos)

Parsed by hand rather than with ``urllib.parse``: ``urlsplit`` knows one host per URL and
would take an endpoint list for a single netloc, and the grammar is this small.
"""

from __future__ import annotations

import ipaddress
import re
import sqlite3
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qsl

from .interface import EventStore

Scheme = Literal["sqlite", "etcd", "memory"]

DEFAULT_ETCD_PREFIX = "/v1"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_SCHEME_NO_SLASHES = re.compile(r"^(sqlite|etcd|memory):(?!//)", re.IGNORECASE)
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\.?$")
_PREFIX_SEGMENT = re.compile(r"^[A-Za-z0-9_.:@=+-]+$")
_FORMS = (
    "sqlite:///path/to/log.sqlite, a bare path, "
    "etcd://host:port[,host:port...][/prefix] or memory://"
)
# Options an etcd URL may carry, and how to read them.
_ETCD_OPTIONS: dict[str, type[int] | type[float]] = {
    "timeout": float,
    "append_timeout": float,
    "max_txn_ops": int,
    "max_txn_bytes": int,
}
# Options that say how to reach a secured etcd (eventstore/etcd_client.py, EtcdSecurity):
# file paths and names, taken as written.
_ETCD_SECURITY_OPTIONS = {"ca": "ca_file", "cert": "cert_file", "key": "key_file", "user": "user",
                          "password_file": "password_file", "server_name": "server_name"}


class InvalidStoreUrl(ValueError):
    """A store URL that cannot name a log; the message says what is wrong with it."""


@dataclass(frozen=True)
class StoreLocation:
    """A parsed store URL."""

    scheme: Scheme
    path: Path | None = None
    endpoints: tuple[str, ...] = ()
    prefix: str = DEFAULT_ETCD_PREFIX
    options: dict[str, int | float] = field(default_factory=dict)
    security: dict[str, str] = field(default_factory=dict)  # EtcdSecurity's fields

    def __str__(self) -> str:
        if self.scheme == "sqlite":
            return f"sqlite://{self.path}"
        if self.scheme == "etcd":
            return f"etcd://{','.join(self.endpoints)}{self.prefix}"
        return "memory://"


def parse_store_url(url: str) -> StoreLocation:
    """Parse a store URL; raise InvalidStoreUrl naming what is wrong."""
    text = url.strip()
    if not text:
        raise InvalidStoreUrl(f"the store URL is empty: expected {_FORMS}")
    if _SCHEME_NO_SLASHES.match(text):
        scheme = text.split(":", 1)[0]
        raise InvalidStoreUrl(f"store URL {url!r} lacks '//' after '{scheme}:': write {scheme.lower()}://...")
    match = _SCHEME.match(text)
    if match is None:
        return _sqlite(url, text)
    scheme, rest = match.group(1).lower(), text[match.end():]
    if scheme == "sqlite":
        if "?" in rest or "#" in rest:
            raise InvalidStoreUrl(
                f"store URL {url!r}: a sqlite URL takes no options ('?' or '#'); "
                "give a path with such characters as a bare path"
            )
        if not rest:
            raise InvalidStoreUrl(f"store URL {url!r} names no file: write sqlite:///path/to/log.sqlite")
        return _sqlite(url, rest)
    if scheme == "etcd":
        return _etcd(url, rest)
    if scheme == "memory":
        if rest:
            raise InvalidStoreUrl(f"store URL {url!r}: memory:// takes nothing after '//', got {rest!r}")
        return StoreLocation("memory")
    raise InvalidStoreUrl(f"store URL {url!r} has unknown scheme {scheme!r}: expected {_FORMS}")


def _sqlite(url: str, path: str) -> StoreLocation:
    candidate = Path(path).expanduser()
    if path.endswith("/") or (candidate.exists() and candidate.is_dir()):
        raise InvalidStoreUrl(f"store URL {url!r} names a directory, not a SQLite file")
    return StoreLocation("sqlite", path=candidate)


def _etcd(url: str, rest: str) -> StoreLocation:
    rest, _, query = rest.partition("?")
    if "#" in rest or "#" in query:
        raise InvalidStoreUrl(f"store URL {url!r}: '#' has no meaning in an etcd URL")
    hosts, slash, prefix_path = rest.partition("/")
    if not hosts:
        raise InvalidStoreUrl(
            f"store URL {url!r} names no etcd endpoint: expected etcd://host:port[,host:port...][/prefix]"
        )
    endpoints = tuple(_endpoint(url, part) for part in hosts.split(","))
    if len(set(endpoints)) != len(endpoints):
        raise InvalidStoreUrl(f"store URL {url!r} names an etcd endpoint twice")
    prefix = DEFAULT_ETCD_PREFIX
    segments = prefix_path.strip("/")
    if slash and segments:
        for segment in segments.split("/"):
            if not _PREFIX_SEGMENT.match(segment):
                raise InvalidStoreUrl(
                    f"store URL {url!r}: key prefix /{segments} has an empty or invalid part "
                    f"{segment!r} (letters, digits and _.:@=+- between single slashes)"
                )
        prefix = "/" + segments
    options, security = _etcd_options(url, query)
    return StoreLocation("etcd", endpoints=endpoints, prefix=prefix, options=options, security=security)


def _endpoint(url: str, part: str) -> str:
    if not part:
        raise InvalidStoreUrl(f"store URL {url!r} has an empty etcd endpoint (a stray or trailing comma)")
    if "@" in part:
        raise InvalidStoreUrl(f"store URL {url!r}: credentials in the URL are not supported ({part!r})")
    if part.startswith("["):
        match = re.fullmatch(r"\[([^\]]*)\](?::(.*))?", part)
        if match is None:
            raise InvalidStoreUrl(f"store URL {url!r}: etcd endpoint {part!r} is malformed: write [2001:db8::1]:2379")
        address, port = match.group(1), match.group(2)
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            raise InvalidStoreUrl(
                f"store URL {url!r}: {address!r} in etcd endpoint {part!r} is not an IPv6 address"
            ) from None
        host = f"[{address}]"
    else:
        host, colon, port = part.rpartition(":")
        if not colon:
            raise InvalidStoreUrl(
                f"store URL {url!r}: etcd endpoint {part!r} has no port: write {part}:2379 (or the port it listens on)"
            )
        if ":" in host:
            raise InvalidStoreUrl(
                f"store URL {url!r}: etcd endpoint {part!r} looks like an IPv6 address: "
                "put it in brackets, e.g. [2001:db8::1]:2379"
            )
        if not _HOSTNAME.match(host):
            raise InvalidStoreUrl(f"store URL {url!r}: {host!r} in etcd endpoint {part!r} is not a host name or address")
    if port is None or port == "":
        raise InvalidStoreUrl(f"store URL {url!r}: etcd endpoint {part!r} has no port: write {host}:2379")
    if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise InvalidStoreUrl(f"store URL {url!r}: port {port!r} of etcd endpoint {part!r} is not a number in 1..65535")
    return f"{host}:{int(port)}"


def _etcd_options(url: str, query: str) -> tuple[dict[str, int | float], dict[str, str]]:
    options: dict[str, int | float] = {}
    security: dict[str, str] = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise InvalidStoreUrl(f"store URL {url!r}: options {query!r} are not name=value pairs joined by '&'") from None
    for name, value in pairs:
        if name in options or _ETCD_SECURITY_OPTIONS.get(name) in security:
            raise InvalidStoreUrl(f"store URL {url!r}: etcd option {name!r} is given twice")
        if name in _ETCD_SECURITY_OPTIONS:
            if not value:
                raise InvalidStoreUrl(f"store URL {url!r}: etcd option {name!r} needs a value")
            security[_ETCD_SECURITY_OPTIONS[name]] = value
            continue
        kind = _ETCD_OPTIONS.get(name)
        if kind is None:
            known = sorted([*_ETCD_OPTIONS, *_ETCD_SECURITY_OPTIONS])
            raise InvalidStoreUrl(f"store URL {url!r}: unknown etcd option {name!r}; known: {', '.join(known)}")
        try:
            number = kind(value)
        except ValueError:
            number = None
        if number is None or number <= 0 or number != number:  # also refuses NaN
            raise InvalidStoreUrl(
                f"store URL {url!r}: etcd option {name}={value!r} must be a positive "
                f"{'integer' if kind is int else 'number'}"
            )
        options[name] = number
    if security:
        from .etcd_client import EtcdSecurity

        try:
            EtcdSecurity(**security)
        except ValueError as error:
            raise InvalidStoreUrl(f"store URL {url!r}: {error}") from None
    return options, security


def open_store(url: str | StoreLocation, *, create: bool = True) -> EventStore:
    """Open the log a store URL names.

    With ``create=False`` (tools that only inspect a log) a SQLite file must already exist
    and hold a ucloud log, so a mistyped path is an error instead of a new empty log.
    The store connects lazily: an unreachable etcd shows up as UnavailableError on the
    first call, not here.
    """
    location = parse_store_url(url) if isinstance(url, str) else url
    if location.scheme == "sqlite":
        from .sqlite import SqliteEventStore

        assert location.path is not None
        if not create:
            _check_sqlite_log(location.path)
        return SqliteEventStore(location.path)
    if location.scheme == "etcd":
        from .etcd import EtcdEventStore
        from .etcd_client import EtcdSecurity

        try:
            return EtcdEventStore(location.endpoints, prefix=location.prefix,
                                  security=EtcdSecurity(**location.security) if location.security else None,
                                  **location.options)  # type: ignore[arg-type]
        except ValueError as error:  # the backend's own limits, e.g. max_txn_ops < 8
            raise InvalidStoreUrl(f"store URL {str(location)!r}: {error}") from None
    from .memory import MemoryEventStore

    return MemoryEventStore()


def _check_sqlite_log(path: Path) -> None:
    if not path.exists():
        raise InvalidStoreUrl(f"no SQLite log at {path}: the file does not exist")
    try:
        with closing(sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)) as conn:
            row = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'events'").fetchone()
    except sqlite3.Error as error:
        raise InvalidStoreUrl(f"{path} is not a SQLite log: {error}") from None
    if row is None:
        raise InvalidStoreUrl(f"{path} is a SQLite database but not a ucloud log (it has no events table)")
