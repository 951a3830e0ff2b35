"""Putting authentication together from configuration, and the first admin.

``builtin_authenticator(state_dir)`` is the embedded default of ``ucloud up``: users
in ``<state_dir>/users.json`` (BuiltinDirectory), seeds and the session key in
``<state_dir>/secrets.json`` (FileSecretStore), used one-time tokens in
``<state_dir>/used-otp.sqlite`` (SqliteUsedTokenCache, so a restart forgets none), all
0600. ``ldap_authenticator`` reads users from LDAP instead and keeps the rest alike.
``ensure_first_admin`` creates the first admin identity once.
"""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .directory import (
    BuiltinDirectory,
    DirectoryError,
    LdapConfig,
    LdapDirectory,
    UserDirectory,
)
from .otp import AlreadyEnrolled, Enrolment, LocalVerifier, SqliteUsedTokenCache, enrol
from .ratelimit import FailureLimiter
from .realms import Realms
from .secrets import FileSecretStore, Secret, SecretStore
from .sessions import DEFAULT_TTL, SessionAuthenticator, SessionSigner

__all__ = [
    "FIRST_ADMIN",
    "FIRST_ADMIN_MARK",
    "FirstAdmin",
    "builtin_authenticator",
    "ensure_first_admin",
    "ldap_authenticator",
    "load_ldap_config",
]

log = logging.getLogger(__name__)

FIRST_ADMIN = "admin"
# Set in the secret store once the first admin was enrolled: a later start never
# enrols again (not even when an operator removed that seed on purpose).
FIRST_ADMIN_MARK = "bootstrap/first-admin"


USED_TOKENS = "used-otp.sqlite"


def _authenticator(directory: UserDirectory, state_dir: Path, session_ttl: float,
                   realms: Realms) -> SessionAuthenticator:
    secrets = FileSecretStore(state_dir / "secrets.json")
    verifier = LocalVerifier(secrets, SqliteUsedTokenCache(state_dir / USED_TOKENS))
    return SessionAuthenticator(directory, verifier, SessionSigner(secrets, ttl=session_ttl),
                                FailureLimiter(), realms, secrets=secrets)


def builtin_authenticator(state_dir: Path, *, session_ttl: float = DEFAULT_TTL,
                          realms: Realms | None = None) -> SessionAuthenticator:
    """Users, secrets and used tokens in 0600 files under ``state_dir``."""
    realms = realms or Realms()
    directory = BuiltinDirectory(state_dir / "users.json", default_realms=(realms.user,))
    return _authenticator(directory, state_dir, session_ttl, realms)


def ldap_authenticator(config: LdapConfig, state_dir: Path, *, session_ttl: float = DEFAULT_TTL,
                       realms: Realms | None = None) -> SessionAuthenticator:
    """Users from LDAP; seeds and the session key in ``<state_dir>/secrets.json``, used
    tokens in ``<state_dir>/used-otp.sqlite``."""
    return _authenticator(LdapDirectory(config), state_dir, session_ttl, realms or Realms())


def load_ldap_config(path: Path | None, overrides: Mapping[str, Any]) -> LdapConfig:
    """An LdapConfig from the ``[ldap]`` table of a TOML file (keys as in docs/auth.md),
    with ``overrides`` (command-line flags; None values ignored) on top.

    ``bind_password_file`` names a file holding the bind password, so that the
    password itself appears in no config file, command line or process list."""
    settings: dict[str, Any] = {}
    if path is not None:
        try:
            document = tomllib.loads(path.read_text())
        except OSError as error:
            raise DirectoryError(f"cannot read {path}: {error.strerror}") from None
        except tomllib.TOMLDecodeError as error:
            raise DirectoryError(f"{path} is not valid TOML: {error}") from None
        table = document.get("ldap")
        if not isinstance(table, dict):
            raise DirectoryError(f"{path} has no [ldap] table")
        settings.update(table)
    settings.update({k: v for k, v in overrides.items() if v is not None})
    password_file = settings.pop("bind_password_file", None)
    if password_file is not None:
        if "bind_password" in settings:
            raise DirectoryError("LDAP: give bind_password or bind_password_file, not both")
        try:
            settings["bind_password"] = Secret(Path(password_file).read_text().rstrip("\n"))
        except OSError as error:
            raise DirectoryError(f"LDAP: cannot read bind_password_file {password_file}: {error.strerror}") from None
    if "urls" not in settings or "base_dn" not in settings:
        raise DirectoryError("LDAP needs at least a server URL (--ldap-url) and a base DN (--ldap-base-dn)")
    return LdapConfig.from_mapping(settings)


@dataclass(frozen=True)
class FirstAdmin:
    """What ``ensure_first_admin`` found or did. ``enrolment`` is set only when it just
    created the admin's seed: show it once, then drop it."""

    name: str
    realm: str
    created_user: bool
    enrolment: Enrolment | None
    problem: str | None = None  # why there is no usable first admin (LDAP user missing, ...)


async def ensure_first_admin(auth: SessionAuthenticator, name: str = FIRST_ADMIN) -> FirstAdmin:
    """Make sure the first admin exists and is enrolled in the admin realm, once.

    With the built-in directory an empty directory gets the user ``name`` (realms: user
    and admin). With LDAP the user must exist there. The seed is created only if the
    secret store has never seen a first admin (FIRST_ADMIN_MARK)."""
    realm = auth.realms.admin
    secrets: SecretStore | None = auth.secrets
    if secrets is None:
        return FirstAdmin(name, realm, False, None, "tokens are verified remotely; enrol the admin there")
    if await secrets.get(FIRST_ADMIN_MARK) is not None:
        return FirstAdmin(name, realm, False, None)
    created = False
    user = await auth.directory.lookup(name)
    if user is None and isinstance(auth.directory, BuiltinDirectory) and not auth.directory.users():
        user = auth.directory.add_user(name, "first administrator", realms=[auth.realms.user, realm])
        created = True
        log.info("created the first admin user %r in %r", user.name, auth.directory)
    if user is None:
        return FirstAdmin(name, realm, False, None,
                          f"no user {name!r} in {auth.directory!r}: name an existing user as the first admin")
    if not user.enabled or (user.realms is not None and realm not in user.realms):
        return FirstAdmin(user.name, realm, created, None,
                          f"{user.name!r} is disabled or not granted the realm {realm!r} by {auth.directory!r}")
    enrolment: Enrolment | None
    try:
        enrolment = await enrol(secrets, user.name, realm)
    except AlreadyEnrolled:
        enrolment = None  # enrolled by hand before: leave it as it is
    await secrets.put(FIRST_ADMIN_MARK, Secret(user.name))
    return FirstAdmin(user.name, realm, created, enrolment)

