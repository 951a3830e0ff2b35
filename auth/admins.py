"""Nobody can lock the admins out: the last enabled admin stays enabled and enrolled.

An **enabled admin** is a user the directory knows, enabled, granted the admin realm
(or in a directory that leaves realms to the seeds), who holds an OTP seed in the admin
realm (when seeds are local). ``AdminGuard`` refuses, before the change is made:

* an admin disabling themselves (``SelfLockout``: another admin may);
* disabling the last enabled admin, removing their admin seed, or replacing it (which
  invalidates the one they use) (``LastAdmin``).

Changes that could remove an admin run one at a time under the guard's lock, so two
admins disabling each other at once cannot both succeed. The lock is per process: the
built-in directory belongs to one gateway (``ucloud up``); with LDAP, users are
disabled in LDAP, not through ucloud. A locked-out operator is never stuck anyway:
``ucloud admin recover`` (auth/recovery.py) enrols a fresh admin on the server.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import quote, unquote

from .directory import BuiltinDirectory, User, UserDirectory
from .realms import Realms
from .secrets import SecretStore, otp_key

__all__ = ["AdminGuard", "LastAdmin", "SelfLockout", "admin_key_prefix", "enabled_admins"]

RECOVER_HINT = "root on the server can always run 'ucloud admin recover'"


class SelfLockout(Exception):
    """An admin asked to lock themselves out (answered 422)."""


class LastAdmin(Exception):
    """The change would leave no enabled admin (answered 409)."""


def _is_admin_user(user: User, realms: Realms) -> bool:
    return user.enabled and (user.realms is None or realms.admin in user.realms)


async def enabled_admins(directory: UserDirectory, secrets: SecretStore | None, realms: Realms) -> set[str]:
    """The canonical names of every enabled admin (see the module's docstring)."""
    if isinstance(directory, BuiltinDirectory):
        candidates = [user for user in await asyncio.to_thread(directory.users) if _is_admin_user(user, realms)]
        if secrets is None:  # seeds live in a remote verifier: the directory is all we know
            return {user.name for user in candidates}
        return {user.name for user in candidates if await secrets.get(otp_key(realms.admin, user.name)) is not None}
    if secrets is None:
        return set()  # LDAP and a remote verifier: nothing to enumerate; ucloud changes neither
    # LDAP cannot be listed cheaply, but admin seeds can: ask the directory about each.
    prefix = admin_key_prefix(realms)
    names = [unquote(key[len(prefix):]) for key in await secrets.keys(prefix)]
    admins = set()
    for name in names:
        user = await directory.lookup(name)
        if user is not None and _is_admin_user(user, realms):
            admins.add(user.name)
    return admins


class AdminGuard:
    """Checks and serialises the changes that could leave no admin."""

    def __init__(self, directory: UserDirectory, secrets: SecretStore | None, realms: Realms) -> None:
        self.directory = directory
        self.secrets = secrets
        self.realms = realms
        self._lock = asyncio.Lock()

    async def _last(self, name: str) -> bool:
        admins = await enabled_admins(self.directory, self.secrets, self.realms)
        return name in admins and not admins - {name}

    @contextlib.asynccontextmanager
    async def disabling(self, actor: str, user: User) -> AsyncIterator[None]:
        """Hold this while disabling ``user`` (canonical); refuses self-lockout and the last admin."""
        if user.name.casefold() == actor.casefold():
            raise SelfLockout(f"you cannot disable yourself ({user.name}); another admin can")
        async with self._lock:
            if await self._last(user.name):
                raise LastAdmin(f"{user.name!r} is the last enabled admin: enable or enrol another admin "
                                f"first ({RECOVER_HINT})")
            yield

    @contextlib.asynccontextmanager
    async def dropping_seed(self, user: User, realm: str, *, replacing: bool) -> AsyncIterator[None]:
        """Hold this while removing or replacing ``user``'s seed in ``realm``."""
        async with self._lock:
            if realm == self.realms.admin and await self._last(user.name):
                what = "replacing the admin seed of" if replacing else "removing the admin seed of"
                raise LastAdmin(f"{what} {user.name!r} would leave no enabled admin: {user.name!r} is the "
                                f"last one; enrol another admin first ({RECOVER_HINT})")
            yield


def admin_key_prefix(realms: Realms) -> str:
    """``otp/<admin realm>/``: where admin seeds live in the secret store."""
    return f"otp/{quote(realms.admin, safe='@._+-')}/"
