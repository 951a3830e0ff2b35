"""HTTP API v1 for sessions and users: open a session with a TOTP, and (admin realm)
manage the built-in directory's users and enrol OTP identities.

Only two answers of the whole API carry a secret, each to the one who is entitled to
it and once: ``POST /v1/sessions`` returns the session token to the caller who just
proved a TOTP, and ``POST /v1/users/{name}/otp`` returns a new seed and its
provisioning URI to the admin who enrols. Both say ``Cache-Control: no-store``.
Nothing here writes to the event log; users and seeds live in the directory and the
secret store (docs/auth.md).

Outside the admin realm the user routes answer 404, as hosts do: they do not exist
for a user. A gateway without a user directory (``--insecure-header-auth``) answers
501 for all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
from aiohttp import web

from ucloud.auth.admins import LastAdmin, SelfLockout
from ucloud.auth.directory import (
    BuiltinDirectory,
    DirectoryUnavailable,
    InvalidUser,
    UnknownUser,
    User,
    UserExists,
)
from ucloud.auth.otp import AlreadyEnrolled, enrol, unenrol
from ucloud.auth.realms import AuthenticationUnavailable
from ucloud.auth.secrets import otp_key
from ucloud.auth.sessions import AUTHORIZATION, SessionAuthenticator
from ucloud.commands.unit_of_work import Actor
from ucloud.domain.errors import InvalidValue, NotFound, Rejected
from ucloud.domain.names import NAME_MAX_LENGTH, NAME_PATTERN, NAME_RULE
from ucloud.eventstore.errors import ConflictError

from .identity import AuthenticationFailed
from .inputs import check_patterns, text
from .keys import AUTHENTICATOR, actor_of
from .routes import BODY_LIMIT, ApiDoc, Handler, Param, answer, api_on

log = logging.getLogger(__name__)

auth_routes = web.RouteTableDef()
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


api = api_on(auth_routes)


# -- bodies and answers ------------------------------------------------------------------------


class SessionOut(msgspec.Struct, kw_only=True):
    """A session token: send it as ``Authorization: Bearer <token>`` until ``expires_at``."""

    token: str
    name: str
    realm: str
    expires_at: datetime
    ttl: float  # seconds from now


class UserOut(msgspec.Struct, kw_only=True):
    name: str
    display_name: str
    email: str | None
    enabled: bool
    realms: list[str] | None  # None: the directory leaves realms to the OTP seeds
    enrolled: list[str]  # realms in which the user has an OTP seed (with a local verifier)


class UserList(msgspec.Struct, kw_only=True):
    users: list[UserOut]


# The built-in directory's rule for a new user's name (it stores it in lower case).
NewUserName = Annotated[str, text(128, r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$", "alice",
                                  "a user name: 1-128 letters, digits and ._@+-, starting with a letter or digit")]
# A realm is written as a name; one this gateway does not know is refused with 422.
Realm = Annotated[str, text(NAME_MAX_LENGTH, NAME_PATTERN, "ucloud", f"a realm name: {NAME_RULE}")]
# Latin letters (with accents), digits, spaces and a little punctuation: no control
# characters, no other scripts' digits.
_LETTER = r"A-Za-z0-9\u00C0-\u024F"
DisplayName = Annotated[str, text(
    128, f"^[{_LETTER}][{_LETTER} '.,()@_+-]{{0,127}}$", "Alice Example",
    "a display name: 1-128 Latin letters, digits, spaces and '.,()@_+-, starting with a letter or digit")]
Email = Annotated[str, text(
    254, r"^[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){0,8}$", "alice@example.org",
    "an e-mail address (ASCII): local part, '@', a domain name")]


class AddUserBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: NewUserName
    realms: Annotated[list[Realm], msgspec.Meta(min_length=1, max_length=8)] | None = None  # default: user realm
    display_name: DisplayName | None = None
    email: Email | None = None


class EnrolBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    realm: Realm | None = None  # default: the user realm
    replace: bool = False  # issue a new seed even if one exists (the old one stops working)


class EnrolmentOut(msgspec.Struct, kw_only=True):
    """Shown once: the seed is stored only in the secret store from now on."""

    name: str
    realm: str
    seed: str
    provisioning_uri: str


class Unenrolled(msgspec.Struct, kw_only=True):
    name: str
    realm: str
    removed: bool


_DECODERS: dict[type, msgspec.json.Decoder[Any]] = {t: msgspec.json.Decoder(t) for t in (AddUserBody, EnrolBody)}


async def _body(request: web.Request, body_type: type[Any], empty_ok: bool = False) -> Any:
    raw = await request.read()
    if not raw.strip():
        if empty_ok:
            return body_type()
        raise InvalidValue("body", "the request needs a JSON object body")
    body = _DECODERS[body_type].decode(raw)
    check_patterns(body)
    return body


# -- helpers -------------------------------------------------------------------------------------


def _auth(request: web.Request) -> SessionAuthenticator:
    authenticator = request.app[AUTHENTICATOR]
    if not isinstance(authenticator, SessionAuthenticator):
        raise web.HTTPNotImplemented(text="this gateway has no user directory or sessions: it trusts "
                                          "X-Ucloud-User headers (development mode, --insecure-header-auth)")
    return authenticator


def _admin(request: web.Request) -> tuple[Actor, SessionAuthenticator]:
    auth = _auth(request)
    actor = actor_of(request)
    if not actor.is_admin:
        raise NotFound("users are managed in the admin realm")
    return actor, auth


def _builtin(auth: SessionAuthenticator) -> BuiltinDirectory:
    if not isinstance(auth.directory, BuiltinDirectory):
        raise web.HTTPNotImplemented(text="users live in LDAP: add, disable and list them there (LDAP "
                                          "tools); ucloud only reads them")
    return auth.directory


async def _lookup(auth: SessionAuthenticator, name: str) -> User:
    try:
        user = await auth.directory.lookup(name)
    except DirectoryUnavailable as error:
        log.error("user directory unavailable: %s", error)
        raise AuthenticationUnavailable("the user directory is unavailable; try again later") from None
    if user is None:
        raise NotFound(f"no user {name!r} in the directory")
    return user


async def _user_out(auth: SessionAuthenticator, user: User) -> UserOut:
    enrolled = []
    if auth.secrets is not None:
        for realm in auth.realms.known:
            if await auth.secrets.get(otp_key(realm, user.name)) is not None:
                enrolled.append(realm)
    return UserOut(name=user.name, display_name=user.display_name, email=user.email, enabled=user.enabled,
                   realms=sorted(user.realms) if user.realms is not None else None, enrolled=enrolled)


def _realm(auth: SessionAuthenticator, realm: str | None, field: str = "realm") -> str:
    """A realm of this gateway; a well-formed name of another is 422 naming ``field``."""
    realm = realm or auth.realms.user
    if realm not in auth.realms.known:
        raise Rejected(f"{field}: unknown realm {realm!r}; use {auth.realms.user!r} or {auth.realms.admin!r}",
                       field)
    return realm


def _directory_call(work: Callable[[], User]) -> Any:
    """Run a built-in directory change in a thread, mapping its errors to answers."""

    async def run() -> User:
        try:
            return await asyncio.to_thread(work)
        except UserExists as error:
            raise ConflictError(str(error)) from None
        except UnknownUser as error:
            raise NotFound(str(error)) from None
        except InvalidUser as error:
            raise InvalidValue("name", str(error)) from None
        # Any other DirectoryError is the server's (a damaged user file): a 500 whose
        # detail is generic; the message, which names the file, goes to the log only.

    return run()


# -- sessions ------------------------------------------------------------------------------------


@api("POST", "/v1/sessions", ApiDoc(
    "Open a session", "openSession", "sessions", status=201, response=SessionOut, errors=(400, 429, 501, 503),
    description="Authenticate with X-Ucloud-User, X-Ucloud-Realm and X-Ucloud-Token (a TOTP, accepted "
                "once); the answer's token is then sent as 'Authorization: Bearer <token>' until it "
                "expires. A session cannot open another session (401)."))
async def open_session(request: web.Request) -> web.Response:
    auth = _auth(request)
    if AUTHORIZATION in request.headers:
        # A session is not a credential for this operation: 401, as for any other that is not.
        raise AuthenticationFailed(f"{AUTHORIZATION}: a session cannot open another session; prove yourself "
                                   "with X-Ucloud-Token (a TOTP)")
    issued = await auth.sessions.issue(actor_of(request))
    out = SessionOut(token=issued.token.reveal(), name=issued.name, realm=issued.realm,
                     expires_at=datetime.fromtimestamp(issued.expires_at, UTC),
                     ttl=issued.expires_at - issued.issued_at)
    return answer(out, 201, headers=NO_STORE)


# -- users (admin realm) -------------------------------------------------------------------------

@api("GET", "/v1/users", ApiDoc(
    "List users (admin, built-in directory)", "listUsers", "users", response=UserList, errors=(404, 501, 503),
    description="Every user of the built-in directory, with the realms they are enrolled in. "
                "With LDAP: 501 (list users with LDAP tools). Outside the admin realm: 404."))
async def list_users(request: web.Request) -> web.Response:
    _, auth = _admin(request)
    directory = _builtin(auth)
    users = await asyncio.to_thread(directory.users)
    return answer(UserList(users=[await _user_out(auth, u) for u in users]))


@api("GET", "/v1/users/{name}", ApiDoc(
    "Show a user (admin)", "getUser", "users", response=UserOut, errors=(404, 501, 503),
    description="The user as the directory (built-in or LDAP) knows them. Outside the admin realm: 404."))
async def get_user(request: web.Request) -> web.Response:
    _, auth = _admin(request)
    return answer(await _user_out(auth, await _lookup(auth, request.match_info["name"])))


@api("POST", "/v1/users", ApiDoc(
    "Add a user (admin, built-in directory)", "addUser", "users", status=201, response=UserOut,
    body=AddUserBody, max_body=BODY_LIMIT, errors=(400, 404, 409, 501, 503),
    description="Adds a user to the built-in directory (realms default to the user realm); enrol them "
                "with POST /v1/users/{name}/otp. With LDAP: 501. Outside the admin realm: 404."))
async def add_user(request: web.Request) -> web.Response:
    actor, auth = _admin(request)
    directory = _builtin(auth)
    body: AddUserBody = await _body(request, AddUserBody)
    realms = ([_realm(auth, r, f"realms[{i}]") for i, r in enumerate(body.realms)] if body.realms is not None
              else [auth.realms.user])
    user = await _directory_call(lambda: directory.add_user(body.name, body.display_name, body.email,
                                                              realms=realms))
    log.info("%s added user %r (realms %s)", actor, user.name, ", ".join(sorted(realms)))
    return answer(await _user_out(auth, user), 201, headers={"Location": f"/v1/users/{user.name}"})


def _switch(enabled: bool) -> Handler:
    async def handle(request: web.Request) -> web.Response:
        actor, auth = _admin(request)
        directory = _builtin(auth)
        name = request.match_info["name"]
        if enabled:
            user = await _directory_call(lambda: directory.enable_user(name))
        else:
            target = await _lookup(auth, name)
            async with _guarded(), auth.admins.disabling(actor.name, target):
                user = await _directory_call(lambda: directory.disable_user(target.name))
        log.info("%s %s user %r", actor, "enabled" if enabled else "disabled", user.name)
        return answer(await _user_out(auth, user))

    return handle


@contextlib.asynccontextmanager
async def _guarded() -> AsyncIterator[None]:
    """The admin guard's refusals as problems: 422 for locking oneself out, 409 for
    leaving no enabled admin."""
    try:
        yield
    except SelfLockout as error:
        raise Rejected(str(error)) from None
    except LastAdmin as error:
        raise ConflictError(str(error)) from None


api("POST", "/v1/users/{name}/disable", ApiDoc(
    "Disable a user (admin, built-in directory)", "disableUser", "users", response=UserOut,
    errors=(404, 409, 422, 501, 503),
    description="The user's next request is refused, whether it carries a TOTP or a session. "
                "An admin cannot disable themselves (422), nor the last enabled admin (409). "
                "With LDAP: 501 (disable them in LDAP). Outside the admin realm: 404."))(_switch(False))
api("POST", "/v1/users/{name}/enable", ApiDoc(
    "Enable a user (admin, built-in directory)", "enableUser", "users", response=UserOut,
    errors=(404, 501, 503),
    description="With LDAP: 501. Outside the admin realm: 404."))(_switch(True))


@api("POST", "/v1/users/{name}/otp", ApiDoc(
    "Enrol a user for OTP (admin)", "enrolUser", "users", status=201, response=EnrolmentOut, body=EnrolBody, max_body=BODY_LIMIT,
    body_required=False,
    errors=(400, 404, 409, 422, 501, 503),
    description="Creates a fresh TOTP seed for an existing, enabled directory user in a realm (default: "
                "the user realm) and answers it with its otpauth:// provisioning URI, once. 409 if the user "
                "is enrolled there already, unless replace is true; 409 also when replacing would invalidate "
                "the admin seed of the last enabled admin. With a remote (ungleich-otp) verifier: "
                "501. Outside the admin realm: 404."))
async def enrol_user(request: web.Request) -> web.Response:
    actor, auth = _admin(request)
    body: EnrolBody = await _body(request, EnrolBody, empty_ok=True)
    realm = _realm(auth, body.realm)
    user = await _lookup(auth, request.match_info["name"])
    if auth.secrets is None:
        raise web.HTTPNotImplemented(text="tokens are verified by a remote (ungleich-otp) service: enrol "
                                          "users there")
    if not user.enabled:
        raise Rejected(f"user {user.name!r} is disabled; enable them first")
    if user.realms is not None and realm not in user.realms:
        raise Rejected(f"the directory does not grant {user.name!r} the realm {realm!r} "
                       f"(granted: {', '.join(sorted(user.realms)) or 'none'})")
    try:
        if body.replace:
            async with _guarded(), auth.admins.dropping_seed(user, realm, replacing=True):
                enrolment = await enrol(auth.secrets, user.name, realm, replace=True)
        else:
            enrolment = await enrol(auth.secrets, user.name, realm)
    except AlreadyEnrolled:
        raise ConflictError(f"{user.name!r} is enrolled in realm {realm!r} already; pass replace to issue "
                            f"a new seed (the old one stops working)") from None
    log.info("%s enrolled %r in realm %r%s", actor, user.name, realm, " (replacing the old seed)" if body.replace else "")
    out = EnrolmentOut(name=user.name, realm=realm, seed=enrolment.seed.reveal(),
                       provisioning_uri=enrolment.provisioning_uri.reveal())
    return answer(out, 201, headers=NO_STORE)


@api("DELETE", "/v1/users/{name}/otp", ApiDoc(
    "Remove a user's OTP seed (admin)", "unenrolUser", "users", response=Unenrolled,
    params=(Param.of("realm", "query", "The realm (default: the user realm).", Realm),),
    errors=(400, 404, 409, 422, 501, 503),
    description="The user can no longer open sessions or send tokens in that realm (open sessions "
                "last until they expire, unless the user is disabled). 409 for the admin seed of the "
                "last enabled admin. Outside the admin realm: 404."))
async def unenrol_user(request: web.Request) -> web.Response:
    actor, auth = _admin(request)
    realm = _realm(auth, request.query.get("realm"))
    name = request.match_info["name"]
    if auth.secrets is None:
        raise web.HTTPNotImplemented(text="tokens are verified by a remote (ungleich-otp) service: unenrol "
                                          "users there")
    user = await _lookup(auth, name)
    secrets = auth.secrets
    async with _guarded(), auth.admins.dropping_seed(user, realm, replacing=False):
        removed = await unenrol(secrets, user.name, realm)
    log.info("%s removed the OTP seed of %r in realm %r (%s)", actor, user.name, realm,
             "removed" if removed else "there was none")
    return answer(Unenrolled(name=user.name, realm=realm, removed=removed))
