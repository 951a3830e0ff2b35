"""The authentication seam: who is calling. The gateway asks an ``Authenticator``.

The gateway's auth middleware hands every request's headers and peer address to the
configured authenticator and stores the ``Actor`` it returns in ``request[ACTOR]``.
``HeaderAuthenticator`` trusts ``X-Ucloud-User``/``X-Ucloud-Realm`` as they come: the
development default, fit only behind something that sets those headers itself. A real
authenticator (LDAP + TOTP, ucloud.auth) implements the same protocol and is
chosen by ``GatewayConfig.authenticator`` -- an object, or an import path
``"package.module:factory"`` -- without touching the gateway.

An authenticator raises ``AuthenticationFailed`` (or a subclass) when it cannot say
who is calling; the gateway answers 401 with its message as the problem's detail.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Awaitable, Mapping
from typing import Protocol, runtime_checkable

from ucloud.auth.errors import AuthenticationFailed
from ucloud.commands.unit_of_work import Actor

__all__ = ["AuthenticationFailed", "Authenticator", "HeaderAuthenticator", "resolve_authenticator"]

USER_HEADER = "X-Ucloud-User"
REALM_HEADER = "X-Ucloud-Realm"
TOKEN_HEADER = "X-Ucloud-Token"  # the TOTP, read by the real authenticator (auth/realms.py)
DEFAULT_REALM = "ucloud"
ADMIN_REALM = "ucloud-admin"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


@runtime_checkable
class Authenticator(Protocol):
    """Turns a request's headers and peer address into an Actor, or raises
    AuthenticationFailed. May be a plain or an async method."""

    def authenticate(self, headers: Mapping[str, str], source: str) -> Actor | Awaitable[Actor]: ...


class HeaderAuthenticator:
    """Trusts ``X-Ucloud-User`` and ``X-Ucloud-Realm`` (default ``ucloud``); the realm
    ``ucloud-admin`` is the admin realm. For development and tests only: anyone who
    can reach the gateway can claim any name."""

    def __init__(self, default_realm: str = DEFAULT_REALM, admin_realm: str = ADMIN_REALM) -> None:
        self.default_realm = default_realm
        self.admin_realm = admin_realm

    def authenticate(self, headers: Mapping[str, str], source: str) -> Actor:
        name = headers.get(USER_HEADER, "").strip()
        if not name:
            raise AuthenticationFailed(f"missing {USER_HEADER} header: say who you are")
        if not _NAME.fullmatch(name):
            raise AuthenticationFailed(
                f"{USER_HEADER} {name!r} is not a user name (1-64 letters, digits or _.@-)")
        realm = headers.get(REALM_HEADER, "").strip() or self.default_realm
        if not _NAME.fullmatch(realm):
            raise AuthenticationFailed(f"{REALM_HEADER} {realm!r} is not a realm name")
        return Actor(name, realm, is_admin=realm == self.admin_realm)


def resolve_authenticator(spec: Authenticator | str) -> Authenticator:
    """An Authenticator from config: an object as is, ``"header"`` for the header
    authenticator, or ``"package.module:factory"`` (the factory is called with no
    arguments and must return an Authenticator)."""
    if not isinstance(spec, str):
        if not isinstance(spec, Authenticator):
            raise TypeError(f"authenticator {spec!r} has no authenticate(headers, source) method")
        return spec
    if spec == "header":
        return HeaderAuthenticator()
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"authenticator {spec!r}: write 'header' or 'package.module:factory'")
    factory = getattr(importlib.import_module(module_name), attribute, None)
    if factory is None:
        raise ValueError(f"authenticator {spec!r}: {module_name} has no {attribute}")
    authenticator = factory()
    if not isinstance(authenticator, Authenticator):
        raise TypeError(f"authenticator {spec!r} returned {authenticator!r}, which has no authenticate()")
    return authenticator
