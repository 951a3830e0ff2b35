"""BuiltinDirectory: the embedded user file of `ucloud up`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ucloud.auth.directory import (
    BuiltinDirectory,
    DirectoryError,
    UnknownUser,
    User,
    UserExists,
)
from ucloud.auth.files import PrivateFileError


@pytest.fixture
def directory(tmp_path: Path) -> BuiltinDirectory:
    return BuiltinDirectory(tmp_path / "users.json")


async def test_added_users_are_found_case_insensitively(directory: BuiltinDirectory) -> None:
    added = directory.add_user("Alice", "Alice Liddell", "alice@example.org")
    assert added == User(name="alice", display_name="Alice Liddell", email="alice@example.org", enabled=True,
                         realms=frozenset({"ucloud"}))
    assert await directory.lookup("alice") == added
    assert await directory.lookup("ALICE") == added
    assert await directory.lookup("bob") is None
    assert await directory.lookup("") is None


async def test_admins_get_the_realms_they_are_given(directory: BuiltinDirectory) -> None:
    directory.add_user("root", realms=["ucloud", "ucloud-admin"])
    user = await directory.lookup("root")
    assert user is not None and user.realms == {"ucloud", "ucloud-admin"} and user.display_name == "root"
    directory.set_realms("root", ["ucloud"])
    assert (await directory.lookup("root")).realms == {"ucloud"}  # type: ignore[union-attr]
    with pytest.raises(DirectoryError, match="at least one realm"):
        directory.set_realms("root", [])


async def test_disable_enable_remove(directory: BuiltinDirectory) -> None:
    directory.add_user("alice")
    directory.disable_user("ALICE")
    assert (await directory.lookup("alice")).enabled is False  # type: ignore[union-attr]
    directory.enable_user("alice")
    assert (await directory.lookup("alice")).enabled is True  # type: ignore[union-attr]
    directory.remove_user("alice")
    assert await directory.lookup("alice") is None
    assert directory.users() == []


def test_mistakes_get_clear_errors(directory: BuiltinDirectory) -> None:
    directory.add_user("alice")
    with pytest.raises(UserExists, match="'alice' already exists"):
        directory.add_user("ALICE")
    for action in (directory.disable_user, directory.enable_user, directory.remove_user, directory.get):
        with pytest.raises(UnknownUser, match="no user 'bob'"):
            action("bob")
    for bad in ("", "-x", "a b", "a/b", "x" * 200, "ä"):
        with pytest.raises(DirectoryError, match="invalid user name"):
            directory.add_user(bad)
    with pytest.raises(DirectoryError, match="at least one non-empty realm"):
        directory.add_user("carol", realms=[])


def test_the_file_is_private_and_refused_when_not(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    BuiltinDirectory(path).add_user("alice")
    assert path.stat().st_mode & 0o777 == 0o600
    path.chmod(0o644)
    with pytest.raises(PrivateFileError, match="chmod 600"):
        BuiltinDirectory(path)


async def test_a_running_gateway_sees_what_the_cli_wrote(tmp_path: Path) -> None:
    gateway = BuiltinDirectory(tmp_path / "users.json")
    cli = BuiltinDirectory(tmp_path / "users.json")
    assert await gateway.lookup("alice") is None
    cli.add_user("alice")
    assert (await gateway.lookup("alice")).enabled  # type: ignore[union-attr]
    cli.disable_user("alice")
    assert not (await gateway.lookup("alice")).enabled  # type: ignore[union-attr]


def test_the_file_is_plain_json_an_operator_can_read(directory: BuiltinDirectory) -> None:
    directory.add_user("alice", "Alice", "a@example.org")
    document = json.loads(directory.path.read_text())
    assert document == {"version": 1, "users": {"alice": {
        "display_name": "Alice", "email": "a@example.org", "enabled": True, "realms": ["ucloud"], "groups": []}}}


@pytest.mark.parametrize(("content", "message"), [
    ("{", "not valid JSON"),
    ('{"version": 1}', "not a ucloud user file"),
    ('{"version": 1, "users": {"a": {"enabled": true}}}', "user 'a' is malformed"),
])
def test_a_broken_file_is_named_in_the_error(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "users.json"
    path.write_text(content)
    path.chmod(0o600)
    with pytest.raises(DirectoryError, match=message) as error:
        BuiltinDirectory(path)
    assert str(path) in str(error.value)
