"""`ucloud-host`: the host agent as its own daemon (one per machine)."""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import ipaddress
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

import click

from ucloud.commands.service import CommandService
from ucloud.domain.errors import DomainError
from ucloud.domain.host import host_id_for
from ucloud.eventstore.leases import leases_for
from ucloud.eventstore.url import InvalidStoreUrl, open_store
from ucloud.imagestore.stores import parse_stores

from .agent import HostAgent
from .debianimage import DebianImageError
from .hypervisor import HypervisorDriver
from .images import ImageCatalogue
from .network.linux import LinuxNetworkDriver
from .options import agent_options
from .qemu import QemuDriver
from .watchdog import WatchdogFeed
from .writes import CredentialError, DirectWrites, GatewayWrites, HostWrites, read_credential


@dataclass(frozen=True)
class NetworkOptions:
    """How this host joins networks (docs/operations.md, "Networks on a host")."""

    enabled: bool = True
    underlay: str | None = None  # the device VXLAN leaves by; None: networks stay on this host
    address: str | None = None  # the underlay source address
    mtu: int | None = None  # the underlay MTU (default: the device's)
    router: bool = False  # route every IPAM network: /64's first address, radvd for auto ones
    rdnss: tuple[str, ...] = ()

    def driver(self, state_dir: Path) -> LinuxNetworkDriver | None:
        if not self.enabled:
            return None
        return LinuxNetworkDriver(state_dir / "net", underlay=self.underlay, local=self.address, mtu=self.mtu)


async def run_agent(store_url: str, state_dir: Path, hostname: str, accel: str, tiny: bool,
                    metadata_url: str | None = None, lease_ttl: float = 3.0, lease_margin: float = 0.5,
                    image_stores: tuple[str, ...] = (), debian12: bool = False,
                    network: NetworkOptions | None = None, gateway: str | None = None,
                    credential: str | None = None, driver: HypervisorDriver | None = None) -> None:
    """``gateway`` and ``credential``: write through the gateway's host routes with this
    host's credential; without them the agent writes to the log itself (it then needs
    the control role on etcd). ``driver``: the hypervisor driver (None: QEMU under
    ``state_dir/run``); only the start-up benchmark passes another one
    (tests/bench/fake_hypervisor.py)."""
    network = network or NetworkOptions()
    stores = parse_stores(image_stores or (f"local=fs:{state_dir / 'image-store'}",))
    store = open_store(store_url)
    leases = leases_for(store)
    writes: HostWrites = (GatewayWrites(gateway, credential) if gateway is not None and credential is not None
                          else DirectWrites(CommandService(store), hostname))
    try:
        images = ImageCatalogue(state_dir / "images")

        async def prepare() -> None:
            if tiny:
                await asyncio.to_thread(images.install_tiny, state_dir / "cache" / "tinyguest")
            if debian12:
                await asyncio.to_thread(images.install_debian12, state_dir / "cache" / "debian-12")

        if driver is None:
            driver = QemuDriver(state_dir / "run", accel=accel)  # type: ignore[arg-type]
        agent = HostAgent(store, writes, driver, images, state_dir=state_dir, hostname=hostname,
                          metadata_url=metadata_url, leases=leases, lease_ttl=lease_ttl,
                          lease_margin=lease_margin, feed=WatchdogFeed(state_dir), prepare=prepare, stores=stores,
                          network=network.driver(state_dir), router=network.router, rdnss=network.rdnss)
        task = asyncio.create_task(agent.run())
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task
    finally:
        await writes.close()
        await leases.close()
        await store.close()


@click.command()
@click.option("--store", "store_url", envvar="UCLOUD_STORE", required=True,
              help="The log: etcd://host:port[,host:port][/prefix] or sqlite:///path.")
@click.option("--state-dir", type=click.Path(path_type=Path), default=Path("/var/lib/ucloud"), show_default=True)
@agent_options
@click.option("--no-tiny", is_flag=True, help="Do not build and publish the built-in image 'tiny'.")
@click.option("--image-store", "image_stores", multiple=True, metavar="NAME=fs:/PATH|NAME=rbd:POOL[:CONF]",
              help="An image store this host reaches (repeat). Default: local=fs:<state-dir>/image-store.")
