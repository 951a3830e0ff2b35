"""`ucloud file`, `ucloud image` and `ucloud vm resize` against a real served gateway.

No image scanner runs here; the test reports the import as the scanner would
(through the gateway's CommandService), and a `--wait` follows it."""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from tests.support.gateway import ServedGateway, drive_to_running, served_gateway
from ucloud.cli.main import main
from ucloud.commands.unit_of_work import SYSTEM
from ucloud.domain import image as image_domain
from ucloud.gateway.app import COMMANDS, READ_MODELS


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ServedGateway]:
    with served_gateway(files_root=tmp_path / "files") as gateway:
        yield gateway


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, served: ServedGateway) -> None:
    for name in ("UCLOUD_CONFIG", "UCLOUD_REALM"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("UCLOUD_API", served.url)
    monkeypatch.setenv("UCLOUD_USER", "alice")


def ucloud(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def ok(*args: str) -> Result:
    result = ucloud(*args)
    assert result.exit_code == 0, result.output
    return result


def test_upload_list_make_an_image_follow_it_and_delete(served: ServedGateway, tmp_path: Path) -> None:
    source = tmp_path / "my disk.qcow2"
    source.write_bytes(b"Q" * 300_000)
    uploaded = json.loads(ok("file", "upload", str(source), "--name", "disk.qcow2", "--json").output)
    assert uploaded["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert (tmp_path / "files" / "alice" / "disk.qcow2").read_bytes() == source.read_bytes()
    assert "disk.qcow2" in ok("file", "list").output

    image_id = image_domain.image_id_for("alice", "mine")

    def scanner() -> None:  # what the image scanner reports, once the image is requested
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and image_id not in served.gateway.app[READ_MODELS].images.by_id:
            time.sleep(0.05)
        commands = served.gateway.app[COMMANDS]
        served.run(commands.report_image(SYSTEM, image_domain.ReportImportProgress(image_id=image_id, percent=50)))
        served.run(commands.report_image(SYSTEM, image_domain.ReportImported(
            image_id=image_id, virtual_size=1 << 30, stored_size=300_000, location="x")))

    thread = threading.Thread(target=scanner)
    thread.start()
    created = ok("image", "create", "mine", "--file", "disk.qcow2")
    thread.join()
    assert "mine: ready (100%)" in created.output and "virtual size 1GiB" in created.output, created.output
    listed = json.loads(ok("image", "list", "--json").output)
    assert [(i["name"], i["status"]) for i in listed] == [("mine", "ready")]

    vm = json.loads(ok("vm", "create", "web", "--image", "mine", "--disk", "2GB", "--json").output)
    refused = ucloud("image", "delete", "mine")
    assert refused.exit_code != 0 and "in use by 1 VM(s): web" in refused.output, refused.output
    ok("vm", "delete", vm["id"])
    ok("image", "delete", "mine")
    ok("file", "delete", "disk.qcow2")
    assert not (tmp_path / "files" / "alice" / "disk.qcow2").exists()


def test_a_failed_import_ends_the_wait_with_its_reason(served: ServedGateway, tmp_path: Path) -> None:
    source = tmp_path / "raw.qcow2"
    source.write_bytes(b"\0" * 1000)
    ok("file", "upload", str(source))
    image_id = image_domain.image_id_for("alice", "bad")

    def scanner() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and image_id not in served.gateway.app[READ_MODELS].images.by_id:
            time.sleep(0.05)
        served.run(served.gateway.app[COMMANDS].report_image(SYSTEM, image_domain.ReportImportFailed(
            image_id=image_id, reason="not a qcow2 file: qemu-img reads it as raw")))

    thread = threading.Thread(target=scanner)
    thread.start()
    failed = ucloud("image", "create", "bad", "--file", "raw.qcow2")
    thread.join()
    assert failed.exit_code != 0 and "failed to import: not a qcow2 file" in failed.output, failed.output


def test_vm_resize_grows_the_disk(served: ServedGateway) -> None:
    vm = json.loads(ok("vm", "create", f"r{uuid.uuid4().hex[:6]}", "--image", "tiny", "--disk", "1GB",
                       "--json").output)
    served.run(drive_to_running(served.gateway.app[COMMANDS], vm["id"]))
    ok("vm", "resize", vm["id"], "--disk", "3GB")
    shown = json.loads(ok("vm", "show", vm["id"], "--json").output)
    assert shown["disk"] == 3 << 30
    refused = ucloud("vm", "resize", vm["id"], "--cores", "2")
    assert refused.exit_code != 0 and "stop it first" in refused.output
