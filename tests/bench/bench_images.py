"""Image import throughput against plain `qemu-img convert`, and clone time by image size.

    .venv/bin/python -m tests.bench.run images
    .venv/bin/python -m tests.bench.bench_images --size-mib 512 --rounds 3

Import: the image scanner's whole import of one qcow2 recorded as the file scanner or an
upload records it (header check, `qemu-img info` and `check`, the copy into a filesystem
store with progress events, the file's signature checked before and after, the events on a
real SQLite log) against `qemu-img convert -f qcow2 -O qcow2` of the same file
in the same run, alternating which goes first, page cache warm and dirty pages written back
before each; the figure is the ratio of their
throughputs (goal: at least 0.9). Clone: `FsStore.clone` (a qcow2 overlay) of a 1 GiB and
a 20 GiB image, median of many; the figure is the ratio (goal: within 1.2x, i.e. the
clone costs the same for any size).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from ucloud.commands.aggregates import IMAGE
from ucloud.commands.service import CommandService
from ucloud.commands.unit_of_work import Actor
from ucloud.domain import image as image_domain
from ucloud.domain.limits import GiB, MiB
from ucloud.eventstore.sqlite import SqliteEventStore
from ucloud.imagestore.stores import FsStore
from ucloud.processes.files import hash_file
from ucloud.processes.images import ImageScanner


def cpu_seconds() -> float:
    """User and system CPU time of this process and of its waited-for children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def make_qcow2(path: Path, data_mib: int, virtual: int) -> None:
    raw = path.with_suffix(".raw")
    with open(raw, "wb") as out:
        for _ in range(data_mib):
            out.write(os.urandom(MiB))
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True)
    raw.unlink()
    subprocess.run(["qemu-img", "resize", "-q", "-f", "qcow2", str(path), str(virtual)], check=True)


async def bench_import(work: Path, size_mib: int, rounds: int) -> None:
    files = work / "files"
    source = files / "alice" / "disk.qcow2"
    source.parent.mkdir(parents=True)
    make_qcow2(source, size_mib, max(GiB, size_mib * MiB))
    hashed = hash_file(source)  # as the file scanner or an upload records it; warms the page cache too
    assert hashed is not None
    size, sha, signature = hashed
    log = SqliteEventStore(work / "events.sqlite")
    commands = CommandService(log)
    alice = Actor("alice")
    await commands.record_file(alice, "disk.qcow2", size, sha, signature=signature)
    store = FsStore("local", work / "store")
    scanner = ImageScanner(commands, {"local": store}, files)
    plain_times, import_times = [], []
    plain_cpu, import_cpu = [], []

    async def plain() -> None:
        target = work / "plain.qcow2"
        os.sync()  # both start without the other's dirty pages to write back
        cpu = cpu_seconds()
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec("qemu-img", "convert", "-f", "qcow2", "-O", "qcow2",
                                                    str(source), str(target))
        assert await proc.wait() == 0
        plain_times.append(time.perf_counter() - started)
        plain_cpu.append(cpu_seconds() - cpu)
        target.unlink()

    async def scanned(round_: int) -> None:
        created = await commands.create_image(alice, f"img{round_}", "disk.qcow2")
        image = (await commands.repository.load(IMAGE, image_domain.stream_name(created.result))).state
        assert image is not None
        os.sync()
        cpu = cpu_seconds()
        started = time.perf_counter()
        report = await scanner.import_image(image)
        await commands.report_image(scanner.actor, report)
        import_times.append(time.perf_counter() - started)
        import_cpu.append(cpu_seconds() - cpu)
        assert isinstance(report, image_domain.ReportImported), report
        Path(report.location).chmod(0o644)
        Path(report.location).unlink()

    for round_ in range(rounds):  # alternating which goes first
        if round_ % 2:
            await scanned(round_)
            await plain()
        else:
            await plain()
            await scanned(round_)
    await log.close()
    plain, imported = statistics.median(plain_times), statistics.median(import_times)
    print(f"import of a qcow2 with {size_mib} MiB of data, {rounds} rounds, medians:")
    print(f"  qemu-img convert   {plain:7.3f} s  {size_mib / plain:8.1f} MiB/s")
    print(f"  image scanner      {imported:7.3f} s  {size_mib / imported:8.1f} MiB/s")
    print(f"  throughput ratio   {plain / imported:7.3f}  (goal >= 0.9)")
    # Each round's two contenders ran back to back: the median of the rounds' own ratios is
    # less at the mercy of load that comes and goes than the ratio of two medians.
    pairs = statistics.median(p / i for p, i in zip(plain_times, import_times, strict=True))
    print(f"  median of the rounds' ratios {pairs:7.3f}")
    print(f"  CPU seconds (this process and its qemu-img children), medians: qemu-img convert "
          f"{statistics.median(plain_cpu):.3f}, image scanner {statistics.median(import_cpu):.3f}")


async def bench_clone(work: Path, clones: int) -> None:
    store = FsStore("local", work / "clone-store")
    store.root.mkdir(parents=True)
    medians = {}
    for label, virtual in (("1 GiB", GiB), ("20 GiB", 20 * GiB)):
        base = store.root / f"{label.replace(' ', '')}.qcow2"
        make_qcow2(base, 32, virtual)
        times = []
        disks = work / f"disks-{label.replace(' ', '')}"
        for _ in range(clones):
            vm_id = uuid.uuid4()
            started = time.perf_counter()
            await store.clone(str(base), vm_id, virtual, disks)
            times.append(time.perf_counter() - started)
            await store.remove_clone(vm_id, disks)
        medians[label] = statistics.median(times)
        print(f"clone of a {label:>6} image (32 MiB of data): median {medians[label] * 1000:7.2f} ms "
              f"over {clones}")
    print(f"  ratio 20 GiB / 1 GiB: {medians['20 GiB'] / medians['1 GiB']:.3f}  (goal <= 1.2)")


