"""Files, images, VM resize and host store/claim rules: the pure domain."""

from __future__ import annotations

import uuid

import pytest

from ucloud.domain import file as file_domain
from ucloud.domain import host as host_domain
from ucloud.domain import image as image_domain
from ucloud.domain import vm as vm_domain
from ucloud.domain.errors import InvalidValue, NotFound, Rejected
from ucloud.domain.events import Event

SHA = "a" * 64
GiB = 1 << 30


def fold(evolve, events: list[Event], state=None):  # type: ignore[no-untyped-def]
    for event in events:
        state = evolve(state, event)
    return state


def test_a_file_appears_changes_only_with_new_content_and_is_removed() -> None:
    record = file_domain.RecordFile(owner="alice", name="disk.qcow2", size=10, sha256=SHA)
    events = file_domain.decide(None, record)
    assert [type(e) for e in events] == [file_domain.FileAppeared]
    state = fold(file_domain.evolve, events)
    assert file_domain.decide(state, record) == []  # rescanning an unchanged file records nothing
    changed = file_domain.decide(state, file_domain.RecordFile(owner="alice", name="disk.qcow2", size=11, sha256=SHA))
    assert [type(e) for e in changed] == [file_domain.FileChanged]
    removed = fold(file_domain.evolve, file_domain.decide(state, file_domain.RemoveFile(owner="alice", name="disk.qcow2")),
                   state)
    assert removed.removed
    with pytest.raises(NotFound, match="no file named"):
        file_domain.decide(removed, file_domain.RemoveFile(owner="alice", name="disk.qcow2"))
    assert file_domain.decide(removed, file_domain.RemoveFile(owner="alice", name="disk.qcow2", missing_ok=True)) == []


@pytest.mark.parametrize("name", ["../etc/shadow", ".hidden", "a/b", "x\n", "é.qcow2", "", "a" * 256])
def test_file_names_are_plain_ascii_names(name: str) -> None:
    with pytest.raises(InvalidValue, match="not a file name"):
        file_domain.check_file_name(name)


def _requested(public: bool = False) -> image_domain.Image:
    command = image_domain.CreateImage(owner="alice", name="deb", public=public, store="local",
                                       file_id=uuid.uuid4(), file_name="d.qcow2", file_size=5, file_sha256=SHA)
    return fold(image_domain.evolve, image_domain.decide(None, command))


def test_an_image_goes_importing_ready_and_progress_only_rises() -> None:
    image = _requested()
    assert image.status is image_domain.ImageStatus.IMPORTING
    image = fold(image_domain.evolve, image_domain.decide(image, image_domain.ReportImportProgress(
        image_id=image.id, percent=40)), image)
    assert image.progress == 40
    assert image_domain.decide(image, image_domain.ReportImportProgress(image_id=image.id, percent=30)) == []
    image = fold(image_domain.evolve, image_domain.decide(image, image_domain.ReportImported(
        image_id=image.id, virtual_size=GiB, stored_size=1000, location="/store/x.qcow2")), image)
    assert (image.status, image.progress, image.location) == (image_domain.ImageStatus.READY, 100, "/store/x.qcow2")
    with pytest.raises(Rejected, match="not importing"):
        image_domain.decide(image, image_domain.ReportImportFailed(image_id=image.id, reason="late"))


def test_a_vm_may_not_use_an_importing_or_failed_image() -> None:
    image = _requested()
    use = image_domain.UseImage(image_id=image.id, vm_id=uuid.uuid4(), vm_name="web")
    with pytest.raises(Rejected, match="still importing") as refused:
        image_domain.decide(image, use)
    assert refused.value.field == "image"
    failed = fold(image_domain.evolve, image_domain.decide(image, image_domain.ReportImportFailed(
        image_id=image.id, reason="not a qcow2 file")), image)
    with pytest.raises(Rejected, match="failed to import: not a qcow2 file"):
        image_domain.decide(failed, use)


def test_an_image_in_use_is_not_deleted_and_the_refusal_names_the_vms() -> None:
    image = _requested()
    image = fold(image_domain.evolve, image_domain.decide(image, image_domain.ReportImported(
        image_id=image.id, virtual_size=GiB, stored_size=1, location="x")), image)
    web, db = uuid.uuid4(), uuid.uuid4()
    for vm_id, name in ((web, "web"), (db, "db")):
        image = fold(image_domain.evolve, image_domain.decide(image, image_domain.UseImage(
            image_id=image.id, vm_id=vm_id, vm_name=name)), image)
    with pytest.raises(Rejected, match=f"in use by 2 VM.*db \\({db}\\), web \\({web}\\)"):
        image_domain.decide(image, image_domain.DeleteImage(image_id=image.id))
    for vm_id in (web, db):
        image = fold(image_domain.evolve, image_domain.decide(image, image_domain.ReleaseImage(
            image_id=image.id, vm_id=vm_id)), image)
    deleted = fold(image_domain.evolve, image_domain.decide(image, image_domain.DeleteImage(image_id=image.id)), image)
    assert deleted.status is image_domain.ImageStatus.DELETED


