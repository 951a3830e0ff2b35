"""Short-lived signed sessions: one TOTP opens a session that many requests then use.

Why: a TOTP token is accepted once and the next one appears 30 s later, so a client
that makes several calls within one step (``ucloud vm create --wait`` polls four
times a second) cannot send a fresh token with each call. Instead it proves itself
once with name, realm and token (``POST /v1/sessions``) and gets back a session
token that it sends as ``Authorization: Bearer <token>`` until it expires (10
minutes by default); then it uses its next TOTP token to open a new one.

The session token is a JWT (RFC 7519, HS256, made and checked with PyJWT rather than
by hand) carrying ``sub`` (the canonical user name), ``realm``, ``iat``, ``exp`` and a
random ``jti``. Its HMAC key is 32 random bytes kept in the SecretStore under
``session/hmac-key``: created by the first gateway that needs it (``put_new``, so
gateways sharing a store agree on one key), never logged, never in the event log.
Expiry is checked against this module's clock (injectable for tests), not PyJWT's.

Every request made with a session still asks the directory: a user who was disabled
or removed is refused at their next request, not when the session runs out. The
rate limiter does not apply to sessions: guessing an HMAC-SHA256 is hopeless, and a
user locked out by someone else's failed TOTP guesses keeps working with the session
they have.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt

from ucloud.commands.unit_of_work import Actor

from .admins import AdminGuard
from .directory import DirectoryUnavailable, UserDirectory
from .otp import TokenVerifier
from .ratelimit import FailureLimiter
from .realms import (
    HEADER_NAME,
    HEADER_REALM,
    HEADER_TOKEN,
    AuthenticationFailed,
    AuthenticationUnavailable,
    BadCredentials,
    OtpAuthenticator,
    Realms,
)
from .secrets import Secret, SecretStore

__all__ = [
    "AUTHORIZATION",
    "DEFAULT_TTL",
    "SESSION_KEY",
    "IssuedSession",
    "SessionAuthenticator",
    "SessionInvalid",
    "SessionSigner",
]

log = logging.getLogger(__name__)

Clock = Callable[[], float]

AUTHORIZATION = "Authorization"
SESSION_KEY = "session/hmac-key"  # the secret-store key of the signing key
DEFAULT_TTL = 600.0  # seconds a session lasts
ALGORITHM = "HS256"
ISSUER = "ucloud"
KEY_BYTES = 32


class SessionInvalid(Exception):
    """A session token was not accepted; the message is for the server log only."""


@dataclass(frozen=True)
class IssuedSession:
    """A session just opened: ``token`` goes to the client that proved itself, once."""

    token: Secret
    name: str
    realm: str
    issued_at: float
    expires_at: float


class SessionSigner:
    """Issues and checks session tokens with a key from the SecretStore."""

    def __init__(self, secrets_store: SecretStore, *, ttl: float = DEFAULT_TTL, clock: Clock = time.time,
                 key_name: str = SESSION_KEY) -> None:
        if ttl <= 0:
            raise ValueError(f"a session's lifetime must be positive seconds, got {ttl}")
        self.secrets = secrets_store
        self.ttl = ttl
        self.clock = clock
        self.key_name = key_name
        self._key: Secret | None = None
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"SessionSigner({self.secrets!r}, ttl={self.ttl:g})"

    async def _signing_key(self) -> bytes:
        """The key, created on first use. Cached: rotating it (deleting ``session/hmac-key``)
        takes effect when the gateways restart, and ends every open session."""
        async with self._lock:
            if self._key is None:
                key = await self.secrets.get(self.key_name)
                if key is None:
                    fresh = Secret(base64.urlsafe_b64encode(secrets.token_bytes(KEY_BYTES)).decode())
                    if await self.secrets.put_new(self.key_name, fresh):
                        log.info("created a new session signing key in %r", self.secrets)
                    key = await self.secrets.get(self.key_name)  # whoever won the race
                    if key is None:
                        raise AuthenticationUnavailable("the session key vanished from the secret store")
                self._key = key
            return base64.urlsafe_b64decode(self._key.reveal())

    async def issue(self, actor: Actor) -> IssuedSession:
        now = self.clock()
        expires = now + self.ttl
        claims = {"iss": ISSUER, "sub": actor.name, "realm": actor.realm, "iat": int(now), "exp": expires,
                  "jti": secrets.token_urlsafe(12)}
        token = jwt.encode(claims, await self._signing_key(), algorithm=ALGORITHM)
        log.info("opened a session for %s until %.0f", actor, expires)
        return IssuedSession(Secret(token), actor.name, actor.realm, now, expires)

    async def verify(self, token: str) -> tuple[str, str]:
        """(name, realm) the token was issued to; SessionInvalid if it is forged,
        malformed, not ours or expired."""
        key = await self._signing_key()
        try:
            claims: dict[str, Any] = jwt.decode(
                token, key, algorithms=[ALGORITHM], issuer=ISSUER,
                options={"require": ["iss", "sub", "realm", "iat", "exp"], "verify_exp": False,
                         "verify_iat": False, "verify_nbf": False})
        except jwt.InvalidTokenError as error:
            # PyJWT's messages name the failed check, never the token or key.
            raise SessionInvalid(f"bad session token ({type(error).__name__})") from None
        name, realm, expires = claims["sub"], claims["realm"], claims["exp"]
        if not isinstance(name, str) or not isinstance(realm, str) or not isinstance(expires, int | float):
            raise SessionInvalid("session token with malformed claims")
        if self.clock() >= expires:
            raise SessionInvalid("session expired")
        return name, realm


def _bearer(headers: Mapping[str, str] | Any) -> str | None:
    if hasattr(headers, "getall"):
        values = list(headers.getall(AUTHORIZATION, []))
    else:
        values = [v for k, v in headers.items() if k.lower() == AUTHORIZATION.lower()]
    if not values:
        return None
    if len(values) > 1:
        raise BadCredentials(f"header {AUTHORIZATION} appears {len(values)} times; send it once")
    scheme, _, token = values[0].strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise BadCredentials(f"header {AUTHORIZATION} must be 'Bearer <session token>' "
                             f"(open a session with POST /v1/sessions)")
    return token.strip()


def _present(headers: Mapping[str, str] | Any, name: str) -> str | None:
    if hasattr(headers, "getall"):
        values = list(headers.getall(name, []))
    else:
        values = [v for k, v in headers.items() if k.lower() == name.lower()]
    return values[0].strip() if values else None


class SessionAuthenticator(OtpAuthenticator):
    """The gateway's authenticator for real deployments: TOTP (as OtpAuthenticator)
    or a session opened with one.

    ``secrets`` is where enrolment puts new seeds: the LocalVerifier's store. With a
    RemoteVerifier it is None and enrolment happens in the ungleich-otp service.
    The signer's store holds the session key in either case."""

    SESSION_MESSAGE = "session not accepted: it expired or is invalid; open a new one with a TOTP token"

    def __init__(self, directory: UserDirectory, verifier: TokenVerifier, sessions: SessionSigner,
                 limiter: FailureLimiter | None = None, realms: Realms | None = None,
                 secrets: SecretStore | None = None) -> None:
        super().__init__(directory, verifier, limiter, realms)
        self.sessions = sessions
        self.secrets = secrets
        self.admins = AdminGuard(directory, secrets, self.realms)  # no change may lock the admins out

    def __repr__(self) -> str:
        return f"SessionAuthenticator({self.directory!r}, {self.verifier!r}, {self.sessions!r})"

    async def authenticate(self, headers: Mapping[str, str], source: str | None) -> Actor:
        token = _bearer(headers)
        if token is None:
            return await super().authenticate(headers, source)
        if _present(headers, HEADER_TOKEN) is not None:
            raise BadCredentials(f"send either {AUTHORIZATION} (a session) or {HEADER_TOKEN} (a TOTP), not both")
        try:
            name, realm = await self.sessions.verify(token)
        except SessionInvalid as error:
            log.info("session refused from %s: %s", source, error)
            raise AuthenticationFailed(str(error), message=self.SESSION_MESSAGE) from None
        for header, value in ((HEADER_NAME, name), (HEADER_REALM, realm)):
            claimed = _present(headers, header)
            if claimed and claimed.casefold() != value.casefold():
                raise BadCredentials(f"{header} {claimed!r} does not match the session's")
        if realm not in self.realms.known:
            log.info("session of %r refused from %s: realm %r is no longer configured", name, source, realm)
            raise AuthenticationFailed("unknown realm", message=self.SESSION_MESSAGE)
        try:
            user = await self.directory.lookup(name)
        except DirectoryUnavailable as error:
            log.error("session of %r from %s: directory unavailable: %s", name, source, error)
            raise AuthenticationUnavailable("the user directory is unavailable; try again later") from None
        reason = None
        if user is None:
            reason = "user no longer in the directory"
        elif not user.enabled:
            reason = "user disabled"
        elif user.realms is not None and realm not in user.realms:
            reason = "realm no longer granted to user"
        if reason is not None:
            log.info("session of %r in realm %r refused from %s: %s", name, realm, source, reason)
            raise AuthenticationFailed(reason, message=self.SESSION_MESSAGE)
        assert user is not None
        return self.realms.actor(user.name, realm)

    async def close(self) -> None:
        await super().close()
        await self.sessions.secrets.close()
        if self.secrets is not None and self.secrets is not self.sessions.secrets:
            await self.secrets.close()
