"""The first vertical slice end to end, every part real and in its own process:
etcd, `ucloud up --no-agent` (gateway + scheduler), `ucloud-host` (host agent running
QEMU guests), the `ucloud` CLI and `ucloud-audit`.

Authentication is the real default of `ucloud up`: it logs the CLI in as its first
admin, who adds and enrols alice through the API; alice logs in with her seed and
acts with sessions opened by her TOTP (the --wait polls make many requests per 30 s
step, which once-only tokens alone could not carry)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.etcd import EtcdCluster, free_port
from ucloud.hostagent.tinyguest import MARKER

pytestmark = [pytest.mark.etcd, pytest.mark.qemu, pytest.mark.slow]

BIN = Path(sys.executable).parent
ADMIN = ("--user", "admin", "--realm", "ucloud-admin")  # the first admin `ucloud up` created


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def qemu_pids(vm_id: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline and cmdline[0].endswith(b"qemu-system-x86_64") and any(vm_id.encode() in a for a in cmdline):
            pids.append(int(proc.name))
    return pids


@dataclass
class Cloud:
    store_url: str
    api: str
    env: dict[str, str]
    host_dir: Path
    tmp: Path
    agent: subprocess.Popen[bytes] | None = None

    def start_agent(self) -> None:
        log = open(self.tmp / "agent.log", "ab")
        self.agent = subprocess.Popen(
            [str(BIN / "ucloud-host"), "--store", self.store_url, "--state-dir", str(self.host_dir),
             "--hostname", "e2e-host", "--accel", "auto"],
            stdout=log, stderr=log, env=self.env, start_new_session=True,
        )

    def ucloud(self, *args: str, timeout: float = 180, input: str | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([str(BIN / "ucloud"), *args], env=self.env, capture_output=True, text=True,
                                timeout=timeout, input=input)
        assert result.returncode == 0, f"ucloud {' '.join(args)}: {result.stderr}\nagent log:\n{self.agent_log()}"
        return result

    def wait_for_host(self, timeout: float = 60) -> None:
        """Until the agent registered this host (it builds the tiny image first)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hosts = subprocess.run([str(BIN / "ucloud"), *ADMIN, "host", "list", "--json"],
                                   env=self.env, capture_output=True, text=True, timeout=30)
            if hosts.returncode == 0 and any(h["hostname"] == "e2e-host" for h in json.loads(hosts.stdout)):
                return
            assert self.agent is not None and self.agent.poll() is None, self.agent_log()
            time.sleep(0.3)
        raise AssertionError(f"the host agent did not register\n{self.agent_log()}")

    def agent_log(self) -> str:
        path = self.tmp / "agent.log"
        return path.read_text()[-3000:] if path.exists() else ""

    def run_dir(self, vm_id: str) -> Path:
        return self.host_dir / "run" / vm_id


@pytest.fixture
def cloud(etcd: EtcdCluster, tmp_path: Path) -> Iterator[Cloud]:
    prefix = f"/e2e-{uuid.uuid4().hex[:8]}/v1"
    store_url = f"etcd://{etcd.endpoints[0]}{prefix}"
    port = free_port()
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config"), "XDG_STATE_HOME": str(tmp_path / "state"),
           "UCLOUD_API": f"http://127.0.0.1:{port}", "UCLOUD_USER": "alice", "UCLOUD_REALM": "ucloud"}
    control_log = open(tmp_path / "control.log", "ab")
    control = subprocess.Popen(
        [str(BIN / "ucloud"), "up", "--no-agent", "--store", store_url, "--listen", "127.0.0.1",
         "--port", str(port), "--state-dir", str(tmp_path / "control")],
        stdout=control_log, stderr=control_log, env=env, start_new_session=True,
    )
    # Short: QMP/VNC unix socket paths under it must fit Linux's 107 bytes.
    host_dir = Path(tempfile.mkdtemp(prefix="uce2e-", dir="/tmp"))
    cloud = Cloud(store_url, f"http://127.0.0.1:{port}", env, host_dir, tmp_path)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{cloud.api}/healthz", timeout=1):
                    break
            except OSError:
                assert control.poll() is None, (tmp_path / "control.log").read_text()
                assert time.monotonic() < deadline, "gateway did not come up"
                time.sleep(0.2)
        cloud.ucloud(*ADMIN, "user", "add", "alice")
        enrolled = json.loads(cloud.ucloud(*ADMIN, "user", "enrol", "alice", "--json").stdout)
        cloud.ucloud("login", "alice", "--realm", "ucloud", "--seed-file", "-", input=enrolled["seed"])
        cloud.start_agent()
        cloud.wait_for_host()
        yield cloud
    finally:
        for process in (cloud.agent, control):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
        for run_dir in (cloud.host_dir / "run").glob("*"):
            for pid in qemu_pids(run_dir.name):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(host_dir, ignore_errors=True)


