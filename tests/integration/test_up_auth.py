"""`ucloud up` with its real authentication, every part in its own process: out of the
box (built-in directory, SQLite), pointed at a real slapd, and a scan of everything the
run wrote for the secrets it handled.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import msgspec
import pyotp
import pytest

from tests.support.gateway import PUBLIC_KEY
from tests.support.secret_scan import leaks
from tests.support.slapd import (
    PEOPLE_DN,
    ROOT_PW,
    SERVICE_DN,
    SERVICE_PW,
    free_port,
    person_ldif,
    slapd_server,
)
from tests.support.up import BIN, Up, home_env, mode, up_fixture  # noqa: F401 - a fixture
from ucloud.eventstore.sqlite import SqliteEventStore

LOGIN = re.compile(r"^\s+(ucloud --api \S+ login (\S+) --realm (\S+) --seed-file (\S+))$", re.MULTILINE)


def test_out_of_the_box_the_cli_is_logged_in_as_the_first_admin_and_the_login_is_shown_once(up: Up) -> None:
    printed = up.start()
    assert "created the first admin: admin in realm ucloud-admin" in printed
    credentials = up.root / "home" / "config" / "ucloud" / "credentials"
    assert f"logged in as admin@ucloud-admin (identity in {credentials}" in printed
    for private in (credentials, up.state / "users.json", up.state / "secrets.json"):
        assert mode(private) == 0o600, private

    # The README's flow: the CLI works at once, as the admin.
    assert json.loads(up.ucloud("vm", "list", "--json").stdout) == []
    assert json.loads(up.ucloud("host", "list", "--json").stdout) == []
    created = json.loads(up.ucloud("vm", "create", "--image", "tiny", "--cores", "1", "--ram", "256MB",
                                   "--json").stdout)
    assert json.loads(up.ucloud("vm", "show", created["id"], "--json").stdout)["owner"] == "admin"

    # stderr is not a terminal here (it could be a log): the seed is in a 0600 file whose
    # path the printed login command names, and nowhere in what was printed.
    (command, name, realm, seed_file) = LOGIN.search(printed).groups()  # type: ignore[union-attr]
    assert (name, realm) == ("admin", "ucloud-admin") and mode(Path(seed_file)) == 0o600
    seed = pyotp.parse_uri(Path(seed_file).read_text().strip()).secret
    assert leaks(printed.encode(), {"admin seed": seed}) == []
    elsewhere = up.root / "elsewhere"
    up.ucloud(*command.split()[1:], home=elsewhere)
    assert json.loads(up.ucloud("host", "list", "--json", home=elsewhere).stdout) == []
    assert mode(elsewhere / "config" / "ucloud" / "credentials") == 0o600
    assert mode(elsewhere / "state" / "ucloud" / "sessions") == 0o600

    # A second start creates nobody and shows no seed; the CLI keeps working.
    up.stop()
    again = up.start()
    assert "created the first admin" not in again and "seed" not in again.lower()
    assert "ucloud login NAME --realm REALM" in again
    assert json.loads(up.ucloud("vm", "list", "--json").stdout)[0]["id"] == created["id"]


def test_on_a_terminal_the_seed_uri_qr_and_login_command_are_shown_once(up: Up) -> None:
    up.terminal = True
    printed = up.start()
    identity = json.loads((up.root / "home" / "config" / "ucloud" / "credentials").read_text())["identities"][0]
    assert f"seed: {identity['seed']}" in printed
    uri = re.search(r"URI: +(\S+)", printed).group(1)  # type: ignore[union-attr]
    assert pyotp.parse_uri(uri).secret == identity["seed"]
    assert printed.count("\u2588") > 100  # the QR code
    assert f"ucloud --api {up.api} login admin --realm ucloud-admin" in printed
    assert not (up.state / "first-admin.otpauth").exists()  # shown, so not written down
    up.stop()
    assert identity["seed"] not in up.start()


def test_a_cli_that_is_not_logged_in_is_refused_and_told_how_to_log_in(up: Up) -> None:
    up.start()
    refused = up.ucloud("--api", up.api, "--user", "admin", "--realm", "ucloud-admin", "vm", "list",
                        home=up.root / "stranger", code=1)
    assert "missing header X-Ucloud-Token" in refused.stderr
    assert "run 'ucloud login admin --realm ucloud-admin'" in refused.stderr
    wrong = up.ucloud("--api", up.api, "login", "admin", "--realm", "ucloud-admin", "--seed-file", "-",
                      home=up.root / "stranger", input=pyotp.random_base32(), code=1)
    assert "not logged in: authentication failed" in wrong.stderr
    assert not (up.root / "stranger" / "config" / "ucloud" / "credentials").exists()


@pytest.mark.parametrize("up", [("--insecure-header-auth",)], indirect=True)
def test_header_authentication_only_when_asked_for_and_loudly(up: Up) -> None:
    printed = up.start()
    assert "WARNING: --insecure-header-auth" in printed and "created the first admin" not in printed
    assert not (up.state / "secrets.json").exists()
    up.ucloud("--realm", "ucloud-admin", "host", "list")  # the config names a user; no token needed
    refused = up.ucloud("user", "list", code=1)
    assert "no user directory" in refused.stderr


PEOPLE = "\n".join([person_ldif("alice", "Alice Liddell"), person_ldif("root", "Root Admin"),
                    person_ldif("carol", "Carol Shaw", employee_type="disabled")])


@pytest.mark.ldap
def test_with_ldap_enrol_login_sessions_and_no_secret_anywhere_in_the_log(tmp_path: Path) -> None:
    password_file = tmp_path / "bind-password"
    password_file.write_text(SERVICE_PW + "\n")
    with slapd_server(PEOPLE) as slapd:
        up = Up(tmp_path, free_port(), ("--ldap-url", slapd.url, "--ldap-base-dn", PEOPLE_DN,
                                        "--ldap-bind-dn", SERVICE_DN, "--ldap-bind-password-file",
                                        str(password_file), "--admin", "root"))
        try:
            printed = up.start()
            assert "LdapDirectory" in printed and "created the first admin: root in realm ucloud-admin" in printed
            as_root = ("--user", "root", "--realm", "ucloud-admin")
            enrolled = json.loads(up.ucloud(*as_root, "user", "enrol", "alice", "--json").stdout)
            shown = up.ucloud(*as_root, "user", "enrol", "alice", "--realm", "ucloud", "--replace").stdout
            alice_seed = re.search(r"seed: (\S+)", shown).group(1)  # type: ignore[union-attr]
            assert alice_seed != enrolled["seed"] and "\u2588" in shown  # a new seed, and a QR code
            assert "disabled" in up.ucloud(*as_root, "user", "enrol", "carol", code=1).stderr
            assert "LDAP tools" in up.ucloud(*as_root, "user", "add", "bob", code=1).stderr
            assert json.loads(up.ucloud(*as_root, "user", "show", "alice", "--json").stdout)["enrolled"] == ["ucloud"]

            # The first seed was replaced: it no longer logs in.
            up.ucloud("login", "alice", "--realm", "ucloud", "--seed-file", "-", input=enrolled["seed"], code=1)
            uri = re.search(r"URI: +(\S+)", shown).group(1)  # type: ignore[union-attr]
            up.ucloud("login", "--seed-file", "-", input=uri)  # name and realm from the URI's label
            up.ucloud("key", "add", "laptop", PUBLIC_KEY)
            vm = json.loads(up.ucloud("vm", "create", "web", "--image", "tiny", "--ram", "256MB", "--disk", "1GB",
                                      "--json").stdout)
            assert [v["name"] for v in json.loads(up.ucloud("vm", "list", "--json").stdout)] == ["web"]
            up.ucloud("vm", "delete", "web")
            up.ucloud(*as_root, "host", "add", "h1", "--cores", "4", "--ram", "8GB", "--disk", "100GB")
            up.ucloud("host", "list", code=1)  # alice is no admin: hosts do not exist for her
        finally:
            up.stop()

    # One TOTP each opened the session that all later commands used (cached across invocations).
    output = "".join(log.read_text() for log in tmp_path.glob("up-*.log"))
    assert output.count("opened a session for alice@ucloud ") == 1
    assert output.count("opened a session for root@ucloud-admin ") == 1

    home = tmp_path / "home"
    credentials = json.loads((home / "config" / "ucloud" / "credentials").read_text())
    sessions = json.loads((home / "state" / "ucloud" / "sessions").read_text())
    server_secrets = json.loads((tmp_path / "state" / "secrets.json").read_text())["secrets"]
    secrets = {f"seed of {i['name']}@{i['realm']}": i["seed"] for i in credentials["identities"]}
    secrets |= {"replaced seed of alice": enrolled["seed"], "session key": server_secrets["session/hmac-key"],
                "LDAP bind password": SERVICE_PW, "LDAP root password": ROOT_PW}
    secrets |= {f"session {key}": s["token"] for key, s in sessions["sessions"].items()}
    assert len(secrets) == 8  # root's and alice's seeds, two sessions, and the rest

    async def events() -> list[tuple[str, str, bytes]]:
        async with SqliteEventStore(tmp_path / "events.sqlite") as store:
            return [(r.type, r.actor, r.data + r.metadata) for r in await store.read_all()]

    records = asyncio.run(events())
    people = {actor for _, actor, _ in records if not actor.endswith("@ucloud-system")}  # not the scheduler
    assert people == {"alice@ucloud", "root@ucloud-admin"}
    assert ("vm.requested", "alice@ucloud") in {(t, a) for t, a, _ in records}
    assert ("host.registered", "root@ucloud-admin") in {(t, a) for t, a, _ in records}
    assert msgspec.json.decode([d for t, _, d in records if t == "vm.requested"][0])["vm_id"] == vm["id"]
    for kind, _, data in records:
        assert leaks(data, secrets) == [], kind
    # Every byte the log's files hold, and everything `ucloud up` printed or logged.
    for path in [*tmp_path.glob("events.sqlite*"), *tmp_path.glob("up-*.log")]:
        assert leaks(path.read_bytes(), secrets) == [], path
