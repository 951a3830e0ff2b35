"""The metadata server as its own process (``ucloud metadata``) in a network namespace
with a ucloud bridge, on a SQLite log shared with the test (a file: it crosses the
namespace, which etcd on the test's loopback does not): guests in their own namespaces, plugged into
the bridge with their NIC's MAC, ask ``fe80::a9fe:a9fe`` (which the server put on the
bridge) and the network's router address, and get their own data in every format;
forged, foreign and unknown sources get 404 naming why; a key added later shows up.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

import msgspec
import pytest

from tests.support.gateway import OTHER_KEY, PUBLIC_KEY
from tests.support.nslab import Lab, http_get, in_ns, lab, needs_netns, run
from ucloud.commands.networks import NetworkCommands
from ucloud.commands.service import CommandService
from ucloud.commands.unit_of_work import SYSTEM, Actor, Repository
from ucloud.domain import network as net
from ucloud.domain.catalogue import build_codec
from ucloud.eventstore.sqlite import SqliteEventStore
from ucloud.projections.metadata import MetadataView
from ucloud.projections.runner import ProjectionRunner

pytestmark = [pytest.mark.netns, needs_netns()]

VNI, PREFIX = 4242, "fd42:4242:4242:1::/64"
MAC_A1, MAC_A2, MAC_B1 = "02:00:00:00:a1:01", "02:00:00:00:a2:02", "02:00:00:00:b1:01"
LL = "fe80::a9fe:a9fe%eth0"
ROUTER = net.router_address(PREFIX)
SCRIPT = "#!/bin/sh\necho a1 was here > /tmp/a1\n"


def new_key(comment: str) -> str:
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    raw = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH)
    return f"{raw.decode()} {comment}"


LATER_KEY = new_key("alice@later")


@dataclass
class World:
    lab: Lab
    store: SqliteEventStore
    store_url: str
    commands: CommandService
    vms: dict[str, UUID]


async def make_vm(commands: CommandService, networks: NetworkCommands, view: MetadataView, runner: ProjectionRunner,
                  owner: str, name: str, mac: str, network: str, **extra: object) -> UUID:
    created = await commands.create_vm(Actor(owner), name=name, cores=1, ram="64MiB", disk="1MiB", image="tiny",
                                       networks=[network], **extra)  # type: ignore[arg-type]
    await runner.catch_up()
    nic = view.vms[created.result].nics[0]
    await networks.allocate_nic(SYSTEM, created.result, nic.id, mac)
    return created.result


async def ready_network(networks: NetworkCommands, owner: str, name: str, vni: int, prefix: str) -> None:
    created = await networks.create_network(Actor(owner), name, "auto")
    await networks.allocate_network(SYSTEM, created.result, vni, prefix)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    path = tmp_path / "events.sqlite"
    store = SqliteEventStore(path)
    codec = build_codec()
    commands = CommandService(store, codec)
    networks = NetworkCommands(Repository(store, codec))
    view = MetadataView()
    runner = ProjectionRunner(store, codec, [view], name="test-metadata")
    await commands.add_ssh_key(Actor("alice"), "laptop", PUBLIC_KEY)
    await commands.add_ssh_key(Actor("bob"), "bobkey", OTHER_KEY)
    await ready_network(networks, "alice", "lan", VNI, PREFIX)
    await ready_network(networks, "bob", "blan", VNI + 1, "fd42:4242:4242:2::/64")
    vms = {
        "a1": await make_vm(commands, networks, view, runner, "alice", "a1", MAC_A1, "lan", ssh_keys=["laptop"],
                            user_data=SCRIPT),
        "a2": await make_vm(commands, networks, view, runner, "alice", "a2", MAC_A2, "lan", user_data="a2 only"),
        "b1": await make_vm(commands, networks, view, runner, "bob", "b1", MAC_B1, "blan"),
    }
    with lab() as built:
        built.bridge(net.bridge_name(VNI), f"{ROUTER}/64")
        built.bridge(net.bridge_name(VNI + 1))
        yield World(built, store, f"sqlite://{path}", commands, vms)
    await store.close()


@pytest.fixture
def server(world: World, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`ucloud metadata` in the host namespace, as its own process."""
    log = (tmp_path / "metadata.log").open("wb")
    process = subprocess.Popen(
        ["ip", "netns", "exec", world.lab.host, str(Path(sys.executable).with_name("ucloud")), "metadata",
         "--store", world.store_url, "--port", "80"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield process
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


async def get(ns: str, host: str, path: str, source: str = "") -> tuple[int, str, str]:
    return await asyncio.to_thread(http_get, ns, host, path, source, sys.executable)


async def until_answered(ns: str, host: str = LL, path: str = "/hostname", source: str = "") -> tuple[int, str, str]:
    """Ask until the server answers (it is starting, and putting its address on the bridge)."""
    deadline = time.monotonic() + 60
    while True:
        answer = await get(ns, host, path, source)
        if answer[0] not in (0, 503) or time.monotonic() > deadline:
            return answer
        await asyncio.sleep(0.3)


async def test_a_guest_gets_its_own_data_in_every_format_and_nothing_else(
        world: World, server: subprocess.Popen[bytes]) -> None:
    a1 = world.lab.guest(net.bridge_name(VNI), MAC_A1)
    status, _, hostname = await until_answered(a1)
    assert (status, hostname) == (200, "a1\n")

    status, kind, body = await get(a1, LL, "/")
    doc = json.loads(body)
    assert status == 200 and kind.startswith("application/json")
    assert (doc["uuid"], doc["name"], doc["hostname"], doc["owner"]) == (str(world.vms["a1"]), "a1", "a1", "alice")
    assert [k["public_key"] for k in doc["ssh_keys"]] == [PUBLIC_KEY]
    assert doc["user_data"] == SCRIPT
    [nic] = doc["network"]["nics"]
    assert (nic["mac"], nic["network"], nic["ipam"], nic["prefix"]) == (MAC_A1, "lan", "auto", PREFIX)
    assert nic["address"] == net.eui64_address(PREFIX, MAC_A1) and nic["gateway"] == ROUTER
    assert await get(a1, LL, "/ssh-keys") == (200, "text/plain; charset=utf-8", PUBLIC_KEY + "\n")
    assert (await get(a1, LL, "/user-data"))[2] == SCRIPT
    assert json.loads((await get(a1, LL, "/network"))[2]) == doc["network"]

    meta = json.loads((await get(a1, LL, "/openstack/latest/meta_data.json"))[2])
    assert (meta["uuid"], meta["name"], meta["hostname"]) == (str(world.vms["a1"]), "a1", "a1")
    assert meta["public_keys"] == {"laptop": PUBLIC_KEY}
    assert (await get(a1, LL, "/openstack/latest/user_data"))[2] == SCRIPT
    network_data = json.loads((await get(a1, LL, "/openstack/latest/network_data.json"))[2])
    assert network_data["links"][0]["ethernet_mac_address"] == MAC_A1
    assert network_data["networks"][0]["type"] == "ipv6_slaac"
    assert json.loads((await get(a1, LL, "/openstack/2018-08-27/vendor_data.json"))[2]) == {}
    nocloud = json.loads((await get(a1, LL, "/nocloud/meta-data"))[2])
    assert nocloud == {"instance-id": f"iid-{world.vms['a1']}", "local-hostname": "a1", "public-keys": [PUBLIC_KEY]}
    assert (await get(a1, LL, "/nocloud/user-data"))[2] == SCRIPT
    config = json.loads((await get(a1, LL, "/nocloud/network-config"))[2])
    assert config["ethernets"]["eth0"]["match"] == {"macaddress": MAC_A1}

    # The same from its address in the /64, at the network's router address.
    own = net.eui64_address(PREFIX, MAC_A1)
    in_ns(a1, "ip", "addr", "add", f"{own}/64", "dev", "eth0", "nodad")
    status, _, body = await get(a1, ROUTER, "/", source=own)
    assert status == 200 and json.loads(body)["uuid"] == str(world.vms["a1"])

    # An unknown path is a 404 problem, not another VM's anything.
    status, kind, body = await get(a1, LL, "/openstack/latest/secrets")
    assert status == 404 and kind == "application/problem+json" and "no metadata at GET" in body


async def test_forged_foreign_and_unknown_sources_get_404_naming_why(
        world: World, server: subprocess.Popen[bytes]) -> None:
    bridge = net.bridge_name(VNI)
    a1 = world.lab.guest(bridge, MAC_A1)
    assert (await until_answered(a1))[0] == 200

    # a1 forges a2's link-local address (a2 has never run: nobody else answers for it).
    a2_ll = net.link_local_address(MAC_A2)
    in_ns(a1, "ip", "addr", "add", f"{a2_ll}/64", "dev", "eth0", "nodad")
    status, _, body = await get(a1, LL, "/", source=f"{a2_ll}%eth0")
    assert status == 404 and "the host resolved it to " + MAC_A1 in body, body
    assert "a2 only" not in body

    # A stable-privacy style address is not EUI-64.
    in_ns(a1, "ip", "addr", "add", "fe80::1234:5678:9abc:def0/64", "dev", "eth0", "nodad")
    status, _, body = await get(a1, LL, "/", source="fe80::1234:5678:9abc:def0%eth0")
    assert status == 404 and "not an EUI-64 address" in body

    # A MAC no NIC has.
    stranger = world.lab.guest(bridge, "02:00:00:00:99:99")
    status, _, body = await until_answered(stranger, path="/")
    assert status == 404 and "no VM has a NIC with MAC 02:00:00:00:99:99 on network lan" in body

    # Bob's VM's MAC on alice's bridge: the NIC is (network, MAC); b1 is on another network.
    impostor = world.lab.guest(bridge, MAC_B1)
    status, _, body = await until_answered(impostor, path="/")
    assert status == 404 and "on network lan" in body

    # The real a2 next to the forger: a2 gets its own data; a forged request never does.
    a2 = world.lab.guest(bridge, MAC_A2)
    status, _, body = await until_answered(a2, path="/user-data")
    assert (status, body) == (200, "a2 only")
    status, _, body = await get(a1, LL, "/user-data", source=f"{a2_ll}%eth0")
    assert status != 200 and "a2 only" not in body, (status, body)


async def test_another_owners_guest_gets_only_its_owners_keys_and_a_key_added_later_shows_up(
        world: World, server: subprocess.Popen[bytes]) -> None:
    b1 = world.lab.guest(net.bridge_name(VNI + 1), MAC_B1)
    status, _, keys = await until_answered(b1, path="/ssh-keys")
    assert (status, keys) == (200, OTHER_KEY + "\n")
    a2 = world.lab.guest(net.bridge_name(VNI), MAC_A2)
    status, _, keys = await until_answered(a2, path="/ssh-keys")
    assert (status, keys) == (200, PUBLIC_KEY + "\n")  # a2 chose no key: its owner's keys

    await world.commands.add_ssh_key(Actor("alice"), "later", LATER_KEY)
    deadline = time.monotonic() + 30
    while LATER_KEY not in keys and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        keys = (await get(a2, LL, "/ssh-keys"))[2]
    assert keys == f"{PUBLIC_KEY}\n{LATER_KEY}\n"


def busybox_path(into: Path) -> str:
    """A PATH of busybox applets only: ucloud-init must need nothing else."""
    into.mkdir()
    for applet in ("sh", "wget", "timeout", "ip", "sed", "grep", "cat", "head", "mkdir", "chmod", "mv", "printf",
                   "hostname", "sleep", "touch", "echo"):
        (into / applet).symlink_to("/bin/busybox")
    return str(into)


async def test_ucloud_init_with_busybox_alone_writes_the_keys_sets_the_hostname_and_runs_the_user_data_once(
        world: World, server: subprocess.Popen[bytes], tmp_path: Path) -> None:
    a1 = world.lab.guest(net.bridge_name(VNI), MAC_A1)
    assert (await until_answered(a1))[0] == 200
    root = tmp_path / "guest-root"
    root.mkdir()
    script = Path(__file__).resolve().parents[2] / "ucloud-init" / "ucloud-init"
    env = ["env", "-i", f"PATH={busybox_path(tmp_path / 'bin')}", f"UCLOUD_INIT_ROOT={root}", "UCLOUD_INIT_WAIT=20"]

    def run_init() -> str:
        done = in_ns(a1, "unshare", "--uts", *env, "sh", str(script), timeout=120)
        return done.stdout

    console = await asyncio.to_thread(run_init)
    assert "ucloud-init: metadata server: http://[fe80::a9fe:a9fe%eth0]" in console, console
    assert f"ucloud-init: key: {PUBLIC_KEY}" in console
    assert "ucloud-init: hostname: a1" in console and "ucloud-init: running user data" in console
    assert (root / "root/.ssh/authorized_keys").read_text() == PUBLIC_KEY + "\n"
    assert oct((root / "root/.ssh/authorized_keys").stat().st_mode & 0o777) == "0o600"
    assert (root / "etc/hostname").read_text() == "a1\n"
    assert (Path("/tmp/a1").read_text() if Path("/tmp/a1").exists() else "") == "a1 was here\n"
    Path("/tmp/a1").unlink()

    console = await asyncio.to_thread(run_init)  # a second boot: the user data does not run again
    assert "running user data" not in console and "ucloud-init: done" in console
    assert not Path("/tmp/a1").exists()


# -- a real guest ---------------------------------------------------------------------------

GUEST_CACHE = Path("/var/cache/ucloud/tinyguest-metadata")  # its own: a recipe change here rebuilds nothing shared


@pytest.mark.qemu
@pytest.mark.slow
async def test_a_tcg_guest_on_the_bridge_gets_its_keys_and_hostname_through_ucloud_init(
        world: World, server: subprocess.Popen[bytes], tmp_path: Path) -> None:
    from tests.support.qemu import (
        console_send,
        kill_leftovers,
        short_run_root,
        tiny_spec,
        wait_for_pattern,
    )
    from ucloud.hostagent.agent import OPENSTACK_PRODUCT, nocloud_serial
    from ucloud.hostagent.hypervisor import NetworkInterface
    from ucloud.hostagent.qemu import QemuDriver
    from ucloud.hostagent.tinyguest import ensure_tiny_guest

    guest = await asyncio.to_thread(ensure_tiny_guest, GUEST_CACHE)
    tap = f"{world.lab.tag[-6:]}t1"
    run("ip", "tuntap", "add", "dev", tap, "mode", "tap")
    spec = msgspec.structs.replace(
        tiny_spec(guest, name="a1", vm_id=world.vms["a1"], interfaces=(NetworkInterface(tap=tap, mac=MAC_A1),)),
        smbios_product=OPENSTACK_PRODUCT, smbios_serial=nocloud_serial(f"http://[{ROUTER}]"))
    with short_run_root() as run_root:
        driver = QemuDriver(run_root, accel="tcg")
        try:
            await driver.start(spec)
            # QEMU holds the tap open; the tap moves into the host namespace, onto the bridge.
            run("ip", "link", "set", tap, "netns", world.lab.host)
            in_ns(world.lab.host, "ip", "link", "set", tap, "master", net.bridge_name(VNI))
            in_ns(world.lab.host, "ip", "link", "set", tap, "up")
            console = driver.serial_log_path(spec.vm_id)
            await wait_for_pattern(console, r"ucloud-init: done", timeout=240)
            text = console.read_text(errors="replace")
            assert f"ucloud-init: key: {PUBLIC_KEY}" in text, text[-2000:]
            assert "ucloud-init: hostname: a1" in text and "ucloud-init: running user data" in text
            console_send(driver.console_path(spec.vm_id),
                         "echo KEYS=$(cat /root/.ssh/authorized_keys | wc -l) HN=$(hostname) "
                         "SERIAL=$(cat /sys/class/dmi/id/product_serial) A1=$(cat /tmp/a1)")
            shown = await wait_for_pattern(console, r"KEYS=(\d+) HN=(\S+) SERIAL=(\S+) A1=(.*)", timeout=60)
            assert shown.group(1, 2, 3) == ("1", "a1", spec.smbios_serial)
            assert shown.group(4).strip() == "a1 was here"
        finally:
            for vm_id in await driver.list_running():
                await driver.kill(vm_id)
            kill_leftovers(run_root)
            run("ip", "link", "del", tap, check=False)


# -- stock cloud-init judges the formats ------------------------------------------------------

CLOUD_INIT_SCRIPT = r"""
import json, sys
from cloudinit import url_helper, util
from cloudinit.net import network_state
from cloudinit.sources import DataSourceNoCloud
from cloudinit.sources.helpers import openstack
from cloudinit import version

base, serial, mac = sys.argv[1], sys.argv[2], sys.argv[3]
out = {"version": version.version_string()}
fill = {}
out["serial_found"] = DataSourceNoCloud.load_cmdline_data(fill, serial)
out["seedfrom"] = fill.get("seedfrom")
md, ud, vd = util.read_seeded(fill["seedfrom"], timeout=5, retries=1)
out["nocloud"] = {"meta": md, "user": ud.decode() if ud is not None else None,
                  "vendor": vd.decode() if vd is not None else None}
config = util.load_yaml(util.decode_binary(url_helper.read_file_or_url(fill["seedfrom"] + "network-config").contents))
state = network_state.parse_net_config_data(config, skip_broken=False)
out["v2"] = [{"mac": i.get("mac_address"), "name": i.get("name"), "subnets": i.get("subnets"),
              "accept_ra": i.get("accept-ra")}
             for i in state.iter_interfaces()]
reader = openstack.MetadataReader(base, timeout=5, retries=1)
found = reader.read_v2()
out["openstack"] = {"meta": found["metadata"], "user": found["userdata"].decode() if found.get("userdata") else None,
                    "vendor": found.get("vendordata")}
out["openstack_net"] = openstack.convert_net_json(found["networkdata"], known_macs={mac: "eth0"})
print(json.dumps(out, default=str))
"""


async def test_cloud_init_22_4s_own_readers_and_parsers_accept_what_is_served(
        world: World, server: subprocess.Popen[bytes]) -> None:
    from ucloud.hostagent.agent import nocloud_serial

    system_python = "/usr/bin/python3"
    assert Path("/usr/lib/python3/dist-packages/cloudinit").is_dir(), \
        "Debian's cloud-init must be installed (./bootstrap installs it)"
    a1 = world.lab.guest(net.bridge_name(VNI), MAC_A1, f"{net.eui64_address(PREFIX, MAC_A1)}/64")
    assert (await until_answered(a1))[0] == 200
    serial = nocloud_serial(f"http://[{ROUTER}]")
    done = await asyncio.to_thread(in_ns, a1, system_python, "-c", CLOUD_INIT_SCRIPT, f"http://[{ROUTER}]",
                                   serial, MAC_A1, timeout=120)
    seen = json.loads(done.stdout)
    assert seen["version"].startswith("22.4")
    assert seen["serial_found"] and seen["seedfrom"] == f"http://[{ROUTER}]/nocloud/"
    assert seen["nocloud"]["meta"] == {"instance-id": f"iid-{world.vms['a1']}", "local-hostname": "a1",
                                       "public-keys": [PUBLIC_KEY]}
    assert seen["nocloud"]["user"] == SCRIPT and seen["nocloud"]["vendor"] == ""
    [nic] = seen["v2"]
    assert (nic["mac"], nic["name"]) == (MAC_A1, "eth0")
    assert nic["accept_ra"] is True and nic["subnets"] == [], nic  # SLAAC: router advertisements, no DHCP
    meta = seen["openstack"]["meta"]
    assert (meta["uuid"], meta["hostname"], meta["name"]) == (str(world.vms["a1"]), "a1", "a1")
    assert meta["public_keys"] == {"laptop": PUBLIC_KEY}
    assert seen["openstack"]["user"] == SCRIPT and seen["openstack"]["vendor"] == {}
    config = seen["openstack_net"]
    assert config["version"] == 1
    [physical] = [c for c in config["config"] if c["type"] == "physical"]
    assert (physical["mac_address"], physical["name"]) == (MAC_A1, "eth0")
    assert [s["type"] for s in physical["subnets"]] == ["ipv6_slaac"]


# -- a stock Debian 12 guest under cloud-init -------------------------------------------------
# The seeds' flow "a user orders an IPv6-only VM with an existing OS": Debian's kernel,
# systemd, cloud-init 22.4 and openssh (hostagent/debianimage.py) on a tap in the bridge,
# with radvd (SLAAC only: no IPv4, no DHCP) and its NoCloud seed in the SMBIOS serial
# pointing at the metadata server at the network's router address; stock cloud-init sets
# the hostname and installs the owner's key, and the test logs in with ssh over the
# guest's EUI-64 address in the /64 with the owner's private key.


def owner_key(directory: Path) -> tuple[Path, str]:
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
        PublicFormat,
    )

    key = ed25519.Ed25519PrivateKey.generate()
    private = directory / "id_ed25519"
    private.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption()))
    private.chmod(0o600)
    public = key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode() + " alice@test"
    return private, public


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.timeout(1800)  # building the image (once, ~6 min here) and a TCG boot of a full Debian
async def test_a_stock_debian_12_guest_gets_its_hostname_and_key_over_ipv6_and_takes_an_ssh_login(
        world: World, server: subprocess.Popen[bytes], tmp_path: Path) -> None:
    from tests.support.qemu import kill_leftovers, short_run_root, wait_for_pattern
    from ucloud.hostagent.agent import OPENSTACK_PRODUCT, nocloud_serial
    from ucloud.hostagent.debianimage import ensure_debian_image
    from ucloud.hostagent.hypervisor import MIB, NetworkInterface, VmSpec
    from ucloud.hostagent.qemu import QemuDriver

    image = await asyncio.to_thread(ensure_debian_image)
    private, public = owner_key(tmp_path)
    await world.commands.add_ssh_key(Actor("alice"), "ssh-test", public)
    radvd = world.lab.radvd(net.bridge_name(VNI), PREFIX, tmp_path)
    disk = tmp_path / "a1.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(image.disk_image), str(disk))
    tap = f"{world.lab.tag[-6:]}t1"
    run("ip", "tuntap", "add", "dev", tap, "mode", "tap")
    spec = VmSpec(vm_id=world.vms["a1"], name="a1", cores=2, ram_bytes=1024 * MIB, disk_path=str(disk),
                  kernel=str(image.kernel), initrd=str(image.initrd), append=image.append,
                  interfaces=(NetworkInterface(tap=tap, mac=MAC_A1),),
                  smbios_product=OPENSTACK_PRODUCT, smbios_serial=nocloud_serial(f"http://[{ROUTER}]"))
    address = net.eui64_address(PREFIX, MAC_A1)
    with short_run_root() as run_root:
        driver = QemuDriver(run_root, accel="tcg", start_timeout=60)
        try:
            await driver.start(spec)
            run("ip", "link", "set", tap, "netns", world.lab.host)
            in_ns(world.lab.host, "ip", "link", "set", tap, "master", net.bridge_name(VNI))
            in_ns(world.lab.host, "ip", "link", "set", tap, "up")
            console = driver.serial_log_path(spec.vm_id)
            # cloud-init's last stage says it finished, and with which datasource.
            done = await wait_for_pattern(console, r"Cloud-init v\. \S+ finished at .*Datasource (\S+)", timeout=900)
            assert "NoCloud" in done.group(1), done.group(0)
            login = await asyncio.to_thread(
                in_ns, world.lab.host, "ssh", "-i", str(private), "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=20", "-o", "BatchMode=yes",
                f"debian@{address}", "hostname; cat /etc/os-release | grep VERSION_ID; ip -6 -o addr show dev eth0",
                timeout=180)
            lines = login.stdout.splitlines()
            assert lines[0] == "a1", login.stdout
            assert lines[1] == 'VERSION_ID="12"'
            assert address in login.stdout
        finally:
            for vm_id in await driver.list_running():
                await driver.kill(vm_id)
            kill_leftovers(run_root)
            radvd.terminate()
            radvd.wait(10)
            run("ip", "link", "del", tap, check=False)
