"""The per-user upload quota holds under concurrency, against a real `ucloud gateway`
process (or two sharing the files root): many uploads of one user at once, each streamed slowly so that all are under way
together, with and without Content-Length. The user's directory never holds more than the
quota (sampled while they run: uploads under way count at what they reserved), the
accepted files together fit in it, every refusal is a 413 problem naming the quota, and
nothing partial is left."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.gateway import gateway_process
from ucloud.domain.limits import MiB

QUOTA = 10 * MiB
SIZE = 3 * MiB
UPLOADS = 12


@pytest.fixture(params=[1, 2], ids=["one gateway", "two gateways"])
def gateway(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[list[str], Path]]:
    """One `ucloud gateway`, or two sharing the files root (the uploads alternate)."""
    files = tmp_path / "files"
    with contextlib.ExitStack() as stack:
        apis = []
        for index in range(request.param):
            root = tmp_path / f"gateway-{index}"
            root.mkdir()
            apis.append(stack.enter_context(gateway_process(
                root, "--files-root", str(files), "--max-file-size", "4MiB", "--file-quota", "10MiB")))
        yield apis, files


def on_disk(directory: Path) -> int:
    total = 0
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return 0
    for entry in entries:
        try:
            total += entry.stat(follow_symlinks=False).st_size
        except FileNotFoundError:  # renamed or removed meanwhile
            pass
    return total


async def test_concurrent_uploads_never_exceed_the_quota(gateway: tuple[list[str], Path]) -> None:
    apis, files = gateway
    directory = files / "alice"
    headers = {"X-Ucloud-User": "alice", "X-Ucloud-Realm": "ucloud", "Content-Type": "application/octet-stream"}
    started = asyncio.Event()

    async def slowly() -> AsyncIterator[bytes]:
        await started.wait()  # every upload is connected before any sends its body
        for _ in range(SIZE // (256 * 1024)):
            yield b"u" * (256 * 1024)
            await asyncio.sleep(0.02)

    async def upload(session: aiohttp.ClientSession, index: int) -> tuple[int, dict[str, object]]:
        declared = {"Content-Length": str(SIZE)} if index % 2 else {}  # half chunked, half declared
        api = apis[index % len(apis)]
        async with session.put(f"{api}/v1/files/f{index}.qcow2", data=slowly(),
                               headers={**headers, **declared}) as answer:
            return answer.status, await answer.json(content_type=None)

    peak = 0
    stop = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, await asyncio.to_thread(on_disk, directory))
            await asyncio.sleep(0.005)

    async with aiohttp.ClientSession() as session:
        sampler = asyncio.create_task(sample())
        uploads = [asyncio.create_task(upload(session, i)) for i in range(UPLOADS)]
        await asyncio.sleep(0.5)
        started.set()
        answers = await asyncio.gather(*uploads)
        stop.set()
        await sampler

    accepted = [a for status, a in answers if status == 201]
    refused = [(status, a) for status, a in answers if status != 201]
    assert accepted and refused, answers
    assert sum(int(a["size"]) for a in accepted) <= QUOTA  # type: ignore[call-overload]
    for status, problem in refused:
        assert status == 413, problem
        assert "quota" in str(problem["detail"]), problem
    assert peak <= QUOTA, f"the directory held {peak} bytes at once, the quota is {QUOTA}"
    left = sorted(p.name for p in directory.iterdir())
    assert left == sorted(str(a["name"]) for a in accepted)  # nothing partial left
    assert on_disk(directory) <= QUOTA
