"""The read models the gateway answers from: VMs, hosts, SSH keys.

They reuse the domain's own evolve functions, so a read model can never disagree
with the command side about what an event means.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast
from uuid import UUID

import msgspec

from ucloud.domain import file as file_domain
from ucloud.domain import host as host_domain
from ucloud.domain import image as image_domain
from ucloud.domain import network as network_domain
from ucloud.domain import sshkey as sshkey_domain
from ucloud.domain import vm as vm_domain
from ucloud.domain.events import Event, tag_of
from ucloud.eventstore.records import EventRecord

from .runner import Projection


class VmRow(msgspec.Struct, kw_only=True, gc=False):  # no cycles: see domain.vm.Vm
    vm: vm_domain.Vm
    created_at: datetime
    updated_at: datetime
    position: int  # of the last event that changed it


_ROWS = msgspec.msgpack.Decoder(list[VmRow])
_ENCODE = msgspec.msgpack.Encoder().encode


class VmsView(Projection):
    name = "vms"
    handles = frozenset(tag_of(t) for t in vm_domain.VM_EVENT_TYPES)
    # 2: the rows are one msgpack blob in the snapshot (1: a list of plain objects).
    snapshot_schema = 2

    def __init__(self) -> None:
        self.by_id: dict[UUID, VmRow] = {}
        self.by_owner: dict[str, set[UUID]] = {}
        self.by_host: dict[UUID, set[UUID]] = {}

    def apply(self, record: EventRecord, event: Event) -> None:
        # Only VM events arrive here (``handles``): every one of them has a vm_id.
        vm_id = cast(vm_domain.VmEvent, event).vm_id
        row = self.by_id.get(vm_id)
        state = vm_domain.evolve(row.vm if row else None, event)
        if state is None:
            return
        if row is None:
            row = VmRow(vm=state, created_at=record.time, updated_at=record.time, position=record.position)
            self.by_id[vm_id] = row
            self.by_owner.setdefault(state.owner, set()).add(vm_id)
            if state.host_id is not None:
                self.by_host.setdefault(state.host_id, set()).add(vm_id)
            return
        # Identity first: evolve keeps the same UUID object when the host is unchanged,
        # and UUID.__eq__ is Python code on the hottest path of a catch-up.
        moved = row.vm.host_id is not state.host_id and row.vm.host_id != state.host_id
        if moved and row.vm.host_id is not None:
            self.by_host.get(row.vm.host_id, set()).discard(vm_id)
        if moved and state.host_id is not None:
            self.by_host.setdefault(state.host_id, set()).add(vm_id)
        row.vm, row.updated_at, row.position = state, record.time, record.position

    def get(self, vm_id: UUID) -> vm_domain.Vm | None:
        row = self.by_id.get(vm_id)
        return row.vm if row else None

    def owned_by(self, owner: str | None) -> list[VmRow]:
        ids = self.by_id.keys() if owner is None else self.by_owner.get(owner, set())
        rows = [self.by_id[i] for i in ids]
        return sorted(rows, key=lambda r: (r.created_at, str(r.vm.id)))

    def on_host(self, host_id: UUID) -> list[vm_domain.Vm]:
        return [self.by_id[i].vm for i in self.by_host.get(host_id, set())]

    def dump(self) -> Any:
        """The rows as one msgpack blob (bytes): whoever holds this view in a snapshot (the
        gateway, the scheduler, a host agent) then reads them back straight into VmRows,
        not through plain dicts; at 100,000 VMs that is most of a start-up
        (docs/performance.md, "Start-up over 100,000 VMs")."""
        return _ENCODE(list(self.by_id.values()))

    def load(self, data: Any) -> None:
        """From ``dump``'s blob, or from a list of plain rows (schema 1)."""
        rows = _ROWS.decode(data) if isinstance(data, bytes) else [msgspec.convert(raw, VmRow) for raw in data]
        self.__init__()  # type: ignore[misc]
        by_id, by_owner, by_host = self.by_id, self.by_owner, self.by_host
        for row in rows:
            vm = row.vm
            by_id[vm.id] = row
            owned = by_owner.get(vm.owner)
            if owned is None:
                owned = by_owner[vm.owner] = set()
            owned.add(vm.id)
            if vm.host_id is not None:
                placed = by_host.get(vm.host_id)
                if placed is None:
                    placed = by_host[vm.host_id] = set()
                placed.add(vm.id)


