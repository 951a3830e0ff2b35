"""What the metadata server says, in each dialect: ucloud's own JSON, OpenStack's
config-drive/metadata-service layout, and NoCloud's seed files. Pure functions of one
VM's ``Metadata``; the server (gateway/metadata.py) finds which VM asks."""

from __future__ import annotations

from typing import Any

import msgspec

from ucloud.projections.metadata import Metadata, NicConfig

# cloud-init's OpenStack datasource is only tried when the DMI product name says so.
OPENSTACK_PRODUCT_NAME = "OpenStack Nova"
OPENSTACK_VERSIONS = ("2012-08-10", "2013-04-04", "2013-10-17", "2015-10-15", "2016-06-30", "2016-10-06",
                      "2017-02-22", "2018-08-27", "latest")


def _json(value: Any) -> bytes:
    return msgspec.json.encode(value) + b"\n"


def authorized_keys(md: Metadata) -> str:
    """The keys as an authorized_keys file: one line each."""
    return "".join(f"{line}\n" for _, line in md.ssh_keys)


# -- ucloud ----------------------------------------------------------------------------------


def ucloud_network(md: Metadata) -> dict[str, Any]:
    return {"nics": [msgspec.to_builtins(nic) for nic in md.nics]}


def ucloud_document(md: Metadata) -> bytes:
    return _json({
        "uuid": md.uuid, "name": md.name, "hostname": md.hostname, "owner": md.owner,
        "ssh_keys": [{"name": name, "public_key": line} for name, line in md.ssh_keys],
        "user_data": md.user_data, "network": ucloud_network(md),
    })


# -- OpenStack -------------------------------------------------------------------------------


def openstack_meta_data(md: Metadata) -> bytes:
    return _json({
        "uuid": md.uuid, "name": md.name, "hostname": md.hostname, "launch_index": 0,
        "availability_zone": "ucloud", "project_id": md.owner,
        "public_keys": {name: line for name, line in md.ssh_keys},
        "keys": [{"name": name, "type": "ssh", "data": line} for name, line in md.ssh_keys],
        "meta": {},
    })


def openstack_network_data(md: Metadata) -> bytes:
    """network_data.json: a link per NIC (by MAC); SLAAC on automatic networks, the
    EUI-64 address on manual ones, nothing on layer-2-only ones."""
    links, networks = [], []
    for nic in md.nics:
        link = f"tap-{nic.name}"
        links.append({"id": link, "type": "phy", "ethernet_mac_address": nic.mac, "name": nic.name})
        if nic.ipam == "auto":
            networks.append({"id": f"network-{nic.name}", "link": link, "type": "ipv6_slaac",
                             "network_id": nic.network_id})
        elif nic.ipam == "manual":
            networks.append({"id": f"network-{nic.name}", "link": link, "type": "ipv6",
                             "ip_address": nic.address, "netmask": "ffff:ffff:ffff:ffff::",
                             "network_id": nic.network_id, "routes": []})
    return _json({"links": links, "networks": networks, "services": []})


# -- NoCloud ---------------------------------------------------------------------------------
# JSON is YAML: cloud-init reads meta-data and network-config with its YAML loader.


def nocloud_meta_data(md: Metadata) -> bytes:
    return _json({"instance-id": f"iid-{md.uuid}", "local-hostname": md.hostname,
                  "public-keys": [line for _, line in md.ssh_keys]})


def _v2_ethernet(nic: NicConfig) -> dict[str, Any]:
    config: dict[str, Any] = {"match": {"macaddress": nic.mac}, "set-name": nic.name, "dhcp4": False,
                              "dhcp6": False}
    if nic.ipam == "auto":
        config["accept-ra"] = True
    elif nic.ipam == "manual":
        config["accept-ra"] = False
        config["addresses"] = [f"{nic.address}/64"]
    return config


def nocloud_network_config(md: Metadata) -> bytes:
    """Network configuration version 2, one ethernet per NIC matched by MAC."""
    return _json({"version": 2, "ethernets": {nic.name: _v2_ethernet(nic) for nic in md.nics}})
