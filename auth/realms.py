"""Who may do what, and the one function that turns request headers into an Actor.

Every API request carries three headers, as ungleich-otp does it:

    X-Ucloud-User:  the user's name (as in the directory; case does not matter for LDAP)
    X-Ucloud-Realm: ucloud-admin | ucloud (names configurable through ``Realms``)
    X-Ucloud-Token: the current 6-digit TOTP of that user's seed in that realm

The realm decides the rights: the admin realm manages hosts, sees everything and
may act for other users; the user realm sees and touches only its own resources.

``authenticate`` raises ``AuthenticationFailed`` with one and the same message for
an unknown user, a disabled user, a realm the user may not use, a wrong token, a
replayed token and a rate-limited attempt, so the answer never tells whether a user
exists. The specific reason is on the exception (``reason``) for the server log only.
Requests that are malformed (a missing header, an unknown realm, a token that is not
six digits) get ``BadCredentials`` naming the problem: that reveals nothing about users.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ucloud.commands.unit_of_work import Actor
from ucloud.eventstore.errors import UnavailableError

from .directory import DirectoryUnavailable, UserDirectory
from .errors import AuthenticationFailed as Unauthenticated
from .otp import DIGITS, TokenVerifier, well_formed
from .ratelimit import FailureLimiter

__all__ = [
    "HEADER_NAME",
    "HEADER_REALM",
    "HEADER_TOKEN",
    "Actor",
    "AuthenticationFailed",
    "AuthenticationUnavailable",
    "BadCredentials",
    "Forbidden",
    "OtpAuthenticator",
    "Realms",
    "acting_for",
    "authenticate",
    "can_manage_hosts",
    "check_access",
    "may_access",
    "owner_filter",
    "require_admin",
]

log = logging.getLogger(__name__)

HEADER_NAME = "X-Ucloud-User"  # the same header the development HeaderAuthenticator reads
HEADER_REALM = "X-Ucloud-Realm"
HEADER_TOKEN = "X-Ucloud-Token"

MAX_NAME_LENGTH = 256


class Forbidden(Exception):
    """An authenticated actor asked for something its realm does not allow."""


# Rights. The Actor is the system's one value type (ucloud.commands.unit_of_work.Actor:
# name, realm, is_admin), recorded on every event; these functions say what it may do.


def can_manage_hosts(actor: Actor) -> bool:
    return actor.is_admin


def owner_filter(actor: Actor) -> str | None:
    """Whose resources ``actor`` may list: None means everyone's (admin)."""
    return None if actor.is_admin else actor.name


def may_access(actor: Actor, owner: str) -> bool:
    """May ``actor`` see or change a resource owned by ``owner``?"""
    return actor.is_admin or owner == actor.name


def check_access(actor: Actor, owner: str) -> None:
    """Raise Forbidden unless ``may_access``. (An API may prefer to answer 404 rather
    than 403, so that the ids of other users' resources are not confirmed.)"""
    if not may_access(actor, owner):
        raise Forbidden(f"{actor} may not access resources of {owner!r}")


def require_admin(actor: Actor, what: str) -> None:
    if not actor.is_admin:
        raise Forbidden(f"{what} needs the admin realm; {actor} is in realm {actor.realm!r}")


def acting_for(actor: Actor, owner: str | None) -> str:
    """The owner an action is done for: the actor by default; an admin may name
    another user, a user only themself."""
    if owner is None or owner == actor.name:
        return actor.name
    if not actor.is_admin:
        raise Forbidden(f"{actor} may not act for {owner!r}; only the admin realm may act for others")
    return owner


@dataclass(frozen=True)
class Realms:
    """The realm names this gateway accepts."""

    admin: str = "ucloud-admin"
    user: str = "ucloud"

    def __post_init__(self) -> None:
        if not self.admin or not self.user or self.admin == self.user:
            raise ValueError(f"the admin realm ({self.admin!r}) and the user realm ({self.user!r}) "
                             f"must be two different non-empty names")

    @property
    def known(self) -> tuple[str, str]:
        return (self.user, self.admin)

    def actor(self, name: str, realm: str) -> Actor:
        if realm not in self.known:
            raise ValueError(f"unknown realm {realm!r}; known realms are {self.user!r} and {self.admin!r}")
        return Actor(name=name, realm=realm, is_admin=realm == self.admin)


class AuthenticationFailed(Unauthenticated):
    """Authentication was refused (the gateway answers 401). ``str()`` is safe to send
    to the client; ``reason`` is for the server log only; ``retry_after`` is set when
    the refusal was rate limiting (unknown names are limited alike, so it reveals no
    user's existence)."""

    PUBLIC_MESSAGE = "authentication failed: name, realm or token not accepted"

    def __init__(self, reason: str, *, retry_after: float | None = None, message: str | None = None) -> None:
        super().__init__(message or self.PUBLIC_MESSAGE)
        self.reason = reason
        self.retry_after = retry_after