_HOSTS = msgspec.msgpack.Decoder(list[host_domain.Host])
_VERSIONS = msgspec.msgpack.Decoder(dict[UUID, int])


class HostsView(Projection):
    """Hosts with capacity and usage (usage is the sum of the claims on each host)."""

    name = "hosts"
    snapshot_schema = 2  # 2: hosts and versions are msgpack blobs (1: plain values)
    handles = frozenset(tag_of(t) for t in host_domain.HOST_EVENT_TYPES)

    def __init__(self) -> None:
        self.by_id: dict[UUID, host_domain.Host] = {}
        self.versions: dict[UUID, int] = {}

    def apply(self, record: EventRecord, event: Event) -> None:
        if not isinstance(event, host_domain.HOST_EVENT_TYPES):
            return
        host_id = cast(host_domain.HostEvent, event).host_id
        state = host_domain.evolve(self.by_id.get(host_id), event)
        if state is not None:
            self.by_id[host_id] = state
            self.versions[host_id] = record.version

    def all(self) -> list[host_domain.Host]:
        return sorted(self.by_id.values(), key=lambda h: h.hostname)

    def dump(self) -> Any:
        """Hosts and versions as msgpack blobs, read back by typed decoders (see VmsView.dump):
        1,000 hosts hold 100,000 claims."""
        return {"hosts": _ENCODE(list(self.by_id.values())), "versions": _ENCODE(self.versions)}

    def load(self, data: Any) -> None:
        """From ``dump``'s blobs, or from lists and dicts of plain values (schema 1)."""
        hosts, versions = data["hosts"], data["versions"]
        if isinstance(hosts, bytes):
            self.by_id = {h.id: h for h in _HOSTS.decode(hosts)}
            self.versions = _VERSIONS.decode(versions)
            return
        self.by_id = {h.id: h for h in (msgspec.convert(raw, host_domain.Host) for raw in hosts)}
        self.versions = {UUID(k): v for k, v in versions.items()}


class SshKeysView(Projection):
    name = "sshkeys"
    handles = frozenset(tag_of(t) for t in sshkey_domain.SSHKEY_EVENT_TYPES)

    def __init__(self) -> None:
        self.by_owner: dict[str, dict[str, sshkey_domain.SshKey]] = {}

    def apply(self, record: EventRecord, event: Event) -> None:
        match event:
            case sshkey_domain.SshKeyAdded():
                key = sshkey_domain.evolve(None, event)
                assert key is not None
                self.by_owner.setdefault(event.owner, {})[event.name] = key
            case sshkey_domain.SshKeyDeleted():
                for keys in self.by_owner.values():
                    for name, key in list(keys.items()):
                        if key.id == event.key_id:
                            del keys[name]

    def of(self, owner: str) -> list[sshkey_domain.SshKey]:
        return sorted(self.by_owner.get(owner, {}).values(), key=lambda k: k.name)

    def dump(self) -> Any:
        return {owner: [msgspec.to_builtins(k) for k in keys.values()] for owner, keys in self.by_owner.items()}

    def load(self, data: Any) -> None:
        self.by_owner = {
            owner: {k.name: k for k in (msgspec.convert(raw, sshkey_domain.SshKey) for raw in keys)}
            for owner, keys in data.items()
        }


class FilesView(Projection):
    """Each user's files (not the removed ones)."""

    name = "files"
    handles = frozenset(tag_of(t) for t in file_domain.FILE_EVENT_TYPES)

    def __init__(self) -> None:
        self.by_id: dict[UUID, file_domain.File] = {}
        self.updated: dict[UUID, datetime] = {}

    def apply(self, record: EventRecord, event: Event) -> None:
        file_id = cast(file_domain.FileEvent, event).file_id
        state = file_domain.evolve(self.by_id.get(file_id), event)
        if state is None or state.removed:
            self.by_id.pop(file_id, None)
            self.updated.pop(file_id, None)
        else:
            self.by_id[file_id] = state
            self.updated[file_id] = record.time

    def of(self, owner: str | None) -> list[file_domain.File]:
        return sorted((f for f in self.by_id.values() if owner is None or f.owner == owner),
                      key=lambda f: (f.owner, f.name))

    def get(self, owner: str, name: str) -> file_domain.File | None:
        return self.by_id.get(file_domain.file_id_for(owner, name))

    def dump(self) -> Any:
        return [[msgspec.to_builtins(f), self.updated[f.id].isoformat()] for f in self.by_id.values()]

    def load(self, data: Any) -> None:
        self.__init__()  # type: ignore[misc]
        for raw, updated in data:
            state = msgspec.convert(raw, file_domain.File)
            self.by_id[state.id] = state
            self.updated[state.id] = datetime.fromisoformat(updated)


