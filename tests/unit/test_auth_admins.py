"""AdminGuard on the real built-in directory and file secret store: who counts as an
enabled admin, self-lockout, the last admin, and changes serialised under the guard."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ucloud.auth.admins import AdminGuard, LastAdmin, SelfLockout, enabled_admins
from ucloud.auth.directory import BuiltinDirectory
from ucloud.auth.otp import enrol
from ucloud.auth.realms import Realms
from ucloud.auth.secrets import FileSecretStore

REALMS = Realms()
ADMIN, USER = REALMS.admin, REALMS.user


@pytest.fixture
def directory(tmp_path: Path) -> BuiltinDirectory:
    return BuiltinDirectory(tmp_path / "users.json")


@pytest.fixture
def secrets(tmp_path: Path) -> FileSecretStore:
    return FileSecretStore(tmp_path / "secrets.json")


async def admin(directory: BuiltinDirectory, secrets: FileSecretStore, name: str) -> None:
    directory.add_user(name, realms=[USER, ADMIN])
    await enrol(secrets, name, ADMIN)


async def test_an_enabled_admin_is_enabled_granted_the_realm_and_enrolled_in_it(
        directory: BuiltinDirectory, secrets: FileSecretStore) -> None:
    await admin(directory, secrets, "root")
    await admin(directory, secrets, "gone")
    directory.disable_user("gone")
    directory.add_user("granted", realms=[USER, ADMIN])  # no admin seed: cannot log in as admin
    directory.add_user("user", realms=[USER])
    await enrol(secrets, "user", USER)
    directory.add_user("seeded", realms=[USER])  # an admin seed the directory does not back
    await enrol(secrets, "seeded", ADMIN)
    assert await enabled_admins(directory, secrets, REALMS) == {"root"}
    assert await enabled_admins(directory, None, REALMS) == {"root", "granted"}  # seeds elsewhere


async def test_nobody_disables_themselves(directory: BuiltinDirectory, secrets: FileSecretStore) -> None:
    await admin(directory, secrets, "root")
    await admin(directory, secrets, "ops")
    guard = AdminGuard(directory, secrets, REALMS)
    with pytest.raises(SelfLockout, match="you cannot disable yourself"):
        async with guard.disabling("ROOT", directory.get("root")):
            pytest.fail("must not get here")


async def test_the_last_enabled_admin_stays(directory: BuiltinDirectory, secrets: FileSecretStore) -> None:
    await admin(directory, secrets, "root")
    directory.add_user("ops", realms=[USER, ADMIN])
    guard = AdminGuard(directory, secrets, REALMS)
    for enter in (guard.disabling("ops", directory.get("root")),
                  guard.dropping_seed(directory.get("root"), ADMIN, replacing=False),
                  guard.dropping_seed(directory.get("root"), ADMIN, replacing=True)):
        with pytest.raises(LastAdmin, match="'root'"):
            async with enter:
                pytest.fail("must not get here")
    async with guard.dropping_seed(directory.get("root"), USER, replacing=False):
        pass  # the user realm's seed keeps nobody in
    await enrol(secrets, "ops", ADMIN)
    async with guard.disabling("ops", directory.get("root")):
        directory.disable_user("root")
    assert await enabled_admins(directory, secrets, REALMS) == {"ops"}


async def test_two_admins_disabling_each_other_at_once_leave_one(
        directory: BuiltinDirectory, secrets: FileSecretStore) -> None:
    await admin(directory, secrets, "a")
    await admin(directory, secrets, "b")
    guard = AdminGuard(directory, secrets, REALMS)

    async def disable(actor: str, target: str) -> str:
        try:
            async with guard.disabling(actor, directory.get(target)):
                await asyncio.sleep(0.05)  # both checks would pass if they were not serialised
                await asyncio.to_thread(directory.disable_user, target)
        except LastAdmin:
            return "refused"
        return "done"

    results = await asyncio.gather(disable("a", "b"), disable("b", "a"))
    assert sorted(results) == ["done", "refused"]
    assert len(await enabled_admins(directory, secrets, REALMS)) == 1
