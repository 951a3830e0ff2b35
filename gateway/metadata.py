"""The metadata server (``ucloud metadata``): a guest asks, and learns its own data only.

It answers from the metadata projection (projections/metadata.py), which it keeps
following the log, so any number of instances serve the same answers. On each host it
puts ``fe80::a9fe:a9fe`` (the link-local address OpenStack and cloud-init use) on every
bridge of a network it knows and listens there and on the bridge's routable addresses
(the router address ``<prefix>::1``), port 80, with SO_REUSEPORT (several instances may
share the port); ``--listen`` adds other addresses.

Who asks is read from the connection, never from anything the guest says:
- the network is the bridge the request came in on (the link-local peer's scope, the
  interface index, names the bridge, ``ucbr<VNI in hex>``), or for a routable source the
  network whose /64 holds it;
- the MAC is the one the source's EUI-64 interface identifier was made from;
- (network, MAC) is a NIC, and the NIC a VM.
A link-local source is also checked against the kernel's neighbour entry: the MAC the
host resolved the address to must be the MAC the address names. The source itself is
made trustworthy by the port firewall of the networks (no IPv6 source spoofing); the
neighbour check is a second line, not a replacement (docs/metadata.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from uuid import UUID

import msgspec
from aiohttp import web

from ucloud.domain import network as net
from ucloud.domain import vm as vm_domain
from ucloud.domain.catalogue import build_codec
from ucloud.eventstore.interface import EventStore
from ucloud.eventstore.url import open_store
from ucloud.projections.metadata import Metadata, MetadataView
from ucloud.projections.runner import ProjectionRunner

from . import metadata_formats as fmt

log = logging.getLogger(__name__)

METADATA_ADDRESS = "fe80::a9fe:a9fe"  # 169.254.169.254 in the low 32 bits, as OpenStack and cloud-init use
PROBLEM_JSON = "application/problem+json"


@dataclasses.dataclass
class MetadataConfig:
    store_url: str = "sqlite:///var/lib/ucloud/events.sqlite"
    store: EventStore | None = None  # an open store the caller owns; else store_url is opened
    # Routable addresses to listen on besides the bridges ("::" takes every address).
    listen: tuple[str, ...] = ()
    port: int = 80
    reuse_port: bool = True  # any number of instances on one host share the port
    # Listen on fe80::a9fe:a9fe and the routable addresses of every bridge of a network in
    # the projection, followed every bridge_scan_interval seconds.
    bridges: bool = True
    # Put fe80::a9fe:a9fe on those bridges (and keep it there) when it is missing.
    link_local: bool = True
    bridge_scan_interval: float = 2.0
    # Check a link-local source against the kernel's neighbour entry (see the module doc).
    check_neighbour: bool = True
    snapshot_interval: float = 30.0
    projection_name: str = "metadata"

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535, got {self.port}")
        if not self.listen and not self.bridges:
            raise ValueError("nothing to listen on: no address and no bridges")


class Unknown(Exception):
    """The requester is no NIC we know: 404 with the reason."""


class NotReady(Exception):
    """The projection has not yet read the log up to its head: 503."""


class Identity(msgspec.Struct, frozen=True):
    address: str
    interface: str
    network_id: UUID
    mac: str


VIEW = web.AppKey("metadata_view", MetadataView)
RUNNER = web.AppKey("metadata_runner", ProjectionRunner)
Identify = Callable[[web.Request], Identity]
IDENTIFY: web.AppKey[Identify] = web.AppKey("metadata_identify")
READY = web.AppKey("metadata_ready", asyncio.Event)


# -- who asks ------------------------------------------------------------------------------


class Neighbours:
    """The kernel's neighbour table, asked per request: one RTM_GETNEIGH on a netlink
    socket (tens of microseconds; the kernel answers at once, so the call blocks no
    longer than a dict lookup would matter)."""

    _HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port
    _NDMSG = struct.Struct("=BxxxiHBB")  # family, ifindex, state, flags, type
    _ATTR = struct.Struct("=HH")
    RTM_NEWNEIGH, RTM_GETNEIGH, NLMSG_ERROR, NLM_F_REQUEST, NDA_DST, NDA_LLADDR = 28, 30, 2, 1, 1, 2

    def __init__(self) -> None:
        self._socket = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self._socket.settimeout(0.5)
        self._socket.bind((0, 0))
        self._sequence = 0

    def mac_of(self, address: str, ifindex: int) -> str | None:
        """The link-layer address the kernel holds for ``address`` on ``ifindex``, or None."""
        self._sequence = (self._sequence + 1) & 0xFFFFFFFF
        dst = ipaddress.IPv6Address(address).packed
        attr = self._ATTR.pack(self._ATTR.size + len(dst), self.NDA_DST) + dst
        body = self._NDMSG.pack(socket.AF_INET6, ifindex, 0, 0, 0) + attr
        self._socket.send(self._HEADER.pack(self._HEADER.size + len(body), self.RTM_GETNEIGH,
                                            self.NLM_F_REQUEST, self._sequence, 0) + body)
        while True:
            try:
                data = self._socket.recv(65536)
            except OSError:
                return None
            length, kind, _, sequence, _ = self._HEADER.unpack_from(data)
            if sequence != self._sequence:
                continue  # an answer to an earlier request that timed out
            if kind != self.RTM_NEWNEIGH:
                return None  # NLMSG_ERROR: no entry
            offset = self._HEADER.size + self._NDMSG.size
            while offset + self._ATTR.size <= length:
                size, attr_type = self._ATTR.unpack_from(data, offset)
                if size < self._ATTR.size:
                    return None
                if attr_type == self.NDA_LLADDR and size == self._ATTR.size + 6:
                    raw = data[offset + self._ATTR.size: offset + size]
                    return ":".join(f"{b:02x}" for b in raw)
                offset += (size + 3) & ~3
            return None

    def close(self) -> None:
        self._socket.close()


_NAMES: dict[int, tuple[float, str]] = {}


def interface_name(index: int) -> str:
    """The interface's name, remembered for a second (a bridge deleted and made again may
    get another index; a name is never trusted longer than that)."""
    now = time.monotonic()
    known = _NAMES.get(index)
    if known is not None and now - known[0] < 1.0:
        return known[1]
    try:
        name = socket.if_indextoname(index)
    except OSError:
        name = f"#{index}"
    if len(_NAMES) > 4096:
        _NAMES.clear()
    _NAMES[index] = (now, name)
    return name


def identify(view: MetadataView, peer: Any, neighbours: Neighbours | None) -> Identity:
    """The NIC a connection comes from, from its peer address (host, port, flow, scope)."""
    if not isinstance(peer, tuple) or len(peer) < 4:
        raise Unknown("the metadata server answers over IPv6 only; this request came over IPv4")
    host, scope = str(peer[0]).split("%", 1)[0], int(peer[3])
    address = ipaddress.IPv6Address(host)
    if address.ipv4_mapped is not None:
        raise Unknown("the metadata server answers over IPv6 only; this request came over IPv4")
    interface = ""
    ingress: UUID | None = None
    if scope:
        interface = interface_name(scope)
        vni = net.vni_of_bridge(interface)
        ingress = view.network_of_vni(vni) if vni is not None else None
    mac = net.mac_of_eui64(host)
    if mac is None:
        raise Unknown(f"source {host} is not an EUI-64 address: the metadata server finds a VM's NIC by "
                      "the MAC in its SLAAC or link-local address (stable privacy addresses cannot be served)")
    if address.is_link_local:
        if ingress is None:
            raise Unknown(f"request from {host} came in on interface {interface or '?'}, which is no ucloud "
                          "network's bridge on this host")
        network_id = ingress
        if neighbours is not None:
            seen = neighbours.mac_of(host, scope)
            if seen is not None and seen != mac:
                raise Unknown(f"source {host} names MAC {mac}, but the host resolved it to {seen}: "
                              "the address is not that NIC's")
    else:
        found = view.network_of_address(address)
        if found is None:
            raise Unknown(f"source {host} is in no ucloud network's /64")
        if ingress is not None and ingress != found:
            raise Unknown(f"source {host} is in another network's /64 than the bridge {interface} it came in on")
        network_id = found
    return Identity(address=host, interface=interface, network_id=network_id, mac=mac)


# -- answers -----------------------------------------------------------------------------------


def _problem(status: int, title: str, detail: str) -> web.Response:
    body = {"type": f"urn:ucloud:problem:metadata-{'unknown' if status == 404 else 'unavailable'}",
            "title": title, "status": status, "detail": detail}
    return web.Response(body=msgspec.json.encode(body) + b"\n", status=status, content_type=PROBLEM_JSON)


def _metadata(request: web.Request) -> Metadata:
    if not request.app[READY].is_set():
        raise NotReady("the metadata server is still reading the log; ask again in a moment")
    view = request.app[VIEW]
    who = request.app[IDENTIFY](request)
    vm = view.vm_of(who.network_id, who.mac)
    if vm is None:
        network = view.networks.get(who.network_id)
        raise Unknown(f"no VM has a NIC with MAC {who.mac} on network "
                      f"{network.name if network else who.network_id} (source {who.address})")
    if vm.status is vm_domain.Status.DELETING:
        raise Unknown(f"VM {vm.id} is being deleted")
    return view.metadata(vm)


Render = Callable[[Metadata], "bytes | str | None"]


def _answer(render: Render, content_type: str = "text/plain") -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        try:
            md = _metadata(request)
        except Unknown as error:
            return _problem(404, "Not a known VM", str(error))
        except NotReady as error:
            return _problem(503, "Not ready", str(error))
        body = render(md)
        if body is None:
            return _problem(404, "Not set", f"VM {md.name} has no such item")
        return web.Response(body=body.encode() if isinstance(body, str) else body, content_type=content_type,
                            charset="utf-8" if content_type.startswith("text/") else None)

    return handler


def _user_data(md: Metadata) -> str | None:
    return md.user_data or None  # OpenStack answers 404 when there is none; cloud-init expects that


def _index(entries: tuple[str, ...]) -> Render:
    text = "".join(f"{e}\n" for e in entries)
    return lambda md: text


def routes() -> web.RouteTableDef:
    table = web.RouteTableDef()
    JSON = "application/json"
    # ucloud's own
    table.get("/")(_answer(fmt.ucloud_document, JSON))
    table.get("/ssh-keys")(_answer(fmt.authorized_keys))
    table.get("/hostname")(_answer(lambda md: md.hostname + "\n"))
    table.get("/user-data")(_answer(lambda md: md.user_data))
    table.get("/network")(_answer(lambda md: msgspec.json.encode(fmt.ucloud_network(md)) + b"\n", JSON))
    # OpenStack (any version name answers alike)
    table.get("/openstack")(_answer(_index(fmt.OPENSTACK_VERSIONS)))
    table.get("/openstack/")(_answer(_index(fmt.OPENSTACK_VERSIONS)))
    table.get("/openstack/{version}/meta_data.json")(_answer(fmt.openstack_meta_data, JSON))
    table.get("/openstack/{version}/user_data")(_answer(_user_data, "application/octet-stream"))
    table.get("/openstack/{version}/network_data.json")(_answer(fmt.openstack_network_data, JSON))
    table.get("/openstack/{version}/vendor_data.json")(_answer(lambda md: b"{}\n", JSON))
    table.get("/openstack/{version}/vendor_data2.json")(_answer(lambda md: b"{}\n", JSON))
    # NoCloud (the seed URL the host agent puts into the SMBIOS serial ends in /nocloud/)
    table.get("/nocloud/meta-data")(_answer(fmt.nocloud_meta_data))
    table.get("/nocloud/user-data")(_answer(lambda md: md.user_data))
    table.get("/nocloud/vendor-data")(_answer(lambda md: ""))
    table.get("/nocloud/network-config")(_answer(fmt.nocloud_network_config))
    return table


# -- the application ---------------------------------------------------------------------


async def _unknown_path(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as error:
        if error.status in (404, 405):
            return _problem(error.status, "No such item", f"no metadata at {request.method} {request.path}")
        raise


def init_app(config: MetadataConfig) -> web.Application:
    owns_store = config.store is None
    store = config.store if config.store is not None else open_store(config.store_url)
    view = MetadataView()
    runner = ProjectionRunner(store, build_codec(), [view], name=config.projection_name,
                              snapshot_interval=config.snapshot_interval)
    neighbours = Neighbours() if config.check_neighbour else None
    app = web.Application(middlewares=[web.middleware(_unknown_path)])
    app[VIEW] = view
    app[RUNNER] = runner
    app[READY] = asyncio.Event()

    def identify_request(request: web.Request) -> Identity:
        transport = request.transport
        return identify(view, transport.get_extra_info("peername") if transport else None, neighbours)

    app[IDENTIFY] = identify_request
    app.add_routes(routes())

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(_follow(runner, app[READY]), name="metadata-projection")]
        yield
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if neighbours is not None:
            neighbours.close()
        if owns_store:
            await store.close()

    app.cleanup_ctx.append(lifecycle)
    return app


async def _follow(runner: ProjectionRunner, ready: asyncio.Event) -> None:
    """Catch up (then answer), and follow the log; an outage only delays the view."""
    delay = 0.1
    while True:
        try:
            await runner.restore()
            await runner.catch_up()
            ready.set()
            await runner.run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("metadata projection stopped at position %d; retrying", runner.position)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 5.0)


class Bridge(msgspec.Struct, frozen=True):
    name: str
    index: int
    addresses: tuple[str, ...]  # fe80::a9fe:a9fe and the bridge's routable addresses, usable now


def scan_bridges(vnis: set[int], add_address: bool) -> list[Bridge]:
    """This host's bridges of the networks in ``vnis``, with the addresses to listen on;
    with ``add_address``, fe80::a9fe:a9fe/64 is put on each that lacks it first (nodad:
    the same address is on every bridge of every host by design)."""
    from pyroute2 import IPRoute

    found = []
    with IPRoute() as ipr:
        links = [(link["index"], link.get("IFLA_IFNAME")) for link in ipr.get_links()]
        ours = [(index, name) for index, name in links
                if isinstance(name, str) and net.vni_of_bridge(name) in vnis]
        addresses: dict[int, list[tuple[str, int]]] = {}
        for entry in ipr.get_addr(family=socket.AF_INET6):
            addresses.setdefault(entry["index"], []).append((entry.get("IFA_ADDRESS"), entry.get("flags", 0)))
        for index, name in ours:
            have = addresses.get(index, [])
            if add_address and METADATA_ADDRESS not in {a for a, _ in have}:
                ipr.addr("add", index=index, address=METADATA_ADDRESS, prefixlen=64, flags=0x02)  # IFA_F_NODAD
                have = [*have, (METADATA_ADDRESS, 0)]
                log.info("metadata address %s added on %s", METADATA_ADDRESS, name)
            usable = tuple(sorted(
                a for a, flags in have
                if isinstance(a, str) and not flags & 0x40  # IFA_F_TENTATIVE: not bindable yet
                and (a == METADATA_ADDRESS or not ipaddress.IPv6Address(a).is_link_local)))
            found.append(Bridge(name=name, index=index, addresses=usable))
    return found


def _listening_socket(address: str, port: int, scope: int, reuse_port: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address, port, 0, scope))
        sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class BridgeSites:
    """Listening sockets on the bridges of the networks the projection knows, kept in step
    with them: a new bridge (or a new routable address on one) gets a socket, a bridge
    that went away loses it. Binding to the bridge's addresses rather than [::] keeps two
    installations on one machine (each with its own networks) from answering each
    other's guests."""

    def __init__(self, runner: web.AppRunner, view: MetadataView, config: MetadataConfig) -> None:
        self.runner = runner
        self.view = view
        self.config = config
        self.sites: dict[tuple[str, str], web.SockSite] = {}  # (bridge, address) -> site

    async def sync(self) -> None:
        bridges = await asyncio.to_thread(scan_bridges, set(self.view.by_vni), self.config.link_local)
        wanted = {(b.name, a): b.index for b in bridges for a in b.addresses}
        for key in [k for k in self.sites if k not in wanted]:
            await self.sites.pop(key).stop()
        for (name, address), index in wanted.items():
            if (name, address) in self.sites:
                continue
            scope = index if ipaddress.IPv6Address(address).is_link_local else 0
            try:
                sock = _listening_socket(address, self.config.port, scope, self.config.reuse_port)
            except OSError as error:
                log.warning("cannot listen on [%s%%%s]:%d: %s", address, name, self.config.port, error.strerror)
                continue
            site = web.SockSite(self.runner, sock)
            await site.start()
            self.sites[(name, address)] = site
            log.info("metadata listening on [%s%%%s]:%d", address, name, self.config.port)

    async def run(self) -> None:
        while True:
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # not root, or netlink trouble: say so, keep serving
                log.warning("cannot follow the network bridges: %s", error)
            await asyncio.sleep(self.config.bridge_scan_interval)


