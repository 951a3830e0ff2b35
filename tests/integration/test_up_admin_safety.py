"""Operators cannot lock themselves out, and what `ucloud up` keeps survives and stays
private: every test runs a real `ucloud up --no-agent` process and the real `ucloud` CLI
in processes of their own (issue 13).

* a one-time token used before a `kill -9` of `ucloud up` is refused after its restart;
* an admin cannot disable themselves; the last enabled admin cannot be disabled, nor lose
  or replace their admin seed (422 / 409 problems naming why);
* `ucloud admin recover` gets a locked-out operator back in from the state dir, with no
  CLI credentials, and the log records it as root@local with no secret in it;
* answers name no server path; the state dir, the log, the user, secret and used-token
  files are private (0700 / 0600), whether `ucloud up` creates them or finds them.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import msgspec
import pyotp
import pytest

from tests.support.secret_scan import leaks
from tests.support.slapd import free_port
from tests.support.up import BIN, Up, home_env, mode, up_fixture  # noqa: F401 - a fixture
from ucloud.auth.directory import BuiltinDirectory
from ucloud.eventstore.sqlite import SqliteEventStore

ADMIN_REALM = "ucloud-admin"


def credentials_of(home: Path) -> dict[tuple[str, str], str]:
    """(name, realm) -> seed of the identities a CLI home holds."""
    path = home / "config" / "ucloud" / "credentials"
    if not path.exists():
        return {}
    document = json.loads(path.read_text())
    return {(i["name"], i["realm"]): i["seed"] for i in document["identities"]}


def post(url: str, headers: dict[str, str], body: Any = None) -> tuple[int, dict[str, Any], str]:
    data = json.dumps(body).encode() if body is not None else b""
    request = urllib.request.Request(url, data=data, method="POST",
                                     headers={**headers, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=15) as answer:
            return answer.status, json.loads(answer.read() or b"{}"), answer.headers.get("Content-Type", "")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}"), error.headers.get("Content-Type", "")


def totp_headers(name: str, realm: str, token: str) -> dict[str, str]:
    return {"X-Ucloud-User": name, "X-Ucloud-Realm": realm, "X-Ucloud-Token": token}


async def read_log(path: Path) -> list[tuple[str, str, bytes]]:
    async with SqliteEventStore(path) as store:
        return [(r.type, r.actor, r.data) for r in await store.read_all()]


# -- one-time tokens survive a crash ----------------------------------------------------------


def test_a_token_used_before_kill_9_is_refused_after_the_restart(up: Up) -> None:
    up.start()
    seed = credentials_of(up.root / "home")[("admin", ADMIN_REALM)]
    totp = pyotp.TOTP(seed)
    # A step that neither the CLI nor anyone used: the one after the current one (the
    # gateway accepts one step of skew), so the token stays valid for 60-90 s.
    step = int(time.time() // 30) + 1
    token = totp.generate_otp(step)
    headers = totp_headers("admin", ADMIN_REALM, token)
    status, body, _ = post(f"{up.api}/v1/sessions", headers)
    assert status == 201, body

    assert up.process is not None
    os.killpg(up.process.pid, signal.SIGKILL)  # no clean shutdown: whatever is only in memory is lost
    up.process.wait(10)
    up.process = None
    up.start()

    # Still inside the token's window, so only the record of its use can refuse it.
    assert time.time() < (step + 2) * 30
    status, body, _ = post(f"{up.api}/v1/sessions", headers)
    assert status == 401, body
    assert "refused a replayed OTP token of 'admin'" in up.log.read_text()
    # The seed itself still works: a token of another step opens a session.
    status, body, _ = post(f"{up.api}/v1/sessions", totp_headers("admin", ADMIN_REALM, totp.generate_otp(step - 1)))
    assert status == 201, body
    assert mode(up.state / "used-otp.sqlite") == 0o600


# -- nobody locks the admins out -----------------------------------------------------------------


def test_an_admin_cannot_disable_themselves_nor_remove_the_last_enabled_admin(up: Up) -> None:
    up.start()
    bob_home = up.root / "bob"

    refused = up.ucloud("user", "disable", "admin", code=1)
    assert "you cannot disable yourself (admin); another admin can" in refused.stderr
    refused = up.ucloud("user", "unenrol", "admin", "--realm", ADMIN_REALM, code=1)
    assert "removing the admin seed of 'admin' would leave no enabled admin" in refused.stderr
    refused = up.ucloud("user", "enrol", "admin", "--realm", ADMIN_REALM, "--replace", code=1)
    assert "replacing the admin seed of 'admin' would leave no enabled admin" in refused.stderr
    # The user realm is not what keeps the admins in: that seed may go.
    up.ucloud("user", "enrol", "admin", "--realm", "ucloud", "--json")
    up.ucloud("user", "unenrol", "admin", "--realm", "ucloud")

    # bob becomes an admin and logs in (his CLI keeps the session it opened).
    up.ucloud("user", "add", "bob", "--realm", "ucloud", "--realm", ADMIN_REALM)
    seed = json.loads(up.ucloud("user", "enrol", "bob", "--realm", ADMIN_REALM, "--json").stdout)["seed"]
    up.ucloud("--api", up.api, "login", "bob", "--realm", ADMIN_REALM, "--seed-file", "-", input=seed, home=bob_home)
    # With two admins, one may lose the admin seed: admin removes bob's.
    up.ucloud("user", "unenrol", "bob", "--realm", ADMIN_REALM)
    # bob's open session still works, but he is no enabled admin now: admin is the last one.
    refused = up.ucloud("user", "disable", "admin", home=bob_home, code=1)
    assert "'admin' is the last enabled admin: enable or enrol another admin first" in refused.stderr
    assert "ucloud admin recover" in refused.stderr
    refused = up.ucloud("user", "disable", "bob", home=bob_home, code=1)
    assert "you cannot disable yourself (bob)" in refused.stderr
    shown = json.loads(up.ucloud("user", "show", "admin", "--json").stdout)
    assert shown["enabled"] and shown["enrolled"] == [ADMIN_REALM]

    # bob enrolled again is a second enabled admin: now admin may be disabled, by bob.
    up.ucloud("user", "enrol", "bob", "--realm", ADMIN_REALM, "--replace")
    disabled = json.loads(up.ucloud("user", "disable", "admin", "--json", home=bob_home).stdout)
    assert disabled["enabled"] is False
    up.ucloud("vm", "list", code=1)  # admin's CLI is refused at its next request


def test_the_refusals_are_problems_with_the_status_that_says_why(up: Up) -> None:
    up.start()
    seed = credentials_of(up.root / "home")[("admin", ADMIN_REALM)]
    step = int(time.time() // 30) + 1  # a step the CLI did not use
    status, session, _ = post(f"{up.api}/v1/sessions",
                              totp_headers("admin", ADMIN_REALM, pyotp.TOTP(seed).generate_otp(step)))
    assert status == 201, session
    bearer = {"Authorization": f"Bearer {session['token']}"}

    status, problem, kind = post(f"{up.api}/v1/users/admin/disable", bearer)
    assert (status, kind, problem["type"]) == (422, "application/problem+json", "urn:ucloud:problem:rejected")
    assert "cannot disable yourself" in problem["detail"]
    status, problem, kind = post(f"{up.api}/v1/users/admin/otp", bearer, {"realm": ADMIN_REALM, "replace": True})
    assert (status, kind, problem["type"]) == (409, "application/problem+json", "urn:ucloud:problem:conflict")
    assert "last one" in problem["detail"]
    request = urllib.request.Request(f"{up.api}/v1/users/admin/otp?realm={ADMIN_REALM}", method="DELETE",
                                     headers=bearer)
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=15)
    assert error.value.code == 409 and "last one" in json.loads(error.value.read())["detail"]


def test_two_admins_disabling_each_other_at_once_leave_one_enabled(up: Up) -> None:
    up.start()
    bob_home = up.root / "bob"
    up.ucloud("user", "add", "bob", "--realm", "ucloud", "--realm", ADMIN_REALM)
    seed = json.loads(up.ucloud("user", "enrol", "bob", "--realm", ADMIN_REALM, "--json").stdout)["seed"]
    up.ucloud("--api", up.api, "login", "bob", "--realm", ADMIN_REALM, "--seed-file", "-", input=seed, home=bob_home)

    both = [subprocess.Popen([str(BIN / "ucloud"), "user", "disable", target], env=home_env(home),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for target, home in (("bob", up.root / "home"), ("admin", bob_home))]
    results = [(p.wait(60), p.stderr.read() if p.stderr else "") for p in both]
    # Exactly one wins. The other is refused by the guard ("the last enabled admin") or,
    # if it authenticated after the winner disabled it, as a disabled user: never both.
    assert sorted(code for code, _ in results) == [0, 1], results
    directory = BuiltinDirectory(up.state / "users.json")
    assert sorted(u.name for u in directory.users() if u.enabled) in (["admin"], ["bob"])


# -- recovery ---------------------------------------------------------------------------------------


def test_admin_recover_gets_a_locked_out_operator_back_in_and_says_so_in_the_log(up: Up) -> None:
    up.start()
    old_seed = credentials_of(up.root / "home")[("admin", ADMIN_REALM)]
    up.stop()
    # Locked out: the admin is disabled (by hand, in the file), and root's CLI on this
    # machine is a fresh one with no credentials (a state dir from an earlier install).
    BuiltinDirectory(up.state / "users.json").disable_user("admin")
    up.start()
    root_home = up.root / "root"
    assert credentials_of(root_home) == {}
    up.ucloud("--api", up.api, "host", "list", home=root_home, code=1)

    store = f"sqlite://{up.root}/events.sqlite"
    recovered = up.ucloud("admin", "recover", "--state-dir", str(up.state), "--store", store, home=root_home)
    said = recovered.stderr
    assert "recovered the admin admin@ucloud-admin: a fresh OTP seed; enabled again; old admin seed replaced" in said
    assert "recorded in the log at position" in said and "by root@local" in said
    assert "logged in as admin@ucloud-admin" in said
    new_seed = credentials_of(root_home)[("admin", ADMIN_REALM)]
    assert new_seed != old_seed and new_seed not in said

    # The running gateway accepts the new identity at once; the old seed is dead.
    assert json.loads(up.ucloud("--api", up.api, "host", "list", "--json", home=root_home).stdout) == []
    up.ucloud("host", "list", code=1)  # the first CLI still holds the replaced seed

    # A second recovery for a name the directory lacks creates that admin.
    recovered = up.ucloud("admin", "recover", "--state-dir", str(up.state), "--store", store, "--name", "ops",
                          "--no-login", "--seed-file", str(up.root / "ops.otpauth"), home=root_home)
    assert "recovered the admin ops@ucloud-admin: a fresh OTP seed; added to the built-in directory" in \
        recovered.stderr
    assert mode(up.root / "ops.otpauth") == 0o600
    uri = (up.root / "ops.otpauth").read_text().strip()
    ops_home = up.root / "ops"
    up.ucloud("--api", up.api, "login", "--seed-file", "-", input=uri, home=ops_home)
    assert json.loads(up.ucloud("--api", up.api, "user", "show", "ops", "--json", home=ops_home).stdout)["enabled"]

    records = asyncio.run(read_log(up.root / "events.sqlite"))
    recoveries = [(actor, msgspec.json.decode(data)) for kind, actor, data in records if kind == "admin.recovered"]
    assert [(actor, r["name"], r["reenabled"], r["created_user"], r["replaced_seed"]) for actor, r in recoveries] == [
        ("root@local", "admin", True, False, True), ("root@local", "ops", False, True, False)]
    secrets = {"old seed": old_seed, "new seed": new_seed, "ops uri": uri}
    for path in up.root.glob("events.sqlite*"):
        assert leaks(path.read_bytes(), secrets) == [], path


def test_admin_recover_refuses_a_directory_that_holds_no_ucloud_state(tmp_path: Path) -> None:
    result = subprocess.run([str(BIN / "ucloud"), "admin", "recover", "--state-dir", str(tmp_path / "nothing"),
                             "--store", f"sqlite://{tmp_path}/events.sqlite"],
                            env=home_env(tmp_path / "home"), capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "no SQLite log at" in result.stderr  # the log is checked before anything changes
    (tmp_path / "nothing").mkdir()
    result = subprocess.run([str(BIN / "ucloud"), "admin", "recover", "--state-dir", str(tmp_path / "nothing"),
                             "--store", "memory://"],
                            env=home_env(tmp_path / "home"), capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "holds no ucloud state (users.json, secrets.json)" in result.stderr
    assert list((tmp_path / "nothing").iterdir()) == []  # nothing half-written
    assert not (tmp_path / "home").exists()


# -- no server paths, private files ----------------------------------------------------------------


def test_answers_name_no_server_path(up: Up) -> None:
    up.start()
    up.ucloud("user", "add", "bob")
    for args in (("user", "add", "bob"), ("user", "disable", "nobody"), ("user", "enable", "nobody"),
                 ("user", "show", "nobody"), ("user", "add", "Not A Name")):
        refused = up.ucloud(*args, code=1)
        assert str(up.root) not in refused.stderr and ".json" not in refused.stderr, refused.stderr
    assert "user 'bob' already exists" in up.ucloud("user", "add", "bob", code=1).stderr

    # A damaged user file is the server's problem: its path goes to the server's log only.
    users = up.state / "users.json"
    users.write_text("{not json")
    refused = up.ucloud("vm", "list", code=1)
    assert str(up.root) not in refused.stderr and "users.json" not in refused.stderr, refused.stderr
    assert "in its log" in refused.stderr
    assert f"{users} is not valid JSON" in up.log.read_text()


def test_the_state_dir_log_and_auth_files_are_private_when_up_creates_them(tmp_path: Path) -> None:
    up = Up(tmp_path, free_port(), ())
    up.store_in_state = True
    try:
        up.start()
        up.ucloud("vm", "list")  # a session: the used-token cache and the session key are written
    finally:
        up.stop()
    assert mode(up.state) == 0o700
    files = ["users.json", "secrets.json", "used-otp.sqlite", "events.sqlite"]
    for name in files:
        assert mode(up.state / name) == 0o600, name
    for path in up.state.glob("*.sqlite-*"):  # SQLite's -wal and -shm, when present
        assert mode(path) == 0o600, path
    for path in up.state.iterdir():
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path


def test_an_open_state_dir_and_log_from_an_earlier_install_are_made_private(tmp_path: Path) -> None:
    up = Up(tmp_path, free_port(), ())
    up.store_in_state = True
    up.state.mkdir(mode=0o755)
    os.chmod(up.state, 0o755)
    (up.state / "events.sqlite").touch()
    os.chmod(up.state / "events.sqlite", 0o644)
    try:
        printed = up.start()
    finally:
        up.stop()
    assert f"made the state dir {up.state} private (mode 0755 -> 0700)" in printed
    assert mode(up.state) == 0o700
    assert mode(up.state / "events.sqlite") == 0o600


def test_a_recovery_the_log_cannot_record_still_works_and_says_it_is_not_recorded(tmp_path: Path) -> None:
    state = tmp_path / "state"
    BuiltinDirectory(state / "users.json").add_user("admin", realms=["ucloud", ADMIN_REALM])
    unreachable = f"etcd://127.0.0.1:{free_port()}"  # nothing listens there
    result = subprocess.run([str(BIN / "ucloud"), "admin", "recover", "--state-dir", str(state), "--store", unreachable],
                            env=home_env(tmp_path / "home"), capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert f"cannot record the recovery in the log {unreachable}" in result.stderr
    assert "the recovery works but is NOT recorded in the log" in result.stderr
    assert ("admin", ADMIN_REALM) in credentials_of(tmp_path / "home")
