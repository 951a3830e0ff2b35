"""Who the users are: a ``UserDirectory`` port with an LDAP and a built-in backend.

``LdapDirectory`` reads users from an LDAP server with ``ldap3`` (synchronous), so
every LDAP call runs in a small thread pool of its own and the event loop never
waits on the network. ``BuiltinDirectory`` keeps users in a 0600 JSON file: the
embedded default of ``ucloud up`` on a machine without an LDAP server; the admin CLI
adds, disables and removes users through it.

A directory knows people, not secrets: no password or seed passes through here
(except the LDAP service account's bind password, which is held as a ``Secret``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import queue
import re
import ssl
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import ldap3
from ldap3.core import exceptions as ldap_errors
from ldap3.utils.conv import escape_filter_chars

from .files import atomic_write, ensure_private_dir, file_identity, locked, read_private
from .secrets import Secret

__all__ = [
    "BuiltinDirectory",
    "DirectoryError",
    "DirectoryUnavailable",
    "LdapConfig",
    "LdapDirectory",
    "User",
    "UserDirectory",
    "InvalidUser",
    "UserExists",
    "UnknownUser",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class User:
    """A person the directory knows. ``name`` is canonical (as the directory spells
    it); ``realms`` is None when the directory does not decide realms, else the
    realms this user may log in to; ``groups`` are the directory's group names."""

    name: str
    display_name: str
    email: str | None = None
    enabled: bool = True
    realms: frozenset[str] | None = None
    groups: frozenset[str] = frozenset()


class DirectoryError(Exception):
    """The directory is misconfigured or answered something unusable."""


class DirectoryUnavailable(DirectoryError):
    """The directory cannot be reached now (down, timing out, refusing TLS)."""


class InvalidUser(DirectoryError, ValueError):
    """What a caller asked for is not a valid user (name, realms): the caller's fault.
    Messages of this and the two below name the user, never a server path, since the
    API passes them on."""


class UserExists(DirectoryError):
    pass