def wait_for_marker(cloud: Cloud, vm_id: str, count: int = 1, timeout: float = 120) -> str:
    serial = cloud.run_dir(vm_id) / "serial.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if serial.exists():
            text = serial.read_text(errors="replace")
            if text.count(MARKER) >= count:
                return text
        time.sleep(0.5)
    raise AssertionError(f"no {MARKER} on the serial console of {vm_id}\n{cloud.agent_log()}")


def test_a_vm_is_created_booted_stopped_and_deleted_through_the_cli(cloud: Cloud) -> None:
    created = json.loads(cloud.ucloud("vm", "create", "--image", "tiny", "--cores", "1", "--ram", "256MB",
                                      "--disk", "1GB", "--wait", "--timeout", "150", "--json").stdout)
    vm_id = created["id"]
    assert created["status"] == "running"
    assert created["host_id"]  # the scheduler chose the only host: this one

    serial = wait_for_marker(cloud, vm_id)
    assert "uptime=" in serial  # the guest really booted and ran its init
    (pid,) = qemu_pids(vm_id)
    assert _alive(pid)
    vnc = cloud.run_dir(vm_id) / "vnc.sock"
    assert vnc.is_socket()  # VNC only on a unix socket

    cloud.ucloud("vm", "stop", vm_id, "--wait", "--timeout", "90")
    assert not _alive(pid) and qemu_pids(vm_id) == []

    disk = cloud.host_dir / "disks" / f"{vm_id}.qcow2"
    assert disk.exists()
    cloud.ucloud("vm", "delete", vm_id, "--wait", "--timeout", "60")
    assert not disk.exists()

    audit = subprocess.run([str(BIN / "ucloud-audit"), "--store", cloud.store_url, "show", f"vm-{vm_id}", "--json"],
                           capture_output=True, text=True, env=cloud.env, timeout=60)
    assert audit.returncode == 0, audit.stderr
    records = [json.loads(line) for line in audit.stdout.splitlines()]
    assert [r["type"] for r in records] == [
        "vm.requested", "vm.scheduled", "vm.started", "vm.stop_requested", "vm.stopped",
        "vm.delete_requested", "vm.deleted",
    ]
    assert records[0]["actor"] == "alice@ucloud"
    assert records[2]["actor"] == "host/e2e-host@ucloud-system"
    assert [r["version"] for r in records] == list(range(1, 8))


def test_a_restarted_host_agent_adopts_its_running_guest_and_never_starts_a_second(cloud: Cloud) -> None:
    created = json.loads(cloud.ucloud("vm", "create", "--image", "tiny", "--ram", "256MB", "--disk", "1GB",
                                      "--wait", "--timeout", "150", "--json").stdout)
    vm_id = created["id"]
    wait_for_marker(cloud, vm_id)
    (pid,) = qemu_pids(vm_id)

    assert cloud.agent is not None
    cloud.agent.send_signal(signal.SIGKILL)  # no chance to clean up
    cloud.agent.wait(10)
    assert _alive(pid)  # the guest outlives its agent

    cloud.start_agent()
    # Let the new agent register, catch up with the log and reconcile a few times.
    time.sleep(8)
    assert qemu_pids(vm_id) == [pid]
    shown = json.loads(cloud.ucloud("vm", "show", vm_id, "--json").stdout)
    assert shown["status"] == "running"
    # And the adopted guest is really under the new agent's control.
    cloud.ucloud("vm", "stop", vm_id, "--wait", "--timeout", "90")
    assert qemu_pids(vm_id) == []