class BadCredentials(AuthenticationFailed):
    """The credentials are malformed (missing header, unknown realm, token format);
    the message says what is wrong and reveals nothing about users."""

    def __init__(self, message: str) -> None:
        super().__init__(message, message=message)


class AuthenticationUnavailable(UnavailableError):
    """The directory cannot be reached: not the caller's fault. An UnavailableError,
    so the gateway's problem table answers 503 with Retry-After as for any backend."""


def _header(headers: Mapping[str, str] | Any, name: str) -> str:
    if hasattr(headers, "getall"):  # aiohttp / multidict: case-insensitive, may repeat
        values = list(headers.getall(name, []))
    else:
        values = [v for k, v in headers.items() if k.lower() == name.lower()]
    if len(values) > 1:
        raise BadCredentials(f"header {name} appears {len(values)} times; send it once")
    if not values or not values[0].strip():
        raise BadCredentials(f"missing header {name}")
    return values[0].strip()


def _check_name(name: str) -> None:
    if len(name) > MAX_NAME_LENGTH:
        raise BadCredentials(f"header {HEADER_NAME} is longer than {MAX_NAME_LENGTH} characters")
    if not name.isprintable() or any(c.isspace() for c in name):
        raise BadCredentials(f"header {HEADER_NAME} contains spaces or control characters")


async def authenticate(headers: Mapping[str, str] | Any, source: str | None, *, directory: UserDirectory,
                       verifier: TokenVerifier, limiter: FailureLimiter, realms: Realms | None = None,
                       digits: int = DIGITS) -> Actor:
    """Check the request's credentials and return the Actor they prove.

    ``headers``: the request headers (aiohttp's ``request.headers`` or any mapping);
    ``source``: the peer address (``request.remote``), used for rate limiting and logs.

    Raises BadCredentials (malformed), AuthenticationFailed (refused, one message for
    every reason) or AuthenticationUnavailable (directory down).
    """
    realms = realms or Realms()
    name = _header(headers, HEADER_NAME)
    realm = _header(headers, HEADER_REALM)
    token = _header(headers, HEADER_TOKEN)
    _check_name(name)
    if realm not in realms.known:
        raise BadCredentials(f"unknown realm in {HEADER_REALM}; use {realms.user!r} or {realms.admin!r}")
    if not well_formed(token, digits):
        raise BadCredentials(f"header {HEADER_TOKEN} must be {digits} digits")

    wait = limiter.retry_after(name, source)
    if wait > 0:
        log.info("auth refused for %r in realm %r from %s: rate limited for %.0f s more", name, realm, source, wait)
        raise AuthenticationFailed("rate limited", retry_after=wait)

    try:
        user = await directory.lookup(name)
    except DirectoryUnavailable as error:
        log.error("auth for %r from %s: directory unavailable: %s", name, source, error)
        raise AuthenticationUnavailable("the user directory is unavailable; try again later") from None

    # The token is checked even when the user is unknown or disabled, so that every
    # refusal costs the same work and time (no timing oracle for who exists).
    valid = await verifier.verify(user.name if user is not None else name, realm, token, source)
    reason = None
    if user is None:
        reason = "unknown user"
    elif not user.enabled:
        reason = "user disabled"
    elif user.realms is not None and realm not in user.realms:
        reason = "realm not granted to user"
    elif not valid:
        reason = "wrong or replayed token"
    if reason is not None:
        limiter.record_failure(name, source)
        log.info("auth refused for %r in realm %r from %s: %s", name, realm, source, reason)
        raise AuthenticationFailed(reason)
    assert user is not None
    limiter.record_success(name, source)
    return realms.actor(user.name, realm)


class OtpAuthenticator:
    """The gateway's ``Authenticator`` (gateway/identity.py) for LDAP/built-in users
    with TOTP: ``authenticate(headers, source)`` is ``authenticate()`` above with the
    parts bound. ``close()`` releases the directory and the verifier."""

    def __init__(self, directory: UserDirectory, verifier: TokenVerifier, limiter: FailureLimiter | None = None,
                 realms: Realms | None = None) -> None:
        self.directory = directory
        self.verifier = verifier
        self.limiter = limiter or FailureLimiter()
        self.realms = realms or Realms()

    def __repr__(self) -> str:
        return f"OtpAuthenticator({self.directory!r}, {self.verifier!r}, realms={self.realms!r})"

    async def authenticate(self, headers: Mapping[str, str], source: str | None) -> Actor:
        return await authenticate(headers, source, directory=self.directory, verifier=self.verifier,
                                  limiter=self.limiter, realms=self.realms)

    async def close(self) -> None:
        await self.directory.close()
        await self.verifier.close()
