"""Command-line options of a host agent, shared by ``ucloud-host`` and ``ucloud up`` (which
runs one on its machine): one definition, so both parse and explain them alike."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import click

_OPTIONS = (
    click.option("--hostname", default=socket.gethostname(), show_default=True, help="This host's name in ucloud."),
    click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), default="auto", show_default=True,
                 help="auto: KVM only when a test boot proves it works, else TCG."),
    click.option("--metadata-url", envvar="UCLOUD_METADATA_URL", metavar="URL",
                 help="The metadata server's routable base URL (e.g. http://[2001:db8::1]); guests' cloud-init "
                      "gets it as its NoCloud seed in the SMBIOS serial (docs/metadata.md)."),
    click.option("--underlay", envvar="UCLOUD_UNDERLAY", metavar="DEV",
                 help="The device networks' VXLAN traffic (IPv6 multicast, UDP 4789) leaves by, to reach "
                      "other hosts. Without it, networks stay on this host (a bridge without VXLAN)."),
    click.option("--underlay-address", envvar="UCLOUD_UNDERLAY_ADDRESS", metavar="ADDR",
                 help="The IPv6 source address of VXLAN traffic on the underlay."),
)


def agent_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--hostname, --accel, --metadata-url, --underlay, --underlay-address."""
    for option in reversed(_OPTIONS):
        command = option(command)
    return command