@click.option("--lease-ttl", type=click.FloatRange(min=1, max=60), default=3.0, show_default=True,
              help="Seconds of the heartbeat lease: the host is declared dead about this long after it stops.")
@click.option("--lease-margin", type=click.FloatRange(min=0.1), default=0.5, show_default=True,
              help="The agent fences its guests this long before its lease could expire.")
@click.option("--debian-12", "debian12", is_flag=True,
              help="Build (once, ~500 MB of Debian packages) and publish the stock image 'debian-12' "
                   "(cloud-init, openssh).")
@click.option("--underlay-mtu", type=click.IntRange(1280 + 70, 65535), metavar="BYTES",
              help="The underlay's MTU (default: the device's); NICs get 70 bytes less.")
@click.option("--router", is_flag=True, envvar="UCLOUD_ROUTER",
              help="This host routes every network with IPAM: it holds each /64's first address and runs "
                   "radvd for the automatic ones (sets net.ipv6.conf.all.forwarding=1).")
@click.option("--rdnss", multiple=True, metavar="ADDR", help="A DNS server radvd announces (repeat).")
@click.option("--no-network", is_flag=True, help="No network driver: VMs run without their NICs.")
@click.option("--gateway", envvar="UCLOUD_GATEWAY", metavar="URL",
              help="Write through this gateway's host routes with this host's credential (--credential-file) "
                   "instead of to the log: the agent then needs only the host role on etcd "
                   "(docs/operations.md, \"Host credentials\").")
@click.option("--credential-file", type=click.Path(path_type=Path), envvar="UCLOUD_HOST_CREDENTIAL", metavar="FILE",
              help="This host's credential (from 'ucloud host join'), in a 0600 file. Needs --gateway.")
@click.option("-v", "--verbose", is_flag=True)
def main(store_url: str, state_dir: Path, hostname: str, accel: str, no_tiny: bool, image_stores: tuple[str, ...],
         metadata_url: str | None, lease_ttl: float, lease_margin: float, debian12: bool, underlay: str | None,
         underlay_address: str | None, underlay_mtu: int | None, router: bool, rdnss: tuple[str, ...],
         no_network: bool, gateway: str | None, credential_file: Path | None, verbose: bool) -> None:
    """Run the host agent: register this host and make its VMs match the log."""
    if lease_margin >= lease_ttl:
        raise click.UsageError(f"--lease-margin ({lease_margin}) must be below --lease-ttl ({lease_ttl})")
    if (gateway is None) != (credential_file is None):
        raise click.UsageError("--gateway and --credential-file go together")
    credential = None
    if credential_file is not None:
        try:
            credential = read_credential(credential_file)
        except CredentialError as error:
            raise click.UsageError(str(error)) from None
        credited = GatewayWrites(gateway or "", credential).host_id
        if credited != host_id_for(hostname):
            raise click.UsageError(f"the credential in {credential_file} is for host {credited}, but --hostname "
                                   f"{hostname!r} is host {host_id_for(hostname)}")
    for value, option in ((underlay_address, "--underlay-address"), *((a, "--rdnss") for a in rdnss)):
        if value is not None:
            try:
                ipaddress.IPv6Address(value)
            except ValueError:
                raise click.UsageError(f"{option}: {value!r} is not an IPv6 address") from None
    network = NetworkOptions(enabled=not no_network, underlay=underlay, address=underlay_address, mtu=underlay_mtu,
                             router=router, rdnss=rdnss)
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` prints every thread's stack (a hung agent)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        parse_stores(image_stores)
        asyncio.run(run_agent(store_url, state_dir.absolute(), hostname, accel, not no_tiny, metadata_url,
                              lease_ttl, lease_margin, image_stores, debian12, network, gateway, credential))
    except (InvalidStoreUrl, ValueError) as error:
        raise click.UsageError(str(error)) from None
    except DomainError as error:  # a refusal of the writer: a revoked credential, a removed host
        raise click.ClickException(f"refused: {error}") from None
    except DebianImageError as error:
        raise click.ClickException(f"cannot build the image debian-12: {error}") from None
