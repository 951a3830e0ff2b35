"""A throwaway single-node Ceph cluster for the tests: one monitor, one manager and one
memstore OSD on loopback, each a foreground process of ours, with a pool ``rbd``.

Debian Ceph 16 (ceph-mon, ceph-osd, ceph-mgr, ceph-common). It comes up in about ten
seconds; the manager is started before any `ceph` status command (they block without
one) and every CLI call runs under a timeout. One cluster serves a whole test session
(tests/conftest.py, ``ceph`` fixture).
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.etcd import free_port

POOL = "rbd"


@dataclass
class CephCluster:
    root: Path
    conf: Path
    pool: str = POOL
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def ceph(self, *args: str, timeout: float = 30) -> str:
        done = subprocess.run(["timeout", str(int(timeout)), "ceph", "-c", str(self.conf), *args],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"ceph {' '.join(args)}: {done.stderr.strip()[-500:]}\n{self.logs()}")
        return done.stdout

    def rbd(self, *args: str, timeout: float = 30) -> str:
        done = subprocess.run(["timeout", str(int(timeout)), "rbd", "-c", str(self.conf), *args],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"rbd {' '.join(args)}: {done.stderr.strip()[-500:]}")
        return done.stdout

    def images(self) -> list[str]:
        return sorted(self.rbd("ls", self.pool).split())

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}"
                         for p in sorted((self.root / "log").glob("*.log")))


def _daemon(cluster: CephCluster, *argv: str) -> None:
    log = open(cluster.root / "log" / f"{argv[0]}.out", "ab")
    cluster.processes.append(subprocess.Popen([*argv, "-f", "-c", str(cluster.conf)], stdout=log, stderr=log,
                                              start_new_session=True))


@contextmanager
def ceph_cluster() -> Iterator[CephCluster]:
    root = Path(tempfile.mkdtemp(prefix="ucceph-", dir="/tmp"))  # short: admin socket paths
    port = free_port()
    fsid = uuid.uuid4()
    for sub in ("mon", "mgr", "osd0", "run", "log"):
        (root / sub).mkdir()
    conf = root / "ceph.conf"
    conf.write_text(f"""[global]
fsid = {fsid}
mon host = v2:127.0.0.1:{port}
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
run dir = {root}/run
log file = {root}/log/$name.log
admin socket = {root}/run/$name.asok
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon allow pool delete = true
osd crush chooseleaf type = 0
ms bind ipv4 = true
ms bind ipv6 = false
[client]
keyring = {root}/admin.keyring
[mon.a]
keyring = {root}/mon.keyring
mon data = {root}/mon
mon addr = v2:127.0.0.1:{port}
[mgr.x]
keyring = {root}/mgr/keyring
mgr data = {root}/mgr
[osd.0]
keyring = {root}/osd0/keyring
osd data = {root}/osd0
osd objectstore = memstore
memstore device bytes = 3221225472
""")
    cluster = CephCluster(root, conf)

    def run(*argv: str) -> None:
        done = subprocess.run(["timeout", "30", *argv], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()[-500:]}\n{cluster.logs()}")

    try:
        run("ceph-authtool", "--create-keyring", f"{root}/mon.keyring", "--gen-key", "-n", "mon.",
            "--cap", "mon", "allow *")
        run("ceph-authtool", "--create-keyring", f"{root}/admin.keyring", "--gen-key", "-n", "client.admin",
            "--cap", "mon", "allow *", "--cap", "osd", "allow *", "--cap", "mgr", "allow *")
        run("ceph-authtool", f"{root}/mon.keyring", "--import-keyring", f"{root}/admin.keyring")
        run("monmaptool", "--create", "--addv", "a", f"[v2:127.0.0.1:{port}]", "--fsid", str(fsid),
            f"{root}/monmap")
        run("ceph-mon", "-c", str(conf), "--mkfs", "-i", "a", "--monmap", f"{root}/monmap",
            "--keyring", f"{root}/mon.keyring")
        _daemon(cluster, "ceph-mon", "-i", "a")
        cluster.ceph("auth", "get-or-create", "mgr.x", "mon", "allow profile mgr", "osd", "allow *", "-o",
                     f"{root}/mgr/keyring")
        _daemon(cluster, "ceph-mgr", "-i", "x")
        osd = cluster.ceph("osd", "create").strip()
        cluster.ceph("auth", "get-or-create", f"osd.{osd}", "mon", "allow profile osd", "mgr", "allow profile osd",
                     "osd", "allow *", "-o", f"{root}/osd0/keyring")
        run("ceph-osd", "-c", str(conf), "-i", osd, "--mkfs")
        _daemon(cluster, "ceph-osd", "-i", osd)
        cluster.ceph("osd", "pool", "create", POOL, "8")
        cluster.ceph("osd", "pool", "application", "enable", POOL, "rbd")
        deadline = time.monotonic() + 90
        while "active+clean" not in cluster.ceph("pg", "stat") or "unknown" in cluster.ceph("pg", "stat"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"Ceph's placement groups did not become clean\n{cluster.logs()}")
            time.sleep(0.5)
        yield cluster
    finally:
        for process in reversed(cluster.processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        subprocess.run(["rm", "-rf", str(root)], check=False)