def test_an_image_name_is_taken_until_the_image_is_deleted() -> None:
    image = _requested()
    again = image_domain.CreateImage(owner="alice", name="deb", public=False, store="local", file_id=uuid.uuid4(),
                                     file_name="d.qcow2", file_size=5, file_sha256=SHA)
    with pytest.raises(Rejected, match="already exists"):
        image_domain.decide(image, again)
    deleted = fold(image_domain.evolve, image_domain.decide(image, image_domain.DeleteImage(image_id=image.id)), image)
    assert [type(e) for e in image_domain.decide(deleted, again)] == [image_domain.ImageRequested]


def _vm(status: vm_domain.Status, desired: vm_domain.Desired = vm_domain.Desired.RUNNING) -> vm_domain.Vm:
    return vm_domain.Vm(id=uuid.uuid4(), owner="alice", name="web", cores=1, ram=GiB, disk=2 * GiB, image="tiny",
                        ssh_keys=(), restart_policy=vm_domain.RestartPolicy.ALWAYS, status=status, desired=desired,
                        host_id=uuid.uuid4())


def test_a_disk_only_grows_and_grows_while_running() -> None:
    vm = _vm(vm_domain.Status.RUNNING)
    grown = vm_domain.decide(vm, vm_domain.ResizeVm(vm_id=vm.id, cores=1, ram=GiB, disk=4 * GiB))
    assert grown == [vm_domain.VmResized(vm_id=vm.id, cores=1, ram=GiB, disk=4 * GiB)]
    with pytest.raises(Rejected, match="only grows") as refused:
        vm_domain.decide(vm, vm_domain.ResizeVm(vm_id=vm.id, cores=1, ram=GiB, disk=GiB))
    assert refused.value.field == "disk"


def test_cores_and_ram_change_only_on_a_stopped_vm() -> None:
    running = _vm(vm_domain.Status.RUNNING)
    with pytest.raises(Rejected, match="only while the VM is stopped"):
        vm_domain.decide(running, vm_domain.ResizeVm(vm_id=running.id, cores=2, ram=GiB, disk=2 * GiB))
    stopped = _vm(vm_domain.Status.STOPPED, vm_domain.Desired.STOPPED)
    events = vm_domain.decide(stopped, vm_domain.ResizeVm(vm_id=stopped.id, cores=2, ram=2 * GiB, disk=2 * GiB))
    after = fold(vm_domain.evolve, events, stopped)
    assert (after.cores, after.ram) == (2, 2 * GiB)


def test_a_claim_changes_only_within_the_hosts_room() -> None:
    host_id = host_domain.host_id_for("h1")
    vm_id = uuid.uuid4()
    host = fold(host_domain.evolve, [
        host_domain.HostRegistered(host_id=host_id, hostname="h1", cores=2, ram=4 * GiB, disk=10 * GiB),
        host_domain.CapacityClaimed(host_id=host_id, vm_id=vm_id, cores=1, ram=2 * GiB, disk=5 * GiB)])
    bigger = host_domain.ChangeClaim(host_id=host_id, vm_id=vm_id, cores=2, ram=4 * GiB, disk=10 * GiB)
    host = fold(host_domain.evolve, host_domain.decide(host, bigger), host)
    assert (host.used_cores, host.used_ram, host.used_disk) == (2, 4 * GiB, 10 * GiB)
    with pytest.raises(Rejected, match="no room for the new size"):
        host_domain.decide(host, host_domain.ChangeClaim(host_id=host_id, vm_id=vm_id, cores=2, ram=5 * GiB,
                                                         disk=10 * GiB))


def test_a_host_declares_its_stores_once_and_again_only_when_they_change() -> None:
    register = host_domain.RegisterHost(hostname="h1", cores=2, ram=GiB, disk=GiB, stores=("local", "ceph"))
    events = host_domain.decide(None, register)
    assert [type(e) for e in events] == [host_domain.HostRegistered, host_domain.HostStoresDeclared]
    host = fold(host_domain.evolve, events)
    assert host.stores == ("local", "ceph")
    assert host_domain.decide(host, register) == []
    assert host_domain.decide(host, host_domain.RegisterHost(hostname="h1", cores=2, ram=GiB, disk=GiB)) == []