async def bench_rbd(work: Path, size_mib: int, rounds: int, clones: int) -> None:
    """The same two figures with the Ceph RBD store on a throwaway single-node cluster
    (memstore OSD: the cluster's own I/O is memory)."""
    import rados
    import rbd

    from tests.support.ceph import ceph_cluster
    from ucloud.imagestore.rbd import SNAPSHOT, RbdStore

    with ceph_cluster() as ceph:
        store = RbdStore("ceph", ceph.pool, ceph.conf)
        files = work / "rbd-files"
        source = files / "alice" / "disk.qcow2"
        source.parent.mkdir(parents=True)
        make_qcow2(source, size_mib, max(GiB, size_mib * MiB))
        hashed = hash_file(source)
        assert hashed is not None
        log = SqliteEventStore(work / "rbd-events.sqlite")
        commands = CommandService(log, image_stores=("ceph",))
        alice = Actor("alice")
        await commands.record_file(alice, "disk.qcow2", hashed[0], hashed[1], signature=hashed[2])
        scanner = ImageScanner(commands, {"ceph": store}, files)
        plain_times, import_times = [], []
        for round_ in range(rounds):
            target = f"rbd:{ceph.pool}/plain-{round_}:conf={ceph.conf}"
            started = time.perf_counter()
            proc = await asyncio.create_subprocess_exec("qemu-img", "convert", "-f", "qcow2", "-O", "raw",
                                                        str(source), target)
            assert await proc.wait() == 0
            plain_times.append(time.perf_counter() - started)
            ceph.rbd("rm", f"{ceph.pool}/plain-{round_}")
            created = await commands.create_image(alice, f"img{round_}", "disk.qcow2", store="ceph")
            image = (await commands.repository.load(IMAGE, image_domain.stream_name(created.result))).state
            assert image is not None
            started = time.perf_counter()
            report = await scanner.import_image(image)
            await commands.report_image(scanner.actor, report)
            import_times.append(time.perf_counter() - started)
            assert isinstance(report, image_domain.ReportImported), report
            await store.remove(image.id, report.location)
        await log.close()
        plain, imported = statistics.median(plain_times), statistics.median(import_times)
        print(f"RBD: import of a qcow2 with {size_mib} MiB of data, {rounds} rounds, medians:")
        print(f"  qemu-img convert -O raw rbd:   {plain:7.3f} s  {size_mib / plain:8.1f} MiB/s")
        print(f"  image scanner                  {imported:7.3f} s  {size_mib / imported:8.1f} MiB/s")
        print(f"  throughput ratio               {plain / imported:7.3f}  (goal >= 0.9)")

        def make_base(name: str, size: int) -> None:
            cluster = rados.Rados(conffile=str(ceph.conf))
            cluster.connect(timeout=20)
            try:
                with cluster.open_ioctx(ceph.pool) as ioctx:
                    rbd.RBD().create(ioctx, name, size, old_format=False, features=rbd.RBD_FEATURE_LAYERING)
                    with rbd.Image(ioctx, name) as image:
                        chunk = os.urandom(MiB)
                        for offset in range(0, 32 * MiB, MiB):
                            image.write(chunk, offset)
                        image.create_snap(SNAPSHOT)
                        image.protect_snap(SNAPSHOT)
            finally:
                cluster.shutdown()

        medians = {}
        for label, virtual in (("1 GiB", GiB), ("20 GiB", 20 * GiB)):
            name = f"image-{label.replace(' ', '').lower()}"
            await asyncio.to_thread(make_base, name, virtual)
            times = []
            for _ in range(clones):
                vm_id = uuid.uuid4()
                started = time.perf_counter()
                await store.clone(f"{ceph.pool}/{name}", vm_id, virtual, work)
                times.append(time.perf_counter() - started)
                await store.remove_clone(vm_id, work)
            medians[label] = statistics.median(times)
            print(f"RBD clone of a {label:>6} image (32 MiB of data): median {medians[label] * 1000:7.2f} ms "
                  f"over {clones}")
        print(f"  ratio 20 GiB / 1 GiB: {medians['20 GiB'] / medians['1 GiB']:.3f}  (goal <= 1.2)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=512, help="data in the imported qcow2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clones", type=int, default=30)
    parser.add_argument("--dir", default="/var/tmp", help="where the files and the store are (/dev/shm: no disk "
                        "writeback in the figures, only the work itself)")
    parser.add_argument("--ceph", action="store_true", help="also the RBD store, on a throwaway Ceph")
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke test, not figures)")
    args = parser.parse_args()
    if args.quick:
        args.size_mib, args.rounds, args.clones = 32, 1, 5
    with tempfile.TemporaryDirectory(prefix="ucloud-bench-images-", dir=args.dir) as tmp:
        asyncio.run(bench_import(Path(tmp), args.size_mib, args.rounds))
        asyncio.run(bench_clone(Path(tmp), args.clones))
        if args.ceph:
            asyncio.run(bench_rbd(Path(tmp), min(args.size_mib, 512), args.rounds, args.clones))


if __name__ == "__main__":
    main()
