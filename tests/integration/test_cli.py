"""The ucloud CLI against a real gateway served on a free loopback port.

The gateway runs in a background thread with its own event loop; tests play the
scheduler and host agent through its CommandService (``served.run``) to move VMs
through their states while a ``--wait`` watches.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from tests.support.gateway import PUBLIC_KEY, ServedGateway, drive_to_running, served_gateway
from ucloud.cli.main import main
from ucloud.commands.unit_of_work import SYSTEM
from ucloud.domain import vm as vm_domain
from ucloud.gateway.app import READ_MODELS

UCLOUD = Path(sys.executable).with_name("ucloud")


@pytest.fixture(scope="module")
def served() -> Iterator[ServedGateway]:
    with served_gateway() as gateway:
        yield gateway


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, served: ServedGateway) -> Path:
    """A fresh XDG config and state home; settings come from the environment unless a test says otherwise."""
    for name in ("UCLOUD_API", "UCLOUD_USER", "UCLOUD_REALM", "UCLOUD_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("UCLOUD_API", served.url)
    return tmp_path


def user_name() -> str:
    """Each test acts as its own user on the shared gateway, so tests cannot see each other."""
    return f"u{uuid.uuid4().hex[:10]}"


def ucloud(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)


def ok(*args: str, input: str | None = None) -> Result:
    result = ucloud(*args, input=input)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result


def fails(code: int, *args: str, match: str) -> Result:
    result = ucloud(*args)
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and match in lines[0], lines[0]
    return result


def as_json(result: Result) -> Any:
    return json.loads(result.stdout)


async def vm_named(served: ServedGateway, owner: str, name: str, status: str | None = None) -> uuid.UUID:
    """Wait (on the gateway's loop) until the read models show the VM, as the scheduler would see it."""
    app = served.gateway.app
    for _ in range(600):
        for row in app[READ_MODELS].vms.owned_by(owner):
            if row.vm.name == name and (status is None or row.vm.status == status):
                return row.vm.id
        await asyncio.sleep(0.05)
    raise AssertionError(f"VM {name} of {owner} never became {status or 'visible'}")


def in_background(served: ServedGateway, script: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """Run ``script`` on the gateway's loop while the CLI runs; the returned call joins it."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            served.run(script(), timeout=60)
        except BaseException as error:  # surfaced by join()
            errors.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join() -> None:
        thread.join(60)
        assert not thread.is_alive()
        if errors:
            raise errors[0]

    return join


# -- the everyday commands ------------------------------------------------------------------------


def test_create_list_show_stop_and_delete_a_vm(home: Path, served: ServedGateway) -> None:
    me = user_name()
    created = as_json(ok("--user", me, "vm", "create", "web1", "--image", "debian-12", "--cores", "2",
                         "--ram", "512mb", "--disk", "2GB", "--json"))
    assert created["status"] == "requested"
    vm_id = created["id"]

    listed = as_json(ok("--user", me, "vm", "list", "--json"))
    assert [(v["id"], v["name"], v["ram"], v["disk"]) for v in listed] == [(vm_id, "web1", 512 * 1024**2, 2 * 1024**3)]
    table = ok("--user", me, "vm", "list").stdout
    assert "web1" in table and vm_id in table and "512MiB" in table and "requested" in table
    assert as_json(ok("--user", me, "vm", "show", "web1", "--json"))["id"] == vm_id
    shown = ok("--user", me, "vm", "show", vm_id).stdout
    assert "debian-12" in shown and "2GiB" in shown

    served.run(drive_to_running(served.commands, uuid.UUID(vm_id)))
    stopped = as_json(ok("--user", me, "vm", "stop", "web1", "--json"))
    assert stopped["id"] == vm_id and stopped["position"] > created["position"]
    assert as_json(ok("--user", me, "vm", "show", vm_id, "--json"))["status"] == "stopping"
    assert "delete requested" in ok("--user", me, "vm", "delete", vm_id).stdout
    assert as_json(ok("--user", me, "vm", "show", vm_id, "--json"))["status"] == "deleting"
    assert [v["status"] for v in as_json(ok("--user", me, "vm", "list", "--json"))] == ["deleting"]


def test_a_deleted_vm_leaves_the_list_but_not_the_history(home: Path) -> None:
    me = user_name()
    vm_id = as_json(ok("--user", me, "vm", "create", "tmp", "--image", "debian-12", "--json"))["id"]
    ok("--user", me, "vm", "delete", "tmp")  # never placed: gone at once
    assert as_json(ok("--user", me, "vm", "list", "--json")) == []
    assert "no VMs" in ok("--user", me, "vm", "list").stdout
    assert [v["status"] for v in as_json(ok("--user", me, "vm", "list", "--all", "--json"))] == ["deleted"]
    fails(1, "--user", me, "vm", "stop", vm_id, match=f"VM {vm_id} is deleted")


def test_names_are_resolved_and_ambiguity_is_refused(home: Path) -> None:
    me = user_name()
    first = as_json(ok("--user", me, "vm", "create", "twin", "--image", "debian-12", "--json"))["id"]
    second = as_json(ok("--user", me, "vm", "create", "twin", "--image", "debian-12", "--json"))["id"]
    fails(1, "--user", me, "vm", "show", "twin", match="2 VMs are named 'twin'")
    assert as_json(ok("--user", me, "vm", "show", second, "--json"))["id"] == second
    ok("--user", me, "vm", "delete", first)
    assert as_json(ok("--user", me, "vm", "show", "twin", "--json"))["id"] == second
    fails(1, "--user", me, "vm", "show", "nothing-here", match="no VM named 'nothing-here'")


# -- failures: one line, non-zero -------------------------------------------------------------------


def test_failures_are_one_line_on_stderr_with_a_nonzero_exit(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    me = user_name()
    fails(1, "--user", me, "vm", "create", "x", "--image", "debian-12", "--ram", "2XB",
          match="ram: '2XB' is not a size")
    fails(1, "--user", me, "vm", "show", str(uuid.uuid4()), match="does not exist")
    theirs = as_json(ok("--user", user_name(), "vm", "create", "theirs", "--image", "debian-12", "--json"))["id"]
    fails(1, "--user", me, "vm", "show", theirs, match=f"VM {theirs} does not exist")
    fails(1, "--user", me, "vm", "stop", theirs, match=f"VM {theirs} does not exist")
    fails(1, "--user", me, "host", "list", match="admin realm")
    fails(1, "vm", "list", match="no user set")
    fails(2, "--user", me, "vm", "create", "x", match="Missing option '--image'")
    fails(2, "--user", me, "vm", "create", "x", "--image", "i", "--restart-policy", "sometimes",
          match="'sometimes' is not one of")
    fails(2, "--user", me, "vmm", match="No such command 'vmm'")
    monkeypatch.setenv("UCLOUD_API", "http://127.0.0.1:9")  # discard port: nothing listens
    fails(1, "--user", me, "vm", "list", match="cannot reach the ucloud API at http://127.0.0.1:9")
    fails(1, "--user", me, "--api", "ftp://x", "vm", "list", match="must start with http://")


def test_the_installed_console_script_fails_without_a_traceback(home: Path, served: ServedGateway) -> None:
    env = {**os.environ, "UCLOUD_USER": user_name(), "UCLOUD_API": served.url}
    done = subprocess.run([str(UCLOUD), "vm", "create", "x", "--image", "debian-12", "--ram", "2XB"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr == "error: ram: '2XB' is not a size; write e.g. 512MB, 2GiB or 1T (binary units), or a number of bytes\n"
    done = subprocess.run([str(UCLOUD), "vm", "list", "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and json.loads(done.stdout) == []


# -- settings ------------------------------------------------------------------------------------------


def test_settings_come_from_flags_over_env_over_the_config_file(
        home: Path, served: ServedGateway, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UCLOUD_API")
    from_file, from_env, from_flag = user_name(), user_name(), user_name()
    config = home / "config" / "ucloud" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text(f'api = "{served.url}"\nuser = "{from_file}"\n')

    made = as_json(ok("vm", "create", "filed", "--image", "debian-12", "--json"))
    assert as_json(ok("vm", "show", made["id"], "--json"))["owner"] == from_file

    monkeypatch.setenv("UCLOUD_USER", from_env)
    assert as_json(ok("vm", "list", "--json")) == []  # env overrides the file
    as_json(ok("vm", "create", "envd", "--image", "debian-12", "--json"))
    assert [v["name"] for v in as_json(ok("vm", "list", "--json"))] == ["envd"]
    assert as_json(ok("--user", from_flag, "vm", "list", "--json")) == []  # the flag overrides both

    monkeypatch.setenv("UCLOUD_API", "http://127.0.0.1:9")  # env overrides the file's api ...
    fails(1, "vm", "list", match="cannot reach")
    assert ok("--api", served.url, "vm", "list").exit_code == 0  # ... and the flag the env
    monkeypatch.delenv("UCLOUD_API")

    config.write_text(f'api = "{served.url}"\nuser = "root"\nrealm = "ucloud-admin"\n')
    monkeypatch.delenv("UCLOUD_USER")
    everyone = {v["owner"] for v in as_json(ok("vm", "list", "--json"))}  # the admin realm from the file
    assert {from_file, from_env} <= everyone
    fails(1, "--realm", "ucloud", "host", "list", match="admin realm")


def test_a_broken_or_missing_config_file_is_named(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = home / "config" / "ucloud" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text("api = [unclosed\n")
    fails(1, "--user", "x", "vm", "list", match=f"config file {config} is not valid TOML")
    config.write_text('user = "x"\ncolour = "blue"\n')
    fails(1, "vm", "list", match="unknown field `colour`")
    config.write_text("user = 7\n")
    fails(1, "vm", "list", match="Expected `str | null`, got `int` - at `$.user`")
    fails(1, "--config", str(home / "nope.toml"), "vm", "list", match="nope.toml does not exist")
    monkeypatch.setenv("UCLOUD_CONFIG", str(home / "env.toml"))
    fails(1, "vm", "list", match="env.toml does not exist")


def test_xdg_config_home_is_honoured(home: Path, served: ServedGateway, monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = home / "elsewhere"
    (elsewhere / "ucloud").mkdir(parents=True)
    me = user_name()
    (elsewhere / "ucloud" / "config.toml").write_text(f'user = "{me}"\n')
    monkeypatch.setenv("XDG_CONFIG_HOME", str(elsewhere))
    made = as_json(ok("vm", "create", "xdg", "--image", "debian-12", "--json"))
    assert as_json(ok("vm", "show", made["id"], "--json"))["owner"] == me


def test_a_position_remembered_from_another_log_is_forgotten(home: Path) -> None:
    me = user_name()
    ok("--user", me, "vm", "create", "a", "--image", "debian-12")
    positions = home / "state" / "ucloud" / "positions.json"
    remembered = json.loads(positions.read_text())
    assert list(remembered.values())[0] > 0
    positions.write_text(json.dumps({k: 10**9 for k in remembered}))
    assert [v["name"] for v in as_json(ok("--user", me, "vm", "list", "--json"))] == ["a"]
    assert list(json.loads(positions.read_text()).values()) == [0]


# -- --wait ----------------------------------------------------------------------------------------------


def test_create_wait_follows_the_vm_until_it_runs(home: Path, served: ServedGateway) -> None:
    me = user_name()

    async def scheduler_and_agent() -> None:
        vm_id = await vm_named(served, me, "waited")
        await drive_to_running(served.commands, vm_id)

    join = in_background(served, scheduler_and_agent)
    result = ok("--user", me, "vm", "create", "waited", "--image", "debian-12", "--wait", "--timeout", "60")
    join()
    lines = result.stdout.splitlines()
    assert lines[0].startswith("VM waited is requested: ")
    assert lines[-1].endswith(": running")


def test_stop_start_reboot_and_delete_wait_for_their_goal(home: Path, served: ServedGateway) -> None:
    me = user_name()
    vm_id = uuid.UUID(as_json(ok("--user", me, "vm", "create", "cycle", "--image", "debian-12", "--json"))["id"])
    host_id = served.run(drive_to_running(served.commands, vm_id, hostname="cycle-host"))

    def agent(status: str, report: vm_domain.Command) -> Callable[[], None]:
        async def observe() -> None:
            await vm_named(served, me, "cycle", status)
            await served.commands.report(SYSTEM, report)

        return in_background(served, observe)

    join = agent("stopping", vm_domain.ReportStopped(vm_id=vm_id, host_id=host_id))
    final = as_json(ok("--user", me, "vm", "stop", "cycle", "--wait", "--json"))
    join()
    assert final["status"] == "stopped"

    join = agent("starting", vm_domain.ReportStarted(vm_id=vm_id, host_id=host_id))
    assert ok("--user", me, "vm", "start", "cycle", "--wait").stdout.splitlines()[-1].endswith(": running")
    join()

    async def reboot() -> None:
        for _ in range(600):  # the reboot request is recorded before the agent acts on it
            vm = served.gateway.app[READ_MODELS].vms.get(vm_id)
            if vm is not None and vm.reboot_requests > vm.reboots:
                break
            await asyncio.sleep(0.05)
        await served.commands.report(SYSTEM, vm_domain.ReportRebooted(vm_id=vm_id, host_id=host_id))

    join = in_background(served, reboot)
    final = as_json(ok("--user", me, "vm", "reboot", "cycle", "--wait", "--json"))
    join()
    assert (final["status"], final["reboots"]) == ("running", 1)

    join = agent("deleting", vm_domain.ReportDeleted(vm_id=vm_id, host_id=host_id))
    assert as_json(ok("--user", me, "vm", "delete", "cycle", "--wait", "--json"))["status"] == "deleted"
    join()


def test_wait_fails_with_exit_3_when_the_vm_cannot_be_placed(home: Path, served: ServedGateway) -> None:
    me = user_name()

    async def scheduler() -> None:
        vm_id = await vm_named(served, me, "huge")
        await served.commands.mark_unschedulable(SYSTEM, vm_id, "no host has 64 free cores")

    join = in_background(served, scheduler)
    result = fails(3, "--user", me, "vm", "create", "huge", "--image", "debian-12", "--cores", "64", "--wait",
                   match="is unschedulable: no host has 64 free cores; it will not become running")
    join()
    assert ": unschedulable (no host has 64 free cores)" in result.stdout


def test_wait_gives_up_with_exit_4_after_the_timeout(home: Path) -> None:
    me = user_name()  # nothing places the VM: it stays requested
    fails(4, "--user", me, "vm", "create", "stuck", "--image", "debian-12", "--wait", "--timeout", "0.5",
          match="is still requested after 0.5s, not running")


# -- SSH keys and hosts -----------------------------------------------------------------------------------


def test_ssh_keys_from_a_file_a_string_or_stdin(home: Path) -> None:
    me = user_name()
    public = home / "id_ed25519.pub"
    public.write_text(PUBLIC_KEY + "\n")
    assert "SHA256:" in ok("--user", me, "key", "add", "file", str(public)).stdout
    ok("--user", me, "key", "add", "text", PUBLIC_KEY)
    added = as_json(ok("--user", me, "key", "add", "stdin", "-", "--json", input=PUBLIC_KEY))
    assert added["name"] == "stdin" and added["fingerprint"].startswith("SHA256:")
    keys = as_json(ok("--user", me, "key", "list", "--json"))
    assert [k["name"] for k in keys] == ["file", "stdin", "text"]
    assert {k["public_key"] for k in keys} == {PUBLIC_KEY}
    assert "alice@laptop" in ok("--user", me, "key", "list").stdout

    private = home / "id_ed25519"
    private.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n")
    fails(1, "--user", me, "key", "add", "oops", str(private), match="is a private key; give the public key")
    fails(1, "--user", me, "key", "add", "nofile", str(home / "missing.pub"), match="no such file")
    fails(1, "--user", me, "key", "add", "file", str(public), match="already exists")
    fails(1, "--user", me, "key", "add", "junk", "ssh-ed25519 AAAA", match="public_key:")

    made = as_json(ok("--user", me, "vm", "create", "keyed", "--image", "debian-12", "--ssh-key", "file",
                      "--ssh-key", "text", "--json"))
    assert as_json(ok("--user", me, "vm", "show", made["id"], "--json"))["ssh_keys"] == ["file", "text"]
    ok("--user", me, "key", "delete", "file")
    assert [k["name"] for k in as_json(ok("--user", me, "key", "list", "--json"))] == ["stdin", "text"]
    fails(1, "--user", me, "key", "delete", "file", match="no SSH key named 'file'")


def test_admins_add_and_list_hosts(home: Path) -> None:
    admin = ("--user", "root", "--realm", "ucloud-admin")
    name = f"node-{uuid.uuid4().hex[:8]}"
    assert "registered" in ok(*admin, "host", "add", name, "--cores", "16", "--ram", "64GB", "--disk", "2TB").stdout
    assert "updated" in ok(*admin, "host", "add", name, "--cores", "32", "--ram", "64GB", "--disk", "2TB").stdout
    hosts = {h["hostname"]: h for h in as_json(ok(*admin, "host", "list", "--json"))}
    assert (hosts[name]["cores"], hosts[name]["ram"], hosts[name]["disk"]) == (32, 64 * 1024**3, 2 * 1024**4)
    assert name in ok(*admin, "host", "list").stdout
    fails(1, *admin, "host", "add", "bad", "--cores", "1", "--ram", "many", "--disk", "1T", match="ram:")
    fails(1, "--user", user_name(), "host", "add", "x", "--cores", "1", "--ram", "1G", "--disk", "1G",
          match="admin realm")


def test_ucloud_up_joins_the_cli_when_it_exists() -> None:
    import importlib.util

    if importlib.util.find_spec("ucloud.cli.up") is None:
        assert "up" not in main.commands
    else:
        assert "up" in main.commands


def test_create_without_a_name_names_the_vm_after_its_image(home: Path, served: ServedGateway) -> None:
    me = user_name()
    created = as_json(ok("--user", me, "vm", "create", "--image", "tiny", "--cores", "1", "--ram", "256MB", "--json"))
    shown = as_json(ok("--user", me, "vm", "show", created["id"], "--json"))
    assert shown["name"].startswith("tiny-") and len(shown["name"]) == len("tiny-") + 4
    named = as_json(ok("--user", me, "vm", "create", "--name", "db1", "--image", "tiny", "--json"))
    assert as_json(ok("--user", me, "vm", "show", named["id"], "--json"))["name"] == "db1"
