"""Files, images and resize through the HTTP API, on a real SQLite log and a real files root.

No image scanner runs here: where a test needs a ready image it reports the import
through the CommandService, as the scanner would (its own tests: test_image_scanner.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from aiohttp.test_utils import TestClient, TestServer

from tests.support.gateway import ADMIN, Api, drive_to_running, user, vm_body
from ucloud.commands.unit_of_work import SYSTEM
from ucloud.domain import image as image_domain
from ucloud.domain import vm as vm_domain
from ucloud.domain.limits import GiB, MiB
from ucloud.eventstore.sqlite import SqliteEventStore
from ucloud.gateway.app import COMMANDS, GatewayConfig, init_app


class Cloud:
    def __init__(self, client: TestClient[Any, Any], root: Path) -> None:
        self.client = client
        self.root = root
        self.alice = Api(client, user("alice"))
        self.bob = Api(client, user("bob"))
        self.admin = Api(client, ADMIN)

    @property
    def commands(self) -> Any:
        return self.client.server.app[COMMANDS]

    async def upload(self, api: Api, name: str, data: bytes, sha: str | None = None) -> tuple[int, Any]:
        headers = {"Content-Type": "application/octet-stream"}
        if sha is not None:
            headers["X-Ucloud-Sha256"] = sha
        status, body, _ = await api.call("PUT", f"/v1/files/{name}", data=data, headers=headers)
        return status, body

    async def ready_image(self, api: Api, name: str, owner: str, public: bool = False) -> int:
        """Upload, create and report the image imported; the log position reached."""
        assert (await self.upload(api, f"{name}.qcow2", b"qcow2 bytes"))[0] == 201
        created = await api.ok("POST", "/v1/images", {"name": name, "file": f"{name}.qcow2", "public": public})
        assert created["id"] == str(image_domain.image_id_for("" if public else owner, name))
        outcome = await self.commands.report_image(SYSTEM, image_domain.ReportImported(
            image_id=UUID(created["id"]), virtual_size=GiB, stored_size=1000, location="/store/x.qcow2"))
        return int(outcome.position)


@pytest.fixture
async def cloud(tmp_path: Path) -> AsyncIterator[Cloud]:
    store = SqliteEventStore(tmp_path / "events.sqlite")
    config = GatewayConfig(store=store, files_root=tmp_path / "files", max_file_size=4 * MiB, file_quota=6 * MiB,
                           image_stores=("local", "ceph"))
    client = TestClient(TestServer(init_app(config)))
    await client.start_server()
    try:
        yield Cloud(client, tmp_path / "files")
    finally:
        await client.close()
        await store.close()


async def test_an_upload_is_streamed_verified_recorded_and_private(cloud: Cloud) -> None:
    data = b"x" * (3 * MiB + 17)
    sha = hashlib.sha256(data).hexdigest()
    status, body = await cloud.upload(cloud.alice, "disk.qcow2", data, sha)
    assert status == 201, body
    assert (body["size"], body["sha256"]) == (len(data), sha)
    assert (cloud.root / "alice" / "disk.qcow2").read_bytes() == data
    listed = await cloud.alice.ok("GET", f"/v1/files?position={body['position']}")
    assert [(f["name"], f["size"], f["sha256"]) for f in listed["files"]] == [("disk.qcow2", len(data), sha)]
    assert (await cloud.bob.ok("GET", f"/v1/files?position={body['position']}"))["files"] == []
    status, again = await cloud.upload(cloud.alice, "disk.qcow2", b"new")
    assert status == 200 and again["size"] == 3
    assert [p.name for p in (cloud.root / "alice").iterdir()] == ["disk.qcow2"]  # nothing partial left


async def test_a_wrong_sha256_keeps_nothing(cloud: Cloud) -> None:
    status, body = await cloud.upload(cloud.alice, "disk.qcow2", b"abc", "0" * 64)
    assert status == 422 and body["field"] == "X-Ucloud-Sha256", body
    assert hashlib.sha256(b"abc").hexdigest() in body["detail"]
    assert list((cloud.root / "alice").iterdir()) == []
    assert (await cloud.alice.ok("GET", "/v1/files"))["files"] == []


async def test_uploads_over_the_size_limit_or_the_quota_are_refused_and_leave_nothing(cloud: Cloud) -> None:
    status, body = await cloud.upload(cloud.alice, "big.qcow2", b"x" * (4 * MiB + 1))
    assert status == 413 and "at most 4MiB" in body["detail"], body
    assert (await cloud.upload(cloud.alice, "a.qcow2", b"x" * (4 * MiB)))[0] == 201

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: refused while streaming
        for _ in range(3):
            yield b"y" * MiB

    status, body, _ = await cloud.alice.call("PUT", "/v1/files/b.qcow2", data=chunked(),  # type: ignore[arg-type]
                                             headers={"Content-Type": "application/octet-stream"})
    assert status == 413 and "quota" in body["detail"], body
    assert sorted(p.name for p in (cloud.root / "alice").iterdir()) == ["a.qcow2"]
    assert (await cloud.upload(cloud.bob, "b.qcow2", b"y" * (3 * MiB)))[0] == 201  # quotas are per user


async def test_deleting_a_file_removes_it_from_disk_and_the_list(cloud: Cloud) -> None:
    await cloud.upload(cloud.alice, "disk.qcow2", b"abc")
    assert (await cloud.bob.call("DELETE", "/v1/files/disk.qcow2"))[0] == 404
    answer = await cloud.alice.ok("DELETE", "/v1/files/disk.qcow2")
    assert not (cloud.root / "alice" / "disk.qcow2").exists()
    assert (await cloud.alice.ok("GET", f"/v1/files?position={answer['position']}"))["files"] == []
    assert (await cloud.alice.call("DELETE", "/v1/files/disk.qcow2"))[0] == 404


@pytest.mark.parametrize("name", [".hidden", "a%2Fb", "..", "x%0A"])
async def test_file_names_are_plain(cloud: Cloud, name: str) -> None:
    status, body = await cloud.upload(cloud.alice, name, b"abc")
    assert status in (400, 404), body
    assert not (cloud.root / "alice").exists() or list((cloud.root / "alice").iterdir()) == []


async def test_an_image_is_made_only_from_ones_own_existing_file(cloud: Cloud) -> None:
    await cloud.upload(cloud.bob, "bobs.qcow2", b"abc")
    status, body, _ = await cloud.alice.call("POST", "/v1/images", {"name": "mine", "file": "bobs.qcow2"})
    assert status == 422 and body["field"] == "file" and "no file named 'bobs.qcow2'" in body["detail"], body
    await cloud.upload(cloud.alice, "a.qcow2", b"abc")
    status, body, _ = await cloud.alice.call("POST", "/v1/images", {"name": "mine", "file": "a.qcow2",
                                                                    "public": True})
    assert status == 422 and body["field"] == "public", body
    status, body, _ = await cloud.alice.call("POST", "/v1/images", {"name": "mine", "file": "a.qcow2",
                                                                    "store": "nowhere"})
    assert status == 422 and body["field"] == "store" and "local, ceph" in body["detail"], body
    created = await cloud.alice.ok("POST", "/v1/images", {"name": "mine", "file": "a.qcow2"}, status=202)
    shown = await cloud.alice.ok("GET", f"/v1/images/mine?position={created['position']}")
    assert (shown["status"], shown["store"], shown["file"]) == ("importing", "local", "a.qcow2")
    assert (await cloud.bob.call("GET", "/v1/images/mine"))[0] == 404
    status, body, _ = await cloud.alice.call("POST", "/v1/images", {"name": "mine", "file": "a.qcow2"})
    assert status == 422 and "already exists" in body["detail"]


async def test_vm_create_refuses_unknown_and_unready_images_with_422(cloud: Cloud) -> None:
    status, body, _ = await cloud.alice.call("POST", "/v1/vms", vm_body(image="nothing-here"))
    assert status == 422 and body["field"] == "image" and "no image named 'nothing-here'" in body["detail"], body
    await cloud.upload(cloud.alice, "a.qcow2", b"abc")
    await cloud.alice.ok("POST", "/v1/images", {"name": "slow", "file": "a.qcow2"})
    status, body, _ = await cloud.alice.call("POST", "/v1/vms", vm_body(image="slow"))
    assert status == 422 and body["field"] == "image" and "still importing" in body["detail"], body
    image_id = image_domain.image_id_for("alice", "slow")
    await cloud.commands.report_image(SYSTEM, image_domain.ReportImportFailed(image_id=image_id,
                                                                              reason="not a qcow2 file: raw"))
    status, body, _ = await cloud.alice.call("POST", "/v1/vms", vm_body(image="slow"))
    assert status == 422 and "failed to import: not a qcow2 file: raw" in body["detail"], body
    await cloud.ready_image(cloud.bob, "bobs", "bob")
    status, body, _ = await cloud.alice.call("POST", "/v1/vms", vm_body(image="bobs"))
    assert status == 422 and body["field"] == "image", body  # another user's private image does not exist


async def test_an_image_in_use_is_not_deleted_and_the_refusal_names_the_vm(cloud: Cloud) -> None:
    await cloud.ready_image(cloud.alice, "deb", "alice")
    status, body, _ = await cloud.alice.call("POST", "/v1/vms", vm_body(image="deb", disk="512MB"))
    assert status == 422 and body["field"] == "disk" and "smaller than the image" in body["detail"], body
    created = await cloud.alice.ok("POST", "/v1/vms", vm_body("web7", image="deb", disk="2GB"), status=202)
    vm = await cloud.alice.ok("GET", f"/v1/vms/{created['id']}?position={created['position']}")
    assert vm["image"] == "deb"
    status, body, _ = await cloud.alice.call("DELETE", "/v1/images/deb")
    assert status == 422 and "in use by 1 VM" in body["detail"] and f"web7 ({created['id']})" in body["detail"]
    shown = await cloud.alice.ok("GET", f"/v1/images/deb?position={created['position']}")
    assert shown["used_by"] == [created["id"]]
    await cloud.alice.ok("DELETE", f"/v1/vms/{created['id']}")  # never placed: deleted at once, image released
    deleted = await cloud.alice.ok("DELETE", "/v1/images/deb", status=202)
    listed = await cloud.alice.ok("GET", f"/v1/images?position={deleted['position']}")
    assert listed["images"] == []


async def test_public_images_are_made_by_admins_and_seen_by_everyone(cloud: Cloud) -> None:
    position = await cloud.ready_image(cloud.admin, "debian-13", "root", public=True)
    listed = await cloud.bob.ok("GET", f"/v1/images?position={position}")
    assert [(i["name"], i["public"], i["status"]) for i in listed["images"]] == [("debian-13", True, "ready")]
    created = await cloud.bob.ok("POST", "/v1/vms", vm_body(image="debian-13"), status=202)
    assert created["status"] == "requested"
    assert (await cloud.bob.call("DELETE", "/v1/images/debian-13?public=true"))[0] == 404
    status, body, _ = await cloud.admin.call("DELETE", "/v1/images/debian-13?public=true")
    assert status == 422 and "web1" in body["detail"]


async def test_resize_grows_the_disk_of_a_running_vm_and_cores_only_when_stopped(cloud: Cloud) -> None:
    created = await cloud.alice.ok("POST", "/v1/vms", vm_body(image="tiny", disk="1GB"), status=202)
    vm_id = created["id"]
    host_id = await drive_to_running(cloud.commands, vm_id)
    await cloud.alice.ok("POST", f"/v1/vms/{vm_id}/resize", {"disk": "3GB"}, status=202)
    status, body, _ = await cloud.alice.call("POST", f"/v1/vms/{vm_id}/resize", {"disk": "2GB"})
    assert status == 422 and body["field"] == "disk" and "only grows" in body["detail"], body
    status, body, _ = await cloud.alice.call("POST", f"/v1/vms/{vm_id}/resize", {"cores": 4})
    assert status == 422 and body["field"] == "cores" and "stop it first" in body["detail"], body
    assert (await cloud.bob.call("POST", f"/v1/vms/{vm_id}/resize", {"disk": "9GB"}))[0] == 404
    await cloud.alice.ok("POST", f"/v1/vms/{vm_id}/stop")
    await cloud.commands.report(SYSTEM, vm_domain.ReportStopped(vm_id=vm_id, host_id=host_id))
    answer = await cloud.alice.ok("POST", f"/v1/vms/{vm_id}/resize", {"cores": 4, "ram": "4GB"}, status=202)
    vm = await cloud.alice.ok("GET", f"/v1/vms/{vm_id}?position={answer['position']}")
    assert (vm["cores"], vm["ram"], vm["disk"]) == (4, 4 * GiB, 3 * GiB)
    hosts = await cloud.admin.ok("GET", f"/v1/hosts?position={answer['position']}")
    (host,) = hosts["hosts"]
    assert (host["used_cores"], host["used_ram"], host["used_disk"]) == (4, 4 * GiB, 3 * GiB)
    status, body, _ = await cloud.alice.call("POST", f"/v1/vms/{vm_id}/resize", {"cores": 100000})
    assert status == 422, body
    status, body, _ = await cloud.alice.call("POST", f"/v1/vms/{vm_id}/resize", {})
    assert status == 422 and "at least one of" in body["detail"], body


async def test_uploads_answer_501_without_a_files_root(tmp_path: Path) -> None:
    store = SqliteEventStore(tmp_path / "events.sqlite")
    client = TestClient(TestServer(init_app(GatewayConfig(store=store))))
    await client.start_server()
    try:
        status, body, _ = await Api(client, user("alice")).call(
            "PUT", "/v1/files/a.qcow2", data=b"abc", headers={"Content-Type": "application/octet-stream"})
        assert status == 501 and "no files root" in body["detail"], body
    finally:
        await client.close()
        await store.close()
