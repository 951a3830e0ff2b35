"""Real etcd servers for tests and benchmarks: Debian's etcd-server on free loopback ports.

Data lives on tmpfs (/dev/shm) when it exists: ~3x faster than disk here.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
ETCDCTL = shutil.which("etcdctl") or "/usr/bin/etcdctl"
# The eventsourcing contract tests insert more than 128 keys in one transaction;
# production needs the same headroom for group commit (docs/operations.md).
MAX_TXN_OPS = 4096


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tmp_root() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


class EtcdMember:
    def __init__(self, name: str, data_dir: Path, client_port: int, peer_port: int, cluster: str, state: str = "new",
                 extra_args: Sequence[str] = ()):
        self.extra_args = list(extra_args)
        self.name = name
        self.data_dir = data_dir
        self.client_port = client_port
        self.peer_port = peer_port
        self.cluster = cluster
        self.state = state
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"{name}.log"

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def start(self) -> None:
        args = [
            ETCD,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", f"http://127.0.0.1:{self.client_port}",
            "--advertise-client-urls", f"http://127.0.0.1:{self.client_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{self.peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_port}",
            "--initial-cluster", self.cluster,
            "--initial-cluster-state", self.state,
            "--initial-cluster-token", "ucloud-test",
            "--max-txn-ops", str(MAX_TXN_OPS),
            "--max-request-bytes", str(8 * 1024 * 1024),
            "--heartbeat-interval", "50",
            "--election-timeout", "500",
            "--logger", "zap",
            "--log-level", "error",
            *self.extra_args,
        ]
        log = open(self.log_path, "ab")  # the child owns it from here
        self.process = subprocess.Popen(args, stdout=log, stderr=log, start_new_session=True)
        log.close()

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"etcd {self.name} exited: {self.log_path.read_text()[-2000:]}")
            result = subprocess.run(
                [ETCDCTL, "--endpoints", self.endpoint, "--dial-timeout=1s", "--command-timeout=2s", "endpoint", "health"],
                capture_output=True, env={**os.environ, "ETCDCTL_API": "3"},
            )
            if result.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"etcd {self.name} not ready after {timeout}s")

    def kill(self) -> None:
        # SIGKILL: SIGTERM can hang when the peers are already gone.
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def etcdctl(self, *args: str) -> str:
        result = subprocess.run(
            [ETCDCTL, "--endpoints", self.endpoint, *args],
            capture_output=True, text=True, env={**os.environ, "ETCDCTL_API": "3"}, timeout=30,
        )
        if result.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)}: {result.stderr}")
        return result.stdout


class EtcdCluster:
    """One or three (or n) members on loopback; removed with its data on close."""

    def __init__(self, size: int = 1, extra_args: Sequence[str] = ()):
        """``extra_args`` go to every member's etcd command line (e.g. a larger
        --quota-backend-bytes for benchmarks)."""
        self.root = Path(tempfile.mkdtemp(prefix="ucloud-etcd-", dir=_tmp_root()))
        ports = [(free_port(), free_port()) for _ in range(size)]
        cluster = ",".join(f"m{i}=http://127.0.0.1:{peer}" for i, (_, peer) in enumerate(ports))
        self.members = [
            EtcdMember(f"m{i}", self.root / f"m{i}", client, peer, cluster, extra_args=extra_args)
            for i, (client, peer) in enumerate(ports)
        ]

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def start(self) -> EtcdCluster:
        for member in self.members:
            member.start()
        for member in self.members:
            member.wait_ready()
        return self

    def leader(self) -> EtcdMember:
        import json

        for member in self.members:
            if member.process is None or member.process.poll() is not None:
                continue
            try:
                status = json.loads(member.etcdctl("endpoint", "status", "-w", "json"))
            except RuntimeError:
                continue
            header = status[0]["Status"]
            if header["leader"] == header["header"]["member_id"]:
                return member
        raise RuntimeError("no leader")

    def restart(self, member: EtcdMember) -> None:
        member.kill()
        member.state = "existing"
        member.start()
        member.wait_ready()

    def close(self) -> None:
        for member in self.members:
            member.kill()
        shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def etcd_cluster(size: int = 1, extra_args: Sequence[str] = ()) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(size, extra_args)
    try:
        yield cluster.start()
    finally:
        cluster.close()