class ImagesView(Projection):
    """The image catalogue: every image not deleted, with its import status."""

    name = "images"
    handles = frozenset(tag_of(t) for t in image_domain.IMAGE_EVENT_TYPES)

    def __init__(self) -> None:
        self.by_id: dict[UUID, image_domain.Image] = {}
        self.created: dict[UUID, datetime] = {}

    def apply(self, record: EventRecord, event: Event) -> None:
        image_id = cast(image_domain.ImageEvent, event).image_id
        state = image_domain.evolve(self.by_id.get(image_id), event)
        if state is None or state.status is image_domain.ImageStatus.DELETED:
            self.by_id.pop(image_id, None)
            self.created.pop(image_id, None)
            return
        self.by_id[image_id] = state
        self.created.setdefault(image_id, record.time)

    def visible_to(self, owner: str | None) -> list[image_domain.Image]:
        """The owner's images and the public ones (None: all), public first, by name."""
        return sorted((i for i in self.by_id.values() if owner is None or i.public or i.owner == owner),
                      key=lambda i: (not i.public, i.owner, i.name))

    def find(self, owner: str, name: str) -> image_domain.Image | None:
        """The image ``name`` as ``owner`` sees it: their own first, else the public one."""
        for key in (owner, ""):
            image = self.by_id.get(image_domain.image_id_for(key, name))
            if image is not None:
                return image
        return None

    def dump(self) -> Any:
        return [[msgspec.to_builtins(i), self.created[i.id].isoformat()] for i in self.by_id.values()]

    def load(self, data: Any) -> None:
        self.__init__()  # type: ignore[misc]
        for raw, created in data:
            state = msgspec.convert(raw, image_domain.Image)
            self.by_id[state.id] = state
            self.created[state.id] = datetime.fromisoformat(created)
class NetworksView(Projection):
    """Networks by id and by owner (deleted ones are dropped)."""

    name = "networks"
    handles = frozenset(tag_of(t) for t in network_domain.NETWORK_EVENT_TYPES)

    def __init__(self) -> None:
        self.by_id: dict[UUID, network_domain.Network] = {}

    def apply(self, record: EventRecord, event: Event) -> None:
        network_id = cast(network_domain.NetworkEvent, event).network_id
        state = network_domain.evolve(self.by_id.get(network_id), event)
        if state is None or state.status is network_domain.NetworkStatus.DELETED:
            self.by_id.pop(network_id, None)
        else:
            self.by_id[network_id] = state

    def get(self, owner: str, name: str) -> network_domain.Network | None:
        return self.by_id.get(network_domain.network_id_for(owner, name))

    def owned_by(self, owner: str | None) -> list[network_domain.Network]:
        rows = [n for n in self.by_id.values() if owner is None or n.owner == owner]
        return sorted(rows, key=lambda n: (n.owner, n.name))

    def dump(self) -> Any:
        return [msgspec.to_builtins(n) for n in self.by_id.values()]

    def load(self, data: Any) -> None:
        self.by_id = {n.id: n for n in (msgspec.convert(raw, network_domain.Network) for raw in data)}


class ReadModels:
    """The gateway's set of views, fed by one runner."""

    def __init__(self) -> None:
        self.vms = VmsView()
        self.hosts = HostsView()
        self.sshkeys = SshKeysView()
        self.networks = NetworksView()
        self.files = FilesView()
        self.images = ImagesView()

    def all(self) -> list[Projection]:
        return [self.vms, self.hosts, self.sshkeys, self.networks, self.files, self.images]
