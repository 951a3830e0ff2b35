"""Metadata end to end, through the `ucloud` CLI: the networks' two-host lab (hosts as
namespaces on an IPv6 underlay, etcd and the control plane in a third, a `ucloud-host`
in each) with a `ucloud metadata` process of its own on each host. A user adds an SSH key
and creates a tiny guest on an automatic network; the guest gets SLAAC and runs
ucloud-init at boot, and its console shows the owner's key and the hostname (and its SMBIOS
serial the NoCloud seed at the network's router address, for stock cloud-init). Another
user's guest gets only its own owner's key. A key added after boot is there when
ucloud-init runs again."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration import test_networks_e2e as e2e
from tests.integration.test_metadata_server import new_key
from tests.support.gateway import OTHER_KEY, PUBLIC_KEY
from ucloud.domain import network as net

pytestmark = [pytest.mark.netns, pytest.mark.qemu, pytest.mark.etcd, pytest.mark.slow]

lab = e2e.lab  # the fixture
LATER = new_key("alice@later")


def as_user(lab: e2e.Lab, user: str, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", "netns", "exec", lab.core, str(e2e.BIN / "ucloud"), "--api",
                           f"http://[{e2e.CORE}]:{e2e.API_PORT}", "--user", user, *args],
                          env=lab.env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, f"ucloud {' '.join(args)} as {user}: {done.stderr}\n{lab.logs()}"
    return done


@pytest.fixture
def metadata_servers(lab: e2e.Lab) -> Iterator[list[subprocess.Popen[bytes]]]:
    servers = []
    for hostname, namespace in lab.hosts.items():
        log = open(lab.tmp / f"metadata-{hostname}.log", "ab")
        servers.append(subprocess.Popen(
            ["ip", "netns", "exec", namespace, str(e2e.BIN / "ucloud"), "metadata", "--store",
             f"etcd://[{e2e.CORE}]:{e2e.ETCD_PORT}/nets/v1"], stdout=log, stderr=log, start_new_session=True))
    try:
        yield servers
    finally:
        for server in servers:
            os.killpg(server.pid, signal.SIGTERM)
        for server in servers:
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)


def create_vm(lab: e2e.Lab, user: str, name: str, network: str) -> dict[str, Any]:
    created = json.loads(as_user(lab, user, "vm", "create", name, "--image", "tiny", "--cores", "1", "--ram",
                                 "192MB", "--disk", "1GB", "--network", network, "--wait", "--timeout", "240",
                                 "--json").stdout)
    return json.loads(as_user(lab, user, "vm", "show", created["id"], "--json").stdout)  # type: ignore[no-any-return]


@pytest.mark.timeout(900)
def test_guests_learn_their_owners_keys_and_hostname_through_ucloud_init_and_nothing_of_others(
        lab: e2e.Lab, metadata_servers: list[subprocess.Popen[bytes]], tmp_path: Path) -> None:
    (tmp_path / "alice.pub").write_text(PUBLIC_KEY + "\n")
    as_user(lab, "alice", "key", "add", "laptop", str(tmp_path / "alice.pub"))
    as_user(lab, "bob", "key", "add", "desk", OTHER_KEY)
    lan = json.loads(as_user(lab, "alice", "network", "create", "lan", "--ipam", "auto", "--json").stdout)
    as_user(lab, "bob", "network", "create", "blan", "--ipam", "auto")
    a1 = create_vm(lab, "alice", "a1", "lan")
    b1 = create_vm(lab, "bob", "b1", "blan")

    for vm in (a1, b1):
        e2e.wait_for(lambda vm=vm: "ucloud-init: done" in lab.serial(vm), f"ucloud-init in {vm['name']}", lab)
        e2e.wait_for(lambda vm=vm: vm["nics"][0]["address"] in e2e.nic_addresses(lab.serial(vm)),
                     f"{vm['name']}'s SLAAC address", lab)
    alice_console, bob_console = lab.serial(a1), lab.serial(b1)
    assert f"ucloud-init: key: {PUBLIC_KEY}" in alice_console and "ucloud-init: hostname: a1" in alice_console
    assert "ucloud-init: authorized_keys for /root: 1 key(s)" in alice_console
    assert f"ucloud-init: key: {OTHER_KEY}" in bob_console and "ucloud-init: hostname: b1" in bob_console
    assert PUBLIC_KEY not in bob_console and OTHER_KEY not in alice_console
    answer = lab.console(a1, "echo HN-$(hostname)-$(wc -l < /root/.ssh/authorized_keys)")
    assert "HN-a1-1" in answer, answer
    # Stock cloud-init's way in: the NoCloud seed at the network's router address, in the serial.
    seed = f"ds=nocloud-net;s=http://[{net.router_address(lan['prefix'])}]/nocloud/"
    answer = lab.console(a1, "echo SERIAL-$(cat /sys/class/dmi/id/product_serial)-END")
    assert f"SERIAL-{seed}-END" in answer, answer

    # A key added after boot: the next run of ucloud-init installs it.
    as_user(lab, "alice", "key", "add", "later", LATER)
    deadline = time.monotonic() + 60
    while True:
        answer = lab.console(a1, "/usr/sbin/ucloud-init >/dev/null 2>&1; echo KEYS-$(wc -l < /root/.ssh/authorized_keys)")
        if "KEYS-2" in answer or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert "KEYS-2" in answer, answer


@pytest.mark.timeout(1500)
def test_a_user_orders_an_ipv6_only_debian_12_vm_through_the_cli_and_logs_in_with_ssh(
        lab: e2e.Lab, metadata_servers: list[subprocess.Popen[bytes]], tmp_path: Path) -> None:
    """The seeds' flow "a user orders an IPv6-only VM with an existing OS through the CLI":
    stock cloud-init 22.4 in the debian-12 image finds the metadata server through the
    seed the host agent put in the SMBIOS serial, sets the hostname and installs the key;
    the user logs in over the VM's address in the /64 with the private key."""
    from tests.integration.test_metadata_server import owner_key
    from ucloud.hostagent.debianimage import ensure_debian_image
    from ucloud.hostagent.images import ImageCatalogue

    image = ensure_debian_image()  # cached between runs
    for state in lab.state.values():
        ImageCatalogue(state / "images").install_debian12(image.disk_image.parent)
    private, public = owner_key(tmp_path)
    as_user(lab, "alice", "key", "add", "laptop", public)
    lan = json.loads(as_user(lab, "alice", "network", "create", "lan", "--ipam", "auto", "--json").stdout)
    created = json.loads(as_user(lab, "alice", "vm", "create", "deb", "--image", "debian-12", "--cores", "2",
                                 "--ram", "1GB", "--disk", "4GB", "--network", "lan", "--wait", "--timeout", "300",
                                 "--json").stdout)
    vm = json.loads(as_user(lab, "alice", "vm", "show", created["id"], "--json").stdout)
    address = vm["nics"][0]["address"]
    assert address == net.eui64_address(lan["prefix"], vm["nics"][0]["mac"])
    e2e.wait_for(lambda: re.search(r"Cloud-init v\. \S+ finished at .*DataSourceNoCloudNet", lab.serial(vm)),
                 "cloud-init finished in the Debian guest", lab, timeout=1000)
    login = subprocess.run(
        ["ip", "netns", "exec", lab.hosts["ha"], "ssh", "-i", str(private), "-o", "StrictHostKeyChecking=no",
         "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=20", "-o", "BatchMode=yes",
         f"debian@{address}", "hostname; grep VERSION_ID /etc/os-release"],
        capture_output=True, text=True, timeout=180, check=False)
    assert login.returncode == 0, login.stderr
    assert login.stdout.splitlines() == ["deb", 'VERSION_ID="12"'], login.stdout
