"""Networks through the CLI against a served gateway, with the IPAM allocator following
the same log: create/list/show/delete, VMs created on networks, attach and detach, the
NICs `vm show` lists, and owner isolation."""

from __future__ import annotations

import asyncio
import ipaddress
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_cli import as_json, fails, ok
from tests.support.gateway import ServedGateway, served_gateway
from ucloud.domain import network as net
from ucloud.processes.ipam import IpamAllocator

POOL = "fd00:5:6::/56"


@pytest.fixture(scope="module")
def served() -> Iterator[ServedGateway]:
    with served_gateway() as gateway:
        allocator = IpamAllocator(gateway.store, gateway.commands.codec, pool=POOL)

        async def start() -> asyncio.Task[None]:
            return asyncio.create_task(allocator.run())

        task = gateway.run(start())
        try:
            yield gateway
        finally:
            gateway.loop.call_soon_threadsafe(task.cancel)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, served: ServedGateway) -> Path:
    for name in ("UCLOUD_API", "UCLOUD_USER", "UCLOUD_REALM", "UCLOUD_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("UCLOUD_API", served.url)
    return tmp_path


def me() -> str:
    return f"u{uuid.uuid4().hex[:10]}"


def vm_with_macs(user: str, vm_id: str) -> dict[str, Any]:
    for _ in range(200):
        found = as_json(ok("--user", user, "vm", "show", vm_id, "--json"))
        if all(n["mac"] for n in found["nics"]):
            return found
        time.sleep(0.05)
    raise AssertionError("the NICs got no MAC")


def test_networks_are_created_with_vni_group_and_64_and_listed(home: Path, served: ServedGateway) -> None:
    user = me()
    auto = as_json(ok("--user", user, "network", "create", "lan", "--ipam", "auto", "--json"))
    manual = as_json(ok("--user", user, "network", "create", "man", "--ipam", "manual", "--json"))
    l2 = as_json(ok("--user", user, "network", "create", "l2", "--ipam", "none", "--json"))
    for found in (auto, manual, l2):
        assert found["status"] == "ready" and found["group"] == net.multicast_group(found["vni"])
    assert len({auto["vni"], manual["vni"], l2["vni"]}) == 3
    for found in (auto, manual):
        assert ipaddress.IPv6Network(found["prefix"]).subnet_of(ipaddress.IPv6Network(POOL))
    assert auto["router"] == str(ipaddress.IPv6Network(auto["prefix"])[1])
    assert manual["router"] is None and l2["prefix"] is None
    listed = as_json(ok("--user", user, "network", "list", "--json"))
    assert sorted(n["name"] for n in listed) == ["l2", "lan", "man"]
    text = ok("--user", user, "network", "show", "lan").stdout
    assert auto["prefix"] in text and str(auto["vni"]) in text
    # Another user sees none of it.
    other = me()
    fails(1, "--user", other, "network", "show", "lan", match="no network named 'lan'")
    assert as_json(ok("--user", other, "network", "list", "--json")) == []
    fails(1, "--user", other, "network", "delete", "lan", match="no network named 'lan'")
    fails(1, "--user", user, "network", "create", "lan", "--ipam", "auto", match="already exists")
    fails(1, "--user", user, "network", "create", "Bad_Name", match="is not a name")


def test_vm_nics_in_order_with_mac_link_local_and_eui64_address(home: Path, served: ServedGateway) -> None:
    user = me()
    lan = as_json(ok("--user", user, "network", "create", "lan", "--json"))
    ok("--user", user, "network", "create", "l2", "--ipam", "none")
    created = as_json(ok("--user", user, "vm", "create", "web", "--image", "tiny", "--ram", "64MB", "--disk", "1GB",
                         "--network", "lan", "--network", "l2", "--json"))
    vm = vm_with_macs(user, created["id"])
    first, second = vm["nics"]
    assert (first["network"], second["network"]) == ("lan", "l2")
    assert first["mac"] != second["mac"] and all(net.is_local_unicast(n["mac"]) for n in vm["nics"])
    assert first["address"] == net.eui64_address(lan["prefix"], first["mac"])
    assert first["link_local"] == net.link_local_address(first["mac"]) and second["address"] is None
    text = ok("--user", user, "vm", "show", created["id"]).stdout
    assert first["mac"] in text and first["address"] in text
    # The network names its VM; deleting it is refused, naming the VM.
    assert as_json(ok("--user", user, "network", "show", "lan", "--json"))["vms"] == [created["id"]]
    fails(1, "--user", user, "network", "delete", "lan", match=created["id"])
    ok("--user", user, "vm", "detach-network", created["id"], "lan")
    assert [n["network"] for n in as_json(ok("--user", user, "vm", "show", created["id"], "--json"))["nics"]] == ["l2"]
    ok("--user", user, "network", "delete", "lan")
    fails(1, "--user", user, "vm", "detach-network", created["id"], "lan", match="no NIC")
    # Attach again (a new network of that name): a new NIC with a new MAC, last in order.
    ok("--user", user, "network", "create", "lan", "--ipam", "manual")
    ok("--user", user, "vm", "attach-network", created["id"], "lan")
    vm = vm_with_macs(user, created["id"])
    assert [n["network"] for n in vm["nics"]] == ["l2", "lan"]
    assert vm["nics"][1]["mac"] not in (first["mac"], second["mac"])
    fails(1, "--user", user, "vm", "attach-network", created["id"], "lan", match="already on network")
    # Someone else's VM and networks do not exist for you.
    other = me()
    ok("--user", other, "network", "create", "lan", "--ipam", "none")
    fails(1, "--user", other, "vm", "attach-network", created["id"], "lan", match="does not exist")
    fails(1, "--user", other, "vm", "create", "x", "--image", "tiny", "--network", "nope", match="no network named")
