"""`ucloud file ...`, `ucloud image ...` and `ucloud vm resize`: over HTTP, like the rest."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import time
from pathlib import Path
from typing import Any

import click

from ucloud.cli.client import ApiError, Client, Context, Failure
from ucloud.cli.main import UcloudGroup, console, emit_json, json_option, pass_context, table, vm
from ucloud.domain.units import format_size
from ucloud.hostagent.builtin import BUILTIN_IMAGES, build_builtin

CHUNK = 1024 * 1024


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@click.group(cls=UcloudGroup)
def file() -> None:
    """Your files (uploaded here, or put into your directory by sftp); images are made from them."""


@file.command("upload")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", help="The name in your directory (default: the file's own name).")
@json_option
@pass_context
def file_upload(ctx: Context, path: Path, name: str | None, as_json: bool) -> None:
    """Upload PATH (streamed; the gateway checks its sha256 and your quota)."""
    name = name or path.name

    async def work(client: Client) -> None:
        sha256 = await asyncio.to_thread(_sha256, path)
        _, done = await client.request(
            "PUT", f"/v1/files/{name}", headers={"X-Ucloud-Sha256": sha256,
                                                 "Content-Type": "application/octet-stream"},
            upload=lambda: open(path, "rb"))  # aiohttp streams it (Content-Length from its size) and closes it
        if as_json:
            emit_json(done)
        else:
            console().print(f"file {name} uploaded: {format_size(done['size'])}, sha256 {done['sha256']}")

    ctx.run(work)


@file.command("list")
@click.option("--owner", metavar="USER", help="Admins: only this user's files.")
@json_option
@pass_context
def file_list(ctx: Context, owner: str | None, as_json: bool) -> None:
    """List your files."""

    async def work(client: Client) -> None:
        files = (await client.get("/v1/files", {"owner": owner} if owner else None))["files"]
        if as_json:
            emit_json(files)
            return
        listing = table("NAME", "SIZE", "SHA256", *(("OWNER",) if owner else ()))
        for f in files:
            listing.add_row(f["name"], format_size(f["size"]), f["sha256"][:16] + "…", *((f["owner"],) if owner else ()))
        console().print(listing if files else "no files")

    ctx.run(work)


@file.command("delete")
@click.argument("name")
@json_option
@pass_context
def file_delete(ctx: Context, name: str, as_json: bool) -> None:
    """Delete the file NAME from your directory."""

    async def work(client: Client) -> None:
        _, done = await client.request("DELETE", f"/v1/files/{name}")
        if as_json:
            emit_json(done)
        else:
            console().print(f"file {name} deleted")

    ctx.run(work)


@click.group(cls=UcloudGroup)
def image() -> None:
    """OS images made from your qcow2 files; VM disks are copy-on-write clones of them."""


def _show_image(found: dict[str, Any]) -> None:
    size = format_size(found["virtual_size"]) if found["virtual_size"] else "-"
    console().print(f"{found['name']}: {found['status']} ({found['progress']}%), store {found['store']}, "
                    f"virtual size {size}, from {found['file']}"
                    + (f", {'public' if found['public'] else 'owner ' + found['owner']}")
                    + (f"\n  reason: {found['reason']}" if found["reason"] else "")
                    + (f"\n  used by {len(found['used_by'])} VM(s)" if found["used_by"] else ""))


async def _wait_image(client: Client, name: str, timeout: float, quiet: bool) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    shown = -1
    while True:
        found: dict[str, Any] = await client.get(f"/v1/images/{name}")
        if not quiet and found["progress"] != shown and found["status"] == "importing":
            shown = found["progress"]
            console().print(f"image {name}: importing {shown}%")
        if found["status"] == "ready":
            return found
        if found["status"] == "failed":
            raise Failure(f"image {name} failed to import: {found['reason']}")
        if time.monotonic() > deadline:
            raise Failure(f"image {name} is still {found['status']} after {timeout:g}s")
        await asyncio.sleep(0.5)


@image.command("create")
@click.argument("name")
@click.option("--file", "file_name", required=True, help="One of your files (ucloud file list).")
@click.option("--public", is_flag=True, help="Admins: an image every user may create VMs from.")
@click.option("--store", help="The image store (default: the installation's first).")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Follow the import until it is ready.")
@click.option("--timeout", default=1800.0, show_default=True, help="Seconds to wait with --wait.")
@json_option
@pass_context
def image_create(ctx: Context, name: str, file_name: str, public: bool, store: str | None, wait: bool,
                 timeout: float, as_json: bool) -> None:
    """Make the image NAME from one of your files: checked (qcow2 only) and imported."""
    body: dict[str, Any] = {"name": name, "file": file_name, "public": public}
    if store:
        body["store"] = store

    async def work(client: Client) -> None:
        _, accepted = await client.request("POST", "/v1/images", body)
        if not as_json:
            console().print(f"image {name}: import requested")
        if wait:
            found = await _wait_image(client, name, timeout, as_json)
            if as_json:
                emit_json(found)
            else:
                _show_image(found)
        elif as_json:
            emit_json(accepted)

    ctx.run(work)


@image.command("builtin")
@click.argument("name", type=click.Choice(BUILTIN_IMAGES))
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path), default=Path("/var/cache/ucloud"),
              show_default=True, help="Where the image is built and kept.")
@click.option("--store", help="The image store (default: the installation's first).")
@click.option("--timeout", default=1800.0, show_default=True, help="Seconds to wait for the import.")
@json_option
@pass_context
def image_builtin(ctx: Context, name: str, cache: Path, store: str | None, timeout: float, as_json: bool) -> None:
    """Admins: make the built-in image NAME an ordinary public image: build its bootable
    qcow2 here (tiny: a Debian kernel and a busybox initramfs; debian-12: stock Debian with
    cloud-init, as root with mmdebstrap; both need syslinux and mtools), upload it as one of
    your files, create the public image and follow the import. An existing public image of
    the name is left as it is."""

    async def work(client: Client) -> None:
        try:
            existing: dict[str, Any] | None = await client.get(f"/v1/images/{name}", {"public": "true"})
        except ApiError as failure:
            if failure.status != 404:
                raise
            existing = None
        if existing is not None and existing["public"] and existing["status"] != "failed":
            found = await _wait_image(client, name, timeout, as_json)
            if as_json:
                emit_json(found)
            else:
                console().print(f"image {name} exists already")
                _show_image(found)
            return
        if existing is not None and existing["public"]:  # a failed import: ask again
            await client.request("DELETE", f"/v1/images/{name}", query={"public": "true"})
        try:
            built = await asyncio.to_thread(build_builtin, name, cache)
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            raise Failure(f"cannot build the image {name}: {error}") from None
        file_name = f"{name}.qcow2"
        sha256 = await asyncio.to_thread(_sha256, built)
        mine = {f["name"]: f["sha256"] for f in (await client.get("/v1/files"))["files"]}
        if mine.get(file_name, sha256) != sha256:
            raise Failure(f"you have a file {file_name} that is not this build; delete or rename it first")
        await client.request("PUT", f"/v1/files/{file_name}",
                             headers={"X-Ucloud-Sha256": sha256, "Content-Type": "application/octet-stream"},
                             upload=lambda: open(built, "rb"))
        body: dict[str, Any] = {"name": name, "file": file_name, "public": True}
        if store:
            body["store"] = store
        await client.request("POST", "/v1/images", body)
        found = await _wait_image(client, name, timeout, as_json)
        if as_json:
            emit_json(found)
        else:
            _show_image(found)

    ctx.run(work)


@image.command("list")
@click.option("--owner", metavar="USER", help="Admins: only this user's images (and the public ones).")
@json_option
@pass_context
def image_list(ctx: Context, owner: str | None, as_json: bool) -> None:
    """List the public images and yours."""

    async def work(client: Client) -> None:
        images = (await client.get("/v1/images", {"owner": owner} if owner else None))["images"]
        if as_json:
            emit_json(images)
            return
        listing = table("NAME", "STATUS", "VIRTUAL SIZE", "STORE", "OWNER", "VMS")
        for i in images:
            listing.add_row(i["name"], i["status"] if i["status"] != "importing" else f"importing {i['progress']}%",
                            format_size(i["virtual_size"]) if i["virtual_size"] else "-", i["store"],
                            "public" if i["public"] else i["owner"], str(len(i["used_by"])))
        console().print(listing if images else "no images")

    ctx.run(work)


@image.command("show")
@click.argument("name")
@click.option("--public", is_flag=True, help="The public image of that name.")
@json_option
@pass_context
def image_show(ctx: Context, name: str, public: bool, as_json: bool) -> None:
    """Show the image NAME (yours, else the public one)."""

    async def work(client: Client) -> None:
        found = await client.get(f"/v1/images/{name}", {"public": "true"} if public else None)
        emit_json(found) if as_json else _show_image(found)

    ctx.run(work)


@image.command("delete")
@click.argument("name")
@click.option("--public", is_flag=True, help="Admins: the public image of that name.")
@json_option
@pass_context
def image_delete(ctx: Context, name: str, public: bool, as_json: bool) -> None:
    """Delete the image NAME (refused while VMs use it)."""

    async def work(client: Client) -> None:
        _, done = await client.request("DELETE", f"/v1/images/{name}", query={"public": "true"} if public else None)
        emit_json(done) if as_json else console().print(f"image {name} deleted")

    ctx.run(work)


@vm.command("resize")
@click.argument("vm_ref", metavar="VM")
@click.option("--disk", help="The new disk size (it only grows; a running guest sees it at once).")
@click.option("--cores", help="The new number of cores (the VM must be stopped).")
@click.option("--ram", help="The new memory size (the VM must be stopped).")
@json_option
@pass_context
def vm_resize(ctx: Context, vm_ref: str, disk: str | None, cores: str | None, ram: str | None, as_json: bool) -> None:
    """Resize a VM."""
    body = {k: v for k, v in (("disk", disk), ("cores", cores), ("ram", ram)) if v is not None}
    if not body:
        raise click.UsageError("give --disk, --cores or --ram")

    async def work(client: Client) -> None:
        vm_id = await client.resolve_vm(vm_ref)
        _, done = await client.request("POST", f"/v1/vms/{vm_id}/resize", body)
        emit_json(done) if as_json else console().print(f"VM {vm_id}: resize recorded")

    ctx.run(work)


def register(main: click.Group) -> None:
    main.add_command(file)
    main.add_command(image)