class UnknownUser(DirectoryError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class UserDirectory(ABC):
    @abstractmethod
    async def lookup(self, name: str) -> User | None:
        """The user called ``name``, or None if there is none. Raises
        DirectoryUnavailable when the answer cannot be had, never for an unknown name."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


# -- LDAP ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LdapConfig:
    """How to find users in LDAP. Defaults fit a stock OpenLDAP with inetOrgPerson.

    urls: one or more ``ldap://`` / ``ldaps://`` URLs; with several, a ServerPool
      tries them in order (first reachable wins).
    bind_dn / bind_password: the read-only service account; None binds anonymously.
    base_dn: where users live (searched with subtree scope).
    user_filter: must contain ``{name}``; the name is escaped (RFC 4515) before it
      is put in, so ``*`` or ``)(`` in a name never change the filter.
    name_attribute, display_name_attributes (first present wins), email_attribute.
    disabled_attribute / disabled_values: a user is disabled when this attribute
      holds one of these values (case-insensitive); with ``disabled_values=None``
      its mere presence disables (e.g. ``pwdAccountLockedTime`` of the ppolicy
      overlay). Default: ``employeeType: disabled``, which a stock schema allows.
    group_base_dn / group_filter / group_name_attribute: if group_base_dn is set, a
      user's groups are the entries matching group_filter, where ``{dn}`` is the
      user's (escaped) DN. Default: groupOfNames with a ``member`` value.
    realm_groups: group name -> realm. If set, the user's realms are
      ``default_realms`` plus the realms of their groups; if None, the directory
      does not decide realms (User.realms is None).
    tls: "none", "ldaps" (implied by an ldaps:// URL) or "starttls";
      ca_file: CA bundle for verifying the server; the certificate is always verified.
    pool_size: connections kept open (and threads searching) at most.
    connect_timeout / timeout: seconds to connect / to wait for an answer.
    """

    urls: Sequence[str]
    base_dn: str
    bind_dn: str | None = None
    bind_password: Secret | None = None
    user_filter: str = "(&(objectClass=inetOrgPerson)(uid={name}))"
    name_attribute: str = "uid"
    display_name_attributes: Sequence[str] = ("displayName", "cn")
    email_attribute: str = "mail"
    disabled_attribute: str | None = "employeeType"
    disabled_values: Sequence[str] | None = ("disabled",)
    group_base_dn: str | None = None
    group_filter: str = "(&(objectClass=groupOfNames)(member={dn}))"
    group_name_attribute: str = "cn"
    realm_groups: Mapping[str, str] | None = None
    default_realms: Sequence[str] = ("ucloud",)
    tls: Literal["none", "ldaps", "starttls"] = "none"
    ca_file: str | None = None
    pool_size: int = 4
    connect_timeout: float = 5.0
    timeout: float = 10.0

    def __post_init__(self) -> None:
        if isinstance(self.urls, str):
            object.__setattr__(self, "urls", (self.urls,))
        if not self.urls:
            raise DirectoryError("LDAP: at least one server URL is needed")
        for url in self.urls:
            _parse_url(url)
        if self.tls not in ("none", "ldaps", "starttls"):
            raise DirectoryError(f"LDAP: tls must be 'none', 'ldaps' or 'starttls', not {self.tls!r}")
        if self.tls == "starttls" and any(url.lower().startswith("ldaps:") for url in self.urls):
            raise DirectoryError("LDAP: starttls is for ldap:// URLs; an ldaps:// URL is already TLS")
        if self.user_filter.count("{name}") < 1:
            raise DirectoryError(f"LDAP: user_filter {self.user_filter!r} must contain {{name}}")
        _check_filter("user_filter", self.user_filter.replace("{name}", "x"))
        if self.group_base_dn is not None:
            if "{dn}" not in self.group_filter:
                raise DirectoryError(f"LDAP: group_filter {self.group_filter!r} must contain {{dn}}")
            _check_filter("group_filter", self.group_filter.replace("{dn}", "x"))
        if self.realm_groups is not None and self.group_base_dn is None:
            raise DirectoryError("LDAP: realm_groups needs group_base_dn to find the groups")
        if (self.bind_dn is None) != (self.bind_password is None):
            raise DirectoryError("LDAP: give both bind_dn and bind_password, or neither (anonymous)")
        if self.bind_password is not None and not isinstance(self.bind_password, Secret):
            raise DirectoryError("LDAP: bind_password must be a Secret")
        if self.pool_size < 1:
            raise DirectoryError(f"LDAP: pool_size must be at least 1, got {self.pool_size}")
        if self.connect_timeout <= 0 or self.timeout <= 0:
            raise DirectoryError("LDAP: timeouts must be positive seconds")

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any]) -> LdapConfig:
        """Build from configuration keys (see docs/auth.md); unknown keys are an error."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(settings) - known)
        if unknown:
            raise DirectoryError(f"LDAP: unknown configuration keys {unknown}; known: {sorted(known)}")
        values = dict(settings)
        if isinstance(values.get("bind_password"), str):
            values["bind_password"] = Secret(values["bind_password"])
        try:
            return cls(**values)
        except TypeError as error:
            raise DirectoryError(f"LDAP: {error}") from None


def _parse_url(url: str) -> tuple[str, int, bool]:
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("ldap", "ldaps") or not parts.hostname:
        raise DirectoryError(f"LDAP: {url!r} is not an ldap:// or ldaps:// URL with a host")
    if parts.path not in ("", "/") or parts.query:
        raise DirectoryError(f"LDAP: {url!r}: give only scheme, host and port; base_dn is a separate key")
    ssl_ = parts.scheme.lower() == "ldaps"
    try:
        port = parts.port or (636 if ssl_ else 389)
    except ValueError:
        raise DirectoryError(f"LDAP: {url!r} has an invalid port") from None
    return parts.hostname, port, ssl_


def _check_filter(what: str, text: str) -> None:
    from ldap3.operation.search import parse_filter

    try:
        parse_filter(text, None, auto_escape=False, auto_encode=True, validator=None, check_names=False)
    except ldap_errors.LDAPInvalidFilterError as error:
        raise DirectoryError(f"LDAP: {what} is not a valid LDAP filter: {error}") from None


def _values(attributes: Mapping[str, Any], name: str | None) -> list[str]:
    if name is None:
        return []
    value = attributes.get(name)
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return [v.decode() if isinstance(v, bytes) else str(v) for v in value]
    return [value.decode() if isinstance(value, bytes) else str(value)]


class LdapDirectory(UserDirectory):
    """Users from LDAP, searched as the service account through a pool of connections.

    Why a pool of SYNC connections rather than ldap3's RESTARTABLE strategy: that
    strategy retries forever with 10 s pauses by default and a connection is not
    safe for concurrent use. Here each search borrows a connection (opened and bound
    on first need, at most ``pool_size``), runs in this directory's own thread pool,
    and gives it back; a connection that fails is dropped and the search is retried
    once on a fresh one, so a restarted server is picked up without a restart of ours.
    """

    def __init__(self, config: LdapConfig) -> None:
        self.config = config
        tls = None
        if config.tls != "none" or any(u.lower().startswith("ldaps:") for u in config.urls):
            tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=config.ca_file)
        self._tls = tls
        self._endpoints = [_parse_url(url) for url in config.urls]
        self._idle: queue.LifoQueue[ldap3.Connection] = queue.LifoQueue()
        self._lock = threading.Lock()
        self._open = 0
        self._executor = ThreadPoolExecutor(max_workers=config.pool_size, thread_name_prefix="ldap")
        self._closed = False
        self.connections_opened = 0  # how many connections were ever opened (pool reuse)
        attributes = {config.name_attribute, *config.display_name_attributes, config.email_attribute}
        if config.disabled_attribute:
            attributes.add(config.disabled_attribute)
        self._attributes = sorted(attributes)

    def __repr__(self) -> str:
        return f"LdapDirectory({list(self.config.urls)!r}, base_dn={self.config.base_dn!r})"

    @property
    def where(self) -> str:
        return ", ".join(self.config.urls)

    # Connections ------------------------------------------------------------------

    def _servers(self) -> ldap3.Server | ldap3.ServerPool:
        """Fresh ldap3 Server objects for each new connection: ldap3 remembers a failed
        address as unavailable for 5 s, which would outlast a quick server restart."""
        config = self.config
        servers = [
            ldap3.Server(host, port=port, use_ssl=use_ssl or config.tls == "ldaps", tls=self._tls,
                         get_info=ldap3.NONE, connect_timeout=config.connect_timeout)
            for host, port, use_ssl in self._endpoints
        ]
        if len(servers) == 1:
            return servers[0]
        # active=1: try each server once per connection attempt, then give up (never loop forever).
        return ldap3.ServerPool(servers, ldap3.FIRST, active=1, exhaust=False)

    def _connect(self) -> ldap3.Connection:
        config = self.config
        password = config.bind_password.reveal() if config.bind_password is not None else None
        connection = ldap3.Connection(
            self._servers(), user=config.bind_dn, password=password, client_strategy=ldap3.SYNC,
            # ldap3 packs the receive timeout into SO_RCVTIMEO as whole seconds on Linux
            # (struct 'LL'): a float such as the default 10.0 fails there, so round up.
            receive_timeout=math.ceil(config.timeout), raise_exceptions=False, read_only=True, auto_referrals=False,
        )
        try:
            connection.open()
            if config.tls == "starttls" and not connection.start_tls():
                raise DirectoryUnavailable(f"LDAP {self.where}: StartTLS refused: {connection.result}")
            if not connection.bind():
                result = connection.result or {}
                if result.get("description") == "invalidCredentials":
                    raise DirectoryError(f"LDAP {self.where}: bind as {config.bind_dn!r} refused: "
                                         f"invalid credentials (check bind_dn and bind_password)")
                raise DirectoryUnavailable(f"LDAP {self.where}: bind as {config.bind_dn!r} failed: "
                                           f"{result.get('description')} {result.get('message', '')}".rstrip())
        except DirectoryError:
            connection.unbind()
            raise
        except ldap_errors.LDAPStartTLSError as error:
            connection.unbind()
            raise DirectoryUnavailable(f"LDAP {self.where}: StartTLS failed: {error}") from None
        except ldap_errors.LDAPException as error:
            connection.unbind()
            raise DirectoryUnavailable(f"LDAP {self.where}: cannot connect: {_describe(error)}") from None
        with self._lock:
            self.connections_opened += 1
        return connection

    def _borrow(self) -> ldap3.Connection:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            self._open += 1
        try:
            return self._connect()
        except BaseException:
            with self._lock:
                self._open -= 1
            raise

    def _give_back(self, connection: ldap3.Connection) -> None:
        if self._closed:
            self._discard(connection)
        else:
            self._idle.put(connection)

    def _drain(self) -> None:
        while True:
            try:
                self._discard(self._idle.get_nowait())
            except queue.Empty:
                return

    def _discard(self, connection: ldap3.Connection) -> None:
        with self._lock:
            self._open -= 1
        try:
            connection.unbind()
        except ldap_errors.LDAPException:
            pass

    # Searching --------------------------------------------------------------------

    def _search(self, connection: ldap3.Connection, base: str, search_filter: str, attributes: list[str],
                limit: int) -> list[dict[str, Any]]:
        ok = connection.search(base, search_filter, search_scope=ldap3.SUBTREE, attributes=attributes,
                               size_limit=limit)
        result = connection.result or {}
        code = result.get("result", 0)
        if not ok and code not in (0, 4):  # 4: sizeLimitExceeded, judged by the caller
            description = result.get("description")
            if description == "noSuchObject":
                raise DirectoryError(f"LDAP {self.where}: base DN {base!r} does not exist "
                                     f"(or the service account may not read it)")
            if code in (51, 52, 80):  # busy, unavailable, other
                raise DirectoryUnavailable(f"LDAP {self.where}: search failed: {description}")
            raise DirectoryError(f"LDAP {self.where}: search failed: {description} {result.get('message', '')}")
        entries = [e for e in connection.response or [] if e.get("type") == "searchResEntry"]
        if code == 4:
            entries.append({})  # more than the limit: make the caller see "too many"
        return entries

    def _lookup_sync(self, name: str) -> User | None:
        config = self.config
        user_filter = config.user_filter.replace("{name}", escape_filter_chars(name))
        for attempt in (1, 2):
            connection = self._borrow()
            try:
                entries = self._search(connection, config.base_dn, user_filter, self._attributes, 2)
                groups: list[str] = []
                if len(entries) == 1 and config.group_base_dn is not None:
                    group_filter = config.group_filter.replace("{dn}", escape_filter_chars(entries[0]["dn"]))
                    groups = [
                        value for entry in self._search(connection, config.group_base_dn, group_filter,
                                                        [config.group_name_attribute], 0)
                        for value in _values(entry.get("attributes", {}), config.group_name_attribute)
                    ]
            except ldap_errors.LDAPException as error:
                # The server probably went away: every idle connection is as stale as this one.
                self._discard(connection)
                self._drain()
                if attempt == 2:
                    raise DirectoryUnavailable(f"LDAP {self.where}: search failed: {_describe(error)}") from None
                log.info("LDAP %s: dropping a broken connection (%s); retrying once", self.where, _describe(error))
                continue
            except BaseException:
                self._discard(connection)
                raise
            self._give_back(connection)
            break
        if not entries:
            return None
        if len(entries) > 1:
            raise DirectoryError(f"LDAP {self.where}: user_filter matches more than one entry for {name!r}; "
                                 f"make it select a unique attribute")
        return self._user(entries[0].get("attributes", {}), name, groups)

    def _user(self, attributes: Mapping[str, Any], asked: str, groups: list[str]) -> User:
        config = self.config
        names = _values(attributes, config.name_attribute)
        name = names[0] if names else asked
        display = next((v[0] for a in config.display_name_attributes if (v := _values(attributes, a))), name)
        emails = _values(attributes, config.email_attribute)
        enabled = True
        if config.disabled_attribute:
            present = _values(attributes, config.disabled_attribute)
            if config.disabled_values is None:
                enabled = not present
            else:
                disabled = {v.casefold() for v in config.disabled_values}
                enabled = not any(v.casefold() in disabled for v in present)
        realms = None
        if config.realm_groups is not None:
            mapped = {config.realm_groups[g] for g in groups if g in config.realm_groups}
            realms = frozenset(config.default_realms) | mapped
        return User(name=name, display_name=display, email=emails[0] if emails else None, enabled=enabled,
                    realms=realms, groups=frozenset(groups))

    async def lookup(self, name: str) -> User | None:
        if self._closed:
            raise DirectoryError("LDAP directory is closed")
        if not isinstance(name, str) or not name:
            return None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._lookup_sync, name)

    @property
    def open_connections(self) -> int:
        return self._open

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown, True)
        self._drain()