@dataclasses.dataclass
class RunningMetadata:
    app: web.Application
    runner: web.AppRunner
    addresses: list[tuple[str, int]]
    bridges: BridgeSites | None = None
    task: asyncio.Task[None] | None = None

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        await self.runner.cleanup()


async def start(config: MetadataConfig) -> RunningMetadata:
    """Serve on ``config.listen`` (if any) and on every bridge of a network the projection
    knows; return once the projection has read the log and the bridges are listened on."""
    app = init_app(config)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    addresses: list[tuple[str, int]] = []
    port = config.port
    try:
        for host in config.listen:
            known = len(runner.addresses)
            site = web.TCPSite(runner, host, port, reuse_port=config.reuse_port)
            try:
                await site.start()
            except OSError as error:
                raise OSError(error.errno, f"cannot listen on [{host}]:{port}: {error.strerror}") from error
            port = runner.addresses[known][1] if len(runner.addresses) > known else port
            addresses.append((host, port))
        async with asyncio.timeout(60):
            await app[READY].wait()
        bridges = task = None
        if config.bridges:
            bridges = BridgeSites(runner, app[VIEW], config)
            with contextlib.suppress(Exception):
                await bridges.sync()  # logged inside; run() keeps trying
            task = asyncio.create_task(bridges.run(), name="metadata-bridges")
    except BaseException:
        await runner.cleanup()
        raise
    log.info("ucloud metadata listening on %s", ", ".join(
        [f"[{h}]:{p}" for h, p in addresses] + (["every network bridge"] if config.bridges else [])))
    return RunningMetadata(app, runner, addresses, bridges, task)


async def serve(config: MetadataConfig) -> None:
    running = await start(config)
    try:
        await asyncio.Event().wait()
    finally:
        await running.stop()