def _describe(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return re.sub(r"\s+", " ", text)[:300]


# -- built-in -----------------------------------------------------------------------

_NAME = re.compile(r"[a-z0-9][a-z0-9._@+-]{0,127}")


def _normalise(name: str) -> str:
    return name.strip().lower()


class BuiltinDirectory(UserDirectory):
    """Users in one 0600 JSON file; names are case-insensitive and stored in lower case.

    The file is re-read when it changes on disk, so a running gateway sees what the
    admin CLI wrote. Mutations lock the file and replace it atomically.
    """

    def __init__(self, path: str | Path, *, default_realms: Iterable[str] = ("ucloud",)) -> None:
        self.path = Path(path)
        self.default_realms = tuple(default_realms)
        ensure_private_dir(self.path.parent)
        self._mutex = threading.Lock()
        self._identity: tuple[int, int, int, int] | None = None
        self._users: dict[str, User] = {}
        with self._mutex:
            self._load()

    def __repr__(self) -> str:
        return f"BuiltinDirectory({str(self.path)!r})"

    def _parse(self, raw: bytes) -> dict[str, User]:
        try:
            document = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DirectoryError(f"{self.path} is not valid JSON: {error}") from None
        if not isinstance(document, dict) or document.get("version") != 1 or not isinstance(
                document.get("users"), dict):
            raise DirectoryError(f"{self.path} is not a ucloud user file (expected {{\"version\": 1, \"users\": {{...}}}})")
        users = {}
        for name, entry in document["users"].items():
            try:
                users[name] = User(
                    name=name, display_name=str(entry.get("display_name") or name), email=entry.get("email"),
                    enabled=bool(entry["enabled"]), realms=frozenset(entry["realms"]),
                    groups=frozenset(entry.get("groups", ())),
                )
            except (KeyError, TypeError, AttributeError) as error:
                raise DirectoryError(f"{self.path}: user {name!r} is malformed ({error!r})") from None
        return users

    def _load(self) -> dict[str, User]:
        identity = file_identity(self.path)
        if identity is None or identity != self._identity:
            raw = read_private(self.path)
            self._users = {} if raw is None else self._parse(raw)
            self._identity = identity
        return self._users

    def _save(self, users: dict[str, User]) -> None:
        document = {"version": 1, "users": {
            u.name: {"display_name": u.display_name, "email": u.email, "enabled": u.enabled,
                     "realms": sorted(u.realms or ()), "groups": sorted(u.groups)}
            for u in sorted(users.values(), key=lambda u: u.name)
        }}
        atomic_write(self.path, json.dumps(document, indent=1).encode())
        self._identity = None

    def _snapshot(self) -> dict[str, User]:
        with self._mutex:
            return self._load()

    async def lookup(self, name: str) -> User | None:
        if not isinstance(name, str):
            return None
        users = await asyncio.to_thread(self._snapshot)
        return users.get(_normalise(name))

    # Admin operations (synchronous: they are for the CLI) --------------------------

    def users(self) -> list[User]:
        return sorted(self._snapshot().values(), key=lambda u: u.name)

    def get(self, name: str) -> User:
        user = self._snapshot().get(_normalise(name))
        if user is None:
            raise UnknownUser(f"no user {name!r} in the directory")
        return user

    def _modify(self, name: str, change: Any) -> Any:
        key = _normalise(name)
        with self._mutex, locked(self.path):
            self._identity = None
            users = dict(self._load())
            user = change(users.get(key))
            if user is None:
                users.pop(key, None)
            else:
                users[key] = user
            self._save(users)
            return user

    def add_user(self, name: str, display_name: str | None = None, email: str | None = None, *,
                 realms: Iterable[str] | None = None, groups: Iterable[str] = ()) -> User:
        key = _normalise(name)
        if not _NAME.fullmatch(key):
            raise InvalidUser(
                f"invalid user name {name!r}: use 1-128 letters, digits and ._@+- , starting with a letter or digit"
            )
        realms = frozenset(realms if realms is not None else self.default_realms)
        if not realms or not all(isinstance(r, str) and r for r in realms):
            raise InvalidUser(f"user {name!r} needs at least one non-empty realm")
        new = User(name=key, display_name=display_name or key, email=email, enabled=True, realms=realms,
                   groups=frozenset(groups))

        def change(old: User | None) -> User:
            if old is not None:
                raise UserExists(f"user {key!r} already exists")
            return new

        return self._modify(key, change)

    def _existing(self, name: str, edit: Any) -> User:
        def change(old: User | None) -> User:
            if old is None:
                raise UnknownUser(f"no user {name!r} in the directory")
            return edit(old)

        return self._modify(name, change)

    def disable_user(self, name: str) -> User:
        return self._existing(name, lambda u: replace(u, enabled=False))

    def enable_user(self, name: str) -> User:
        return self._existing(name, lambda u: replace(u, enabled=True))

    def set_realms(self, name: str, realms: Iterable[str]) -> User:
        realm_set = frozenset(realms)
        if not realm_set:
            raise InvalidUser(f"user {name!r} needs at least one realm")
        return self._existing(name, lambda u: replace(u, realms=realm_set))

    def remove_user(self, name: str) -> None:
        def change(old: User | None) -> None:
            if old is None:
                raise UnknownUser(f"no user {name!r} in the directory")
            return None

        self._modify(name, change)

