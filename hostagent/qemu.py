"""The QEMU hypervisor driver.

Each VM is one ``qemu-system-x86_64`` process, started detached from the agent
(own session, output to a log file) so that it survives the agent's death. Its
run directory ``<run_root>/<vm_id>/`` holds everything needed to find it again:

===============  ==============================================================
``vm.json``      what we started: spec, argv, accelerator, start time
``pid``          QEMU's ``-pidfile``; QEMU holds a POSIX lock on it while it
                 lives. Asking who holds it (F_GETLK) is our liveness test (no
                 pid-reuse mistakes, zombies count as dead) and the lock is the
                 guarantee that a second QEMU for the same VM refuses to start
``qmp.sock``     QMP for control (query-status, system_powerdown, system_reset,
                 quit), one short connection per operation
``events.out``   a second QMP monitor on a pipe chardev whose input
                 (``events.in``) is a pre-written ``qmp_capabilities``: QEMU
                 itself appends every QMP event (SHUTDOWN with its reason,
                 RESET, ...) here, even while no agent is running
``console.sock`` the serial console (interactive), logged to ``serial.log``
``vnc.sock``     VNC, on a unix socket only
``qemu.log``     QEMU's own stdout/stderr
``stop.json``    written *before* we ask a VM to stop: "the host wanted this"
``exit.json``    the final status once the process is gone
===============  ==============================================================

Exit reasons follow from those files: ``stop.json`` present means we stopped
it; otherwise the SHUTDOWN event QEMU logged says whether the guest powered
off; no SHUTDOWN event at all means QEMU was killed or crashed.

KVM is used only when it has been *shown* to work: ``detect_accelerator`` boots
the tiny guest under ``-accel kvm`` with a timeout (a paravirtual /dev/kvm can
exist and still hang a stock kernel) and caches the answer per host boot.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Literal
from uuid import UUID

import msgspec
from qemu.qmp import QMPClient, QMPError

from ucloud.hostagent.hypervisor import (
    MIB,
    DiskError,
    ExitReason,
    HypervisorDriver,
    HypervisorError,
    InvalidSpec,
    NetworkInterface,
    VmAlreadyRunning,
    VmHandle,
    VmNotRunning,
    VmSpec,
    VmStartError,
    VmState,
    VmStatus,
)
from ucloud.hostagent.tinyguest import MARKER, TinyGuest, ensure_tiny_guest

log = logging.getLogger(__name__)

Accel = Literal["kvm", "tcg"]

QEMU_BINARY = "qemu-system-x86_64"
MACHINE = "q35"
# Linux limits sun_path to 108 bytes including the terminating NUL.
UNIX_PATH_MAX = 107
# Re-press the power button this often: a press that arrives before the guest's
# ACPI daemon runs is lost.
POWERDOWN_REPEAT = 3.0
POLL = 0.1

VM_FILE = "vm.json"
PID_FILE = "pid"
QMP_SOCKET = "qmp.sock"
CONSOLE_SOCKET = "console.sock"
VNC_SOCKET = "vnc.sock"
SERIAL_LOG = "serial.log"
QEMU_LOG = "qemu.log"
EVENTS = "events"  # the pipe chardev uses events.in and events.out
STOP_FILE = "stop.json"
EXIT_FILE = "exit.json"
LOCK_FILE = "lock"


class AccelProbe(msgspec.Struct, frozen=True, kw_only=True):
    """The accelerator this host can use, why, and what the answer is valid for."""

    accel: str
    reason: str
    key: str = ""
    seconds: float = 0.0


class RunRecord(msgspec.Struct, kw_only=True):
    """vm.json: what the driver started, so a restarted agent can adopt it."""

    spec: VmSpec
    argv: list[str]
    accel: str
    started_at: float
    pid: int | None = None
    # The root port each NIC sits on, by tap: boot NICs take slots 0.., hot-plugged ones the
    # lowest free slot. spec.interfaces is kept equal to what the guest has now.
    nic_slots: dict[str, int] = {}


class StopIntent(msgspec.Struct, frozen=True, kw_only=True):
    mode: str  # "graceful" or "kill"
    at: float


# --------------------------------------------------------------------------- #
# Command line


def _opt(value: str | Path) -> str:
    """Escape a value for a QEMU -option (a comma is written as two commas)."""
    return str(value).replace(",", ",,")


def _socket_path(path: Path) -> str:
    text = str(path)
    if len(text.encode()) > UNIX_PATH_MAX:
        raise InvalidSpec(
            f"unix socket path {text!r} is {len(text.encode())} bytes; Linux allows "
            f"{UNIX_PATH_MAX}: use a shorter run root"
        )
    return text


def build_argv(
    spec: VmSpec, run_dir: Path, accel: Accel | str, qemu_binary: str = QEMU_BINARY
) -> list[str]:
    """The full QEMU command line for spec. Pure: no files are touched."""
    if accel not in ("kvm", "tcg"):
        raise InvalidSpec(f"accelerator must be 'kvm' or 'tcg', got {accel!r}")
    run_dir = run_dir.absolute()
    argv = [
        qemu_binary,
        "-name",
        f"guest={_opt(spec.name)},process=ucloud-vm",
        "-uuid",
        str(spec.vm_id),
        "-machine",
        MACHINE,
        "-accel",
        accel,
        # KVM: the host CPU; TCG: every feature TCG can emulate.
        "-cpu",
        "host" if accel == "kvm" else "max",
        "-smp",
        str(spec.cores),
        "-m",
        f"{spec.ram_bytes // MIB}M",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-msg",
        "timestamp=on",
        # seccomp: QEMU may not spawn processes or gain privileges.
        "-sandbox",
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        "-pidfile",
        str(run_dir / PID_FILE),
        "-chardev",
        f"socket,id=qmp,path={_opt(_socket_path(run_dir / QMP_SOCKET))},server=on,wait=off",
        "-mon",
        "chardev=qmp,mode=control",
        "-chardev",
        f"pipe,id=events,path={_opt(run_dir / EVENTS)}",
        "-mon",
        "chardev=events,mode=control",
        "-chardev",
        f"socket,id=console,path={_opt(_socket_path(run_dir / CONSOLE_SOCKET))},"
        f"server=on,wait=off,logfile={_opt(run_dir / SERIAL_LOG)},logappend=on",
        "-serial",
        "chardev:console",
        # A framebuffer so that the VNC console shows something; VNC only on a unix socket.
        "-device",
        "VGA",
        "-vnc",
        f"unix:{_opt(_socket_path(run_dir / VNC_SOCKET))}",
    ]
    if spec.kernel is not None:
        argv += ["-kernel", spec.kernel]
        if spec.initrd is not None:
            argv += ["-initrd", spec.initrd]
        if spec.append is not None:
            argv += ["-append", spec.append]
    if spec.disk_path is not None:
        argv += [
            "-drive",
            f"file={_opt(spec.disk_path)},if=none,id=disk0,format={spec.disk_format},discard=unmap",
            "-device",
            "virtio-blk-pci,drive=disk0,bootindex=1",
        ]
    smbios = [f"{key}={_opt(value)}" for key, value in (("product", spec.smbios_product),
                                                          ("serial", spec.smbios_serial)) if value is not None]
    if smbios:
        argv += ["-smbios", ",".join(["type=1", *smbios])]
    # One PCIe root port per possible NIC, so that any NIC can be hot-plugged and
    # hot-unplugged later (q35 plugs nothing into the root complex at run time).
    for slot in range(NIC_SLOTS):
        argv += ["-device", f"pcie-root-port,id={nic_port(slot)},bus=pcie.0,chassis={slot + 1},io-reserve=0"]
    for slot, nic in enumerate(spec.interfaces):
        argv += [
            "-netdev",
            f"tap,id={netdev_id(nic.tap)},ifname={nic.tap},script=no,downscript=no",
            "-device",
            f"virtio-net-pci,netdev={netdev_id(nic.tap)},mac={nic.mac},id={nic_id(nic.tap)},bus={nic_port(slot)}",
        ]
    return argv


NIC_SLOTS = 16  # the domain's MAX_NICS


def nic_port(slot: int) -> str:
    return f"nicport{slot}"


def netdev_id(tap: str) -> str:
    return f"net-{tap}"


def nic_id(tap: str) -> str:
    return f"nic-{tap}"


# --------------------------------------------------------------------------- #
# Accelerator detection


_PROBE_CACHE: dict[str, AccelProbe] = {}


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown-boot"


def _qemu_version(qemu_binary: str) -> str:
    try:
        out = subprocess.run(
            [qemu_binary, "--version"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as error:
        raise HypervisorError(f"{qemu_binary} --version failed: {error}") from error
    return out.splitlines()[0].strip() if out else "unknown"


def kvm_device_usable(device: Path = Path("/dev/kvm")) -> str | None:
    """None when device exists and opens read-write, else why not."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return f"{device} does not exist"
    except OSError as error:
        return f"{device} cannot be opened: {error.strerror}"
    os.close(fd)
    return None


async def probe_kvm(
    guest: TinyGuest, *, qemu_binary: str = QEMU_BINARY, timeout: float = 15.0, cpu: str = "host"
) -> AccelProbe:
    """Boot guest under -accel kvm; KVM works only if the guest's marker appears in time.

    cpu is the model VMs would get (build_argv uses "host" with KVM).
    """
    began = time.monotonic()
    problem = kvm_device_usable()
    if problem is not None:
        return AccelProbe(accel="tcg", reason=problem)
    with tempfile.TemporaryDirectory(prefix="ucloud-kvm-probe-") as scratch:
        serial = Path(scratch) / "serial.log"
        argv = [
            qemu_binary,
            "-machine", MACHINE,
            "-accel", "kvm",
            "-cpu", cpu,
            "-smp", "1",
            "-m", "128M",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", str(guest.kernel),
            "-initrd", str(guest.initrd),
            "-append", f"{guest.append} ucloud.probe=1",
            "-serial", f"file:{_opt(serial)}",
        ]  # fmt: skip
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            deadline = began + timeout
            while time.monotonic() < deadline:
                if serial.exists() and MARKER.encode() in serial.read_bytes():
                    took = time.monotonic() - began
                    return AccelProbe(
                        accel="kvm",
                        reason=f"a guest booted under KVM in {took:.1f}s",
                        seconds=took,
                    )
                if proc.returncode is not None:
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(POLL):
                        await proc.wait()
            took = time.monotonic() - began
            if proc.returncode is not None:
                stderr = (await proc.stderr.read()).decode(errors="replace") if proc.stderr else ""
                tail = " | ".join(stderr.strip().splitlines()[-3:])
                return AccelProbe(
                    accel="tcg",
                    reason=f"qemu -accel kvm exited {proc.returncode} before the guest booted: {tail}",
                    seconds=took,
                )
            return AccelProbe(
                accel="tcg",
                reason=f"a guest under KVM printed nothing within {timeout:.0f}s (KVM hangs)",
                seconds=took,
            )
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def detect_accelerator(
    guest: TinyGuest | None = None,
    *,
    qemu_binary: str = QEMU_BINARY,
    timeout: float = 15.0,
    cache_file: Path | None = None,
    force: bool = False,
) -> AccelProbe:
    """KVM if proven to work on this host, else TCG; cached per host boot.

    The answer is cached in memory and in cache_file (default: beside the tiny
    guest), keyed by the host's boot id, the QEMU version and the probe guest,
    so the probe boot runs once per host boot. force=True probes again.
    """
    problem = kvm_device_usable()
    if problem is not None:
        return AccelProbe(accel="tcg", reason=problem)
    probe_guest: TinyGuest = (
        guest if guest is not None else await asyncio.to_thread(ensure_tiny_guest, None)
    )
    key = f"{_boot_id()}|{_qemu_version(qemu_binary)}|{probe_guest.version}"
    cache_file = cache_file or probe_guest.kernel.parent / "accel-probe.json"
    if not force:
        if key in _PROBE_CACHE:
            return _PROBE_CACHE[key]
        try:
            cached = msgspec.json.decode(cache_file.read_bytes(), type=AccelProbe)
        except (OSError, msgspec.DecodeError):
            cached = None
        if cached is not None and cached.key == key:
            _PROBE_CACHE[key] = cached
            return cached
    result = await probe_kvm(probe_guest, qemu_binary=qemu_binary, timeout=timeout)
    result = msgspec.structs.replace(result, key=key)
    _PROBE_CACHE[key] = result
    with contextlib.suppress(OSError):
        tmp = cache_file.with_suffix(".tmp")
        tmp.write_bytes(msgspec.json.encode(result))
        os.replace(tmp, cache_file)
    log.info("accelerator: %s (%s)", result.accel, result.reason)
    return result


# --------------------------------------------------------------------------- #
# Run directory helpers


# struct flock on Linux (x86-64, aarch64): l_type, l_whence, l_start, l_len, l_pid.
_FLOCK = struct.Struct("hhqqi4x")


def _lock_holder(pidfile: Path) -> int | None:
    """The pid of the process holding the lock on QEMU's pid file, i.e. the live QEMU.

    QEMU takes a POSIX lock on its -pidfile for its whole life. F_GETLK asks who
    holds it without taking it (taking it, even for a moment, could make a QEMU
    that is starting right then fail). A dead or zombie QEMU holds no lock, and a
    stale pid file naming a reused pid is never mistaken for a live VM.
    """
    try:
        fd = os.open(pidfile, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        query = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        l_type, _, _, _, l_pid = _FLOCK.unpack(fcntl.fcntl(fd, fcntl.F_GETLK, query))
    finally:
        os.close(fd)
    return None if l_type == fcntl.F_UNLCK else l_pid


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    """The QMP events QEMU logged for the current run (oldest first)."""
    try:
        raw = (run_dir / f"{EVENTS}.out").read_text(errors="replace")
    except OSError:
        return []
    events = []
    for line in raw.splitlines():
        try:
            message = json.loads(line)
        except ValueError:
            continue  # a half-written last line when QEMU was killed
        if isinstance(message, dict) and "event" in message:
            events.append(message)
    return events


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def _exit_from_files(run_dir: Path, exit_code: int | None) -> tuple[VmState, ExitReason, str]:
    if (run_dir / STOP_FILE).exists():
        return VmState.STOPPED, ExitReason.STOPPED_BY_HOST, "stop requested by the host"
    shutdowns = [e for e in read_events(run_dir) if e.get("event") == "SHUTDOWN"]
    reason = shutdowns[-1].get("data", {}).get("reason") if shutdowns else None
    if reason == "guest-shutdown":
        return VmState.STOPPED, ExitReason.GUEST_SHUTDOWN, "the guest powered off"
    if reason in ("host-qmp-quit", "host-ui"):
        return VmState.STOPPED, ExitReason.STOPPED_BY_HOST, f"QEMU was told to quit ({reason})"
    if reason == "guest-panic":
        return VmState.CRASHED, ExitReason.CRASHED, "the guest kernel panicked"
    if reason == "host-signal":
        detail = "QEMU was terminated by a signal that ucloud did not send"
    elif reason is not None:
        detail = f"QEMU shut down: {reason}"
    else:
        detail = "QEMU exited without a shutdown (killed or crashed)"
    if exit_code is not None:
        detail += f"; exit status {exit_code}"
    log_tail = _tail(run_dir / QEMU_LOG, 3)
    if log_tail:
        detail += f"; qemu.log: {log_tail}"
    return VmState.CRASHED, ExitReason.CRASHED, detail


# --------------------------------------------------------------------------- #
# The driver


class QemuDriver(HypervisorDriver):
    """HypervisorDriver for QEMU/KVM or QEMU/TCG on Linux.

    accel: "auto" (probe once, see detect_accelerator), "kvm" or "tcg" (trust
    the operator). probe_guest: the guest the KVM probe boots (default: the
    tiny guest, built on first need).
    """

    name = "qemu"

    def __init__(
        self,
        run_root: Path | str,
        *,
        accel: Literal["auto", "kvm", "tcg"] = "auto",
        qemu_binary: str = QEMU_BINARY,
        probe_guest: TinyGuest | None = None,
        probe_timeout: float = 15.0,
        qmp_timeout: float = 5.0,
        start_timeout: float = 30.0,
    ) -> None:
        if accel not in ("auto", "kvm", "tcg"):
            raise InvalidSpec(f"accel must be auto, kvm or tcg, got {accel!r}")
        self.run_root = Path(run_root).absolute()
        self.qemu_binary = qemu_binary
        self.qmp_timeout = qmp_timeout
        self.start_timeout = start_timeout
        self._accel_choice = accel
        self._probe_guest = probe_guest
        self._probe_timeout = probe_timeout
        self._probe: AccelProbe | None = None
        self._children: dict[UUID, subprocess.Popen[bytes]] = {}
        self._exit_codes: dict[UUID, int] = {}
        self._locks: dict[UUID, asyncio.Lock] = {}

    # -- paths ---------------------------------------------------------------

    def run_dir(self, vm_id: UUID) -> Path:
        return self.run_root / str(vm_id)

    def console_path(self, vm_id: UUID) -> Path:
        return self.run_dir(vm_id) / CONSOLE_SOCKET

    def vnc_socket_path(self, vm_id: UUID) -> Path:
        return self.run_dir(vm_id) / VNC_SOCKET

    def serial_log_path(self, vm_id: UUID) -> Path:
        return self.run_dir(vm_id) / SERIAL_LOG

    def qmp_path(self, vm_id: UUID) -> Path:
        return self.run_dir(vm_id) / QMP_SOCKET

    def pid_path(self, vm_id: UUID) -> Path:
        return self.run_dir(vm_id) / PID_FILE

    # -- accelerator -----------------------------------------------------------

    async def accelerator(self) -> str:
        """The accelerator new VMs get: the operator's choice or the probe's answer."""
        if self._accel_choice != "auto":
            return self._accel_choice
        if self._probe is None:
            self._probe = await detect_accelerator(
                self._probe_guest, qemu_binary=self.qemu_binary, timeout=self._probe_timeout
            )
        return self._probe.accel

    @property
    def accel_probe(self) -> AccelProbe | None:
        return self._probe

    # -- bookkeeping -------------------------------------------------------------

    def _lock(self, vm_id: UUID) -> asyncio.Lock:
        return self._locks.setdefault(vm_id, asyncio.Lock())

    @contextlib.asynccontextmanager
    async def _host_lock(self, vm_id: UUID) -> AsyncIterator[None]:
        """One start/stop/kill per VM at a time, in this process and across processes."""
        async with self._lock(vm_id):
            run_dir = self.run_dir(vm_id)
            run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            with (run_dir / LOCK_FILE).open("w") as handle:
                while True:
                    try:
                        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        await asyncio.sleep(POLL)
                try:
                    yield
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)

    def _record(self, vm_id: UUID) -> RunRecord | None:
        try:
            return msgspec.json.decode((self.run_dir(vm_id) / VM_FILE).read_bytes(), type=RunRecord)
        except FileNotFoundError:
            return None
        except msgspec.DecodeError as error:
            raise HypervisorError(f"VM {vm_id}: {VM_FILE} is unreadable: {error}") from error

    def _write(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def _live_pid(self, vm_id: UUID) -> int | None:
        """The QEMU pid if its process lives; reaps our own dead children."""
        child = self._children.get(vm_id)
        if child is not None and child.poll() is not None:
            self._exit_codes[vm_id] = child.returncode
            del self._children[vm_id]
            child = None
        holder = _lock_holder(self.pid_path(vm_id))
        if holder is None and child is not None:
            # QEMU's files (and so its pidfile lock) close a moment before the kernel
            # reports its exit: wait that moment, so its exit status is not lost.
            try:
                child.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
            else:
                self._exit_codes[vm_id] = child.returncode
                del self._children[vm_id]
        return holder

    def _kill_pid(self, vm_id: UUID, pid: int) -> None:
        child = self._children.get(vm_id)
        if child is not None:
            child.kill()  # Popen.kill is safe against pid reuse
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    async def _wait_dead(self, vm_id: UUID, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self._live_pid(vm_id) is not None:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(POLL)
        return True

    async def _qmp(self, vm_id: UUID, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one QMP command on a fresh connection (QEMU serves one client at a time)."""
        client = QMPClient(f"ucloud-{vm_id}")
        try:
            async with asyncio.timeout(self.qmp_timeout):
                await client.connect(str(self.qmp_path(vm_id)))
            async with asyncio.timeout(self.qmp_timeout):
                return await client.execute(command, arguments)
        finally:
            # After "quit" QEMU closes the socket first; disconnect then raises EOFError.
            with contextlib.suppress(QMPError, EOFError, OSError):
                await client.disconnect()

    async def resize_disk(self, vm_id: UUID, size: int) -> None:
        """QMP ``block_resize`` of the VM's disk (the drive ``disk0``)."""
        if self._live_pid(vm_id) is None:
            raise VmNotRunning(f"VM {vm_id} is not running")
        try:
            await self._qmp(vm_id, "block_resize", {"device": "disk0", "size": size})
        except QMPError as error:
            raise DiskError(f"VM {vm_id}: growing its disk to {size} bytes failed: {error}") from error

    async def block_info(self, vm_id: UUID) -> Any:
        """QMP ``query-block``: the VM's drives as QEMU sees them."""
        return await self._qmp(vm_id, "query-block")

    async def _qmp_ok(self, vm_id: UUID, command: str) -> bool:
        try:
            await self._qmp(vm_id, command)
            return True
        except (QMPError, OSError, EOFError, TimeoutError) as error:
            log.debug("VM %s: QMP %s failed: %r", vm_id, command, error)
            return False

    def _final_status(self, vm_id: UUID) -> VmStatus:
        run_dir = self.run_dir(vm_id)
        exit_file = run_dir / EXIT_FILE
        try:
            return msgspec.json.decode(exit_file.read_bytes(), type=VmStatus)
        except FileNotFoundError:
            pass
        except msgspec.DecodeError:
            log.warning("VM %s: %s is unreadable; recomputing", vm_id, exit_file)
        exit_code = self._exit_codes.get(vm_id)
        state, reason, detail = _exit_from_files(run_dir, exit_code)
        status = VmStatus(
            vm_id=vm_id, state=state, exit_reason=reason, detail=detail, exit_code=exit_code
        )
        self._write(exit_file, msgspec.json.encode(status))
        return status

    def _finish(self, vm_id: UUID, detail: str) -> VmStatus:
        status = VmStatus(
            vm_id=vm_id,
            state=VmState.STOPPED,
            exit_reason=ExitReason.STOPPED_BY_HOST,
            detail=detail,
            exit_code=self._exit_codes.get(vm_id),
        )
        self._write(self.run_dir(vm_id) / EXIT_FILE, msgspec.json.encode(status))
        return status

    # -- lifecycle ---------------------------------------------------------------

    async def start(self, spec: VmSpec) -> VmHandle:
        vm_id = spec.vm_id
        # Fails early (InvalidSpec) on socket paths too long, before touching anything.
        build_argv(spec, self.run_dir(vm_id), "tcg", self.qemu_binary)
        async with self._host_lock(vm_id):
            record = self._record(vm_id)
            pid = self._live_pid(vm_id)
            if pid is not None:
                if record is not None and record.spec == spec:
                    return VmHandle(
                        vm_id=vm_id,
                        pid=pid,
                        run_dir=str(self.run_dir(vm_id)),
                        accel=record.accel,
                        started=False,
                    )
                raise VmAlreadyRunning(
                    f"VM {spec.name} ({vm_id}) already runs here (pid {pid}) with a "
                    "different spec; stop it first"
                )
            self._check_inputs(spec)
            accel = await self.accelerator()
            run_dir = self._prepare_run_dir(vm_id)
            argv = build_argv(spec, run_dir, accel, self.qemu_binary)
            record = RunRecord(spec=spec, argv=argv, accel=accel, started_at=time.time(),
                               nic_slots={nic.tap: slot for slot, nic in enumerate(spec.interfaces)})
            self._write(run_dir / VM_FILE, msgspec.json.encode(record))
            with (run_dir / QEMU_LOG).open("ab") as qemu_log:
                try:
                    # Not asyncio's subprocess: its transport kills the child when the
                    # loop closes, and QEMU must outlive the agent.
                    child = subprocess.Popen(  # noqa: ASYNC220
                        argv,
                        cwd=run_dir,
                        stdin=subprocess.DEVNULL,
                        stdout=qemu_log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,  # no SIGHUP/SIGINT from the agent's terminal
                        close_fds=True,
                    )
                except OSError as error:
                    raise VmStartError(
                        f"VM {spec.name} ({vm_id}): cannot run {self.qemu_binary}: {error}"
                    ) from error
            self._children[vm_id] = child
            self._exit_codes.pop(vm_id, None)
            await self._wait_started(spec, child)
            record.pid = child.pid
            self._write(run_dir / VM_FILE, msgspec.json.encode(record))
            return VmHandle(vm_id=vm_id, pid=child.pid, run_dir=str(run_dir), accel=accel)

    def _check_inputs(self, spec: VmSpec) -> None:
        for what, value in (
            ("disk", spec.disk_path),
            ("kernel", spec.kernel),
            ("initrd", spec.initrd),
        ):
            if what == "disk" and value is not None and value.startswith("rbd:"):
                continue  # QEMU opens a Ceph RBD disk itself; a missing one fails its start
            if value is not None and not Path(value).is_file():
                raise VmStartError(f"VM {spec.name} ({spec.vm_id}): {what} {value} does not exist")
        for nic in spec.interfaces:
            if not Path("/sys/class/net", nic.tap).exists():
                raise VmStartError(
                    f"VM {spec.name} ({spec.vm_id}): tap {nic.tap} does not exist; "
                    "the network driver must create it before the VM starts"
                )

    def _prepare_run_dir(self, vm_id: UUID) -> Path:
        run_dir = self.run_dir(vm_id)
        # Keep the previous run's logs one generation back; clear its state.
        for name in (SERIAL_LOG, QEMU_LOG, f"{EVENTS}.out", EXIT_FILE, STOP_FILE):
            path = run_dir / name
            if path.exists():
                os.replace(path, run_dir / f"{name}.1")
        for name in (QMP_SOCKET, CONSOLE_SOCKET, VNC_SOCKET, f"{EVENTS}.in"):
            (run_dir / name).unlink(missing_ok=True)
        # The event monitor reads its capability negotiation from events.in and
        # writes greeting, reply and every event to events.out.
        (run_dir / f"{EVENTS}.in").write_text('{"execute": "qmp_capabilities"}\n')
        (run_dir / f"{EVENTS}.out").write_bytes(b"")
        return run_dir

    async def _wait_started(self, spec: VmSpec, child: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + self.start_timeout
        run_dir = self.run_dir(spec.vm_id)
        while True:
            if child.poll() is not None:
                self._children.pop(spec.vm_id, None)
                self._exit_codes[spec.vm_id] = child.returncode
                raise VmStartError(
                    f"VM {spec.name} ({spec.vm_id}): QEMU exited with status "
                    f"{child.returncode} while starting: {_tail(run_dir / QEMU_LOG)}"
                )
            if self.qmp_path(spec.vm_id).exists() and await self._qmp_ok(
                spec.vm_id, "query-status"
            ):
                return
            if time.monotonic() >= deadline:
                child.kill()
                child.wait()
                self._children.pop(spec.vm_id, None)
                raise VmStartError(
                    f"VM {spec.name} ({spec.vm_id}): QEMU did not answer QMP within "
                    f"{self.start_timeout:.0f}s; killed it. {_tail(run_dir / QEMU_LOG)}"
                )
            await asyncio.sleep(POLL)

    # -- NICs of a running VM (hot-plug through QMP) ----------------------------------

    async def interfaces(self, vm_id: UUID) -> tuple[NetworkInterface, ...]:
        record = self._record(vm_id)
        return record.spec.interfaces if record is not None else ()

    async def attach_interface(self, vm_id: UUID, nic: NetworkInterface) -> None:
        async with self._host_lock(vm_id):
            record = self._record(vm_id)
            if record is None or self._live_pid(vm_id) is None:
                raise VmNotRunning(f"VM {vm_id} is not running: cannot plug {nic.tap}")
            if any(n.tap == nic.tap for n in record.spec.interfaces):
                return
            if not Path("/sys/class/net", nic.tap).exists():
                raise HypervisorError(f"VM {vm_id}: tap {nic.tap} does not exist")
            used = set(record.nic_slots.values())
            slot = next((i for i in range(NIC_SLOTS) if i not in used), None)
            if slot is None:
                raise HypervisorError(f"VM {vm_id}: all {NIC_SLOTS} NIC slots are in use")
            try:
                await self._qmp(vm_id, "netdev_add", {"type": "tap", "id": netdev_id(nic.tap), "ifname": nic.tap,
                                                      "script": "no", "downscript": "no"})
            except QMPError as error:
                if "Duplicate" not in str(error) and "already" not in str(error):
                    raise HypervisorError(f"VM {vm_id}: netdev_add {nic.tap}: {error}") from error
            try:
                await self._qmp(vm_id, "device_add", {"driver": "virtio-net-pci", "id": nic_id(nic.tap),
                                                      "netdev": netdev_id(nic.tap), "mac": nic.mac,
                                                      "bus": nic_port(slot)})
            except QMPError as error:
                with contextlib.suppress(QMPError, OSError, EOFError, TimeoutError):
                    await self._qmp(vm_id, "netdev_del", {"id": netdev_id(nic.tap)})
                raise HypervisorError(f"VM {vm_id}: device_add {nic.tap}: {error}") from error
            record.spec = msgspec.structs.replace(record.spec, interfaces=(*record.spec.interfaces, nic))
            record.nic_slots = {**record.nic_slots, nic.tap: slot}
            self._write(self.run_dir(vm_id) / VM_FILE, msgspec.json.encode(record))

    async def detach_interface(self, vm_id: UUID, tap: str, timeout: float = 60.0) -> None:
        """Unplug a NIC: the guest acknowledges a PCIe unplug (Linux waits 5 s for a
        cancel first); then its backend goes. HypervisorError if the guest never lets go."""
        async with self._host_lock(vm_id):
            record = self._record(vm_id)
            if record is None or not any(n.tap == tap for n in record.spec.interfaces):
                return
            if self._live_pid(vm_id) is not None:
                try:
                    await self._qmp(vm_id, "device_del", {"id": nic_id(tap)})
                except QMPError as error:
                    if "not found" not in str(error).lower():
                        log.info("VM %s: device_del %s: %s (waiting for it anyway)", vm_id, tap, error)
                deadline = time.monotonic() + timeout
                while not any(e.get("event") == "DEVICE_DELETED" and e.get("data", {}).get("device") == nic_id(tap)
                              for e in read_events(self.run_dir(vm_id))):
                    if time.monotonic() > deadline:
                        raise HypervisorError(f"VM {vm_id}: the guest did not release NIC {tap} within {timeout:g}s")
                    await asyncio.sleep(POLL)
                with contextlib.suppress(QMPError):
                    await self._qmp(vm_id, "netdev_del", {"id": netdev_id(tap)})
            record.spec = msgspec.structs.replace(
                record.spec, interfaces=tuple(n for n in record.spec.interfaces if n.tap != tap))
            record.nic_slots = {t: s for t, s in record.nic_slots.items() if t != tap}
            self._write(self.run_dir(vm_id) / VM_FILE, msgspec.json.encode(record))

    async def stop(self, vm_id: UUID, timeout: float = 30.0) -> VmStatus:
        if timeout < 0:
            raise InvalidSpec(f"stop timeout must not be negative, got {timeout}")
        if self._record(vm_id) is None:
            return await self._status_unlocked(vm_id)
        async with self._host_lock(vm_id):
            if self._live_pid(vm_id) is None:
                return await self._status_unlocked(vm_id)
            self._write(
                self.run_dir(vm_id) / STOP_FILE,
                msgspec.json.encode(StopIntent(mode="graceful", at=time.time())),
            )
            began = time.monotonic()
            deadline = began + timeout
            next_press = began
            while time.monotonic() < deadline:
                if time.monotonic() >= next_press:
                    await self._qmp_ok(vm_id, "system_powerdown")
                    next_press = time.monotonic() + POWERDOWN_REPEAT
                if self._live_pid(vm_id) is None:
                    took = time.monotonic() - began
                    return self._finish(
                        vm_id, f"the guest powered off {took:.1f}s after the ACPI power button"
                    )
                await asyncio.sleep(POLL)
            # The guest ignored the power button: quit QEMU (flushes its caches), then kill.
            await self._qmp_ok(vm_id, "quit")
            if not await self._wait_dead(vm_id, 5.0):
                pid = self._live_pid(vm_id)
                if pid is not None:
                    self._kill_pid(vm_id, pid)
                if not await self._wait_dead(vm_id, 10.0):
                    raise HypervisorError(f"VM {vm_id}: QEMU survived SIGKILL")
            return self._finish(vm_id, f"forced: the guest did not power off within {timeout:.0f}s")

    async def kill(self, vm_id: UUID) -> VmStatus:
        if self._record(vm_id) is None:
            return await self._status_unlocked(vm_id)
        async with self._host_lock(vm_id):
            pid = self._live_pid(vm_id)
            if pid is None:
                return await self._status_unlocked(vm_id)
            self._write(
                self.run_dir(vm_id) / STOP_FILE,
                msgspec.json.encode(StopIntent(mode="kill", at=time.time())),
            )
            self._kill_pid(vm_id, pid)
            if not await self._wait_dead(vm_id, 10.0):
                raise HypervisorError(f"VM {vm_id}: QEMU (pid {pid}) survived SIGKILL")
            return self._finish(vm_id, "killed by the host (SIGKILL)")

    async def reboot(self, vm_id: UUID) -> None:
        async with self._lock(vm_id):
            if self._live_pid(vm_id) is None:
                raise VmNotRunning(f"VM {vm_id} is not running here; cannot reboot it")
            try:
                await self._qmp(vm_id, "system_reset")
            except (QMPError, OSError, EOFError, TimeoutError) as error:
                raise HypervisorError(f"VM {vm_id}: system_reset failed: {error!r}") from error

    async def status(self, vm_id: UUID) -> VmStatus:
        # No lock: observing must not wait behind a stop that takes its timeout.
        return await self._status_unlocked(vm_id)

    async def _status_unlocked(self, vm_id: UUID) -> VmStatus:
        if self._record(vm_id) is None:
            return VmStatus(vm_id=vm_id, state=VmState.ABSENT, detail="no record on this host")
        pid = self._live_pid(vm_id)
        if pid is None:
            return self._final_status(vm_id)
        try:
            answer = await self._qmp(vm_id, "query-status")
        except (QMPError, OSError, EOFError, TimeoutError) as error:
            if self._live_pid(vm_id) is None:  # it died while we asked
                return self._final_status(vm_id)
            return VmStatus(
                vm_id=vm_id,
                state=VmState.UNRESPONSIVE,
                pid=pid,
                detail=f"QMP does not answer: {error!r}",
            )
        qemu_status = str(answer.get("status", "unknown"))
        state = VmState.RUNNING if qemu_status == "running" else VmState.PAUSED
        return VmStatus(vm_id=vm_id, state=state, pid=pid, detail=qemu_status)

    async def wait_exit(self, vm_id: UUID, timeout: float | None = None) -> VmStatus:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._live_pid(vm_id) is not None:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"VM {vm_id} still runs after {timeout}s")
            await asyncio.sleep(POLL)
        return await self.status(vm_id)

    async def list_running(self) -> list[UUID]:
        """VMs whose QEMU process lives, found from the run directories.

        A VM whose QMP does not answer still counts: its process holds the VM id,
        and reporting it absent would invite a second copy.
        """
        running = []
        for vm_id in self._known():
            if self._live_pid(vm_id) is not None:
                running.append(vm_id)
        return running

    def _known(self) -> Iterator[UUID]:
        if not self.run_root.is_dir():
            return
        for entry in sorted(self.run_root.iterdir()):
            try:
                vm_id = UUID(entry.name)
            except ValueError:
                continue
            if (entry / VM_FILE).exists():
                yield vm_id

    async def remove(self, vm_id: UUID) -> None:
        async with self._lock(vm_id):
            if self._live_pid(vm_id) is not None:
                raise VmAlreadyRunning(f"VM {vm_id} still runs; stop it before removing it")
            self._children.pop(vm_id, None)
            self._exit_codes.pop(vm_id, None)
            shutil.rmtree(self.run_dir(vm_id), ignore_errors=True)

    # -- disks -------------------------------------------------------------------

    async def create_disk(
        self, image: Path, target: Path, size: int | None = None, *, linked: bool = True
    ) -> Path:
        """A qcow2 overlay backed by image (linked=True) or a full qcow2 copy."""
        image, target = Path(image), Path(target)
        for what, path in (("image", image), ("target", target)):
            if not path.is_absolute():
                raise DiskError(f"{what} path must be absolute: {str(path)!r}")
        if not image.is_file():
            raise DiskError(f"image {image} does not exist")
        if target.exists():
            raise DiskError(f"disk {target} already exists; refusing to overwrite it")
        if size is not None and size <= 0:
            raise DiskError(f"disk size must be positive, got {size}")
        info = json.loads(
            await _qemu_img(
                "info", "--output=json", "--force-share", str(image), what="reading image"
            )
        )
        image_format, virtual_size = info["format"], int(info["virtual-size"])
        if size is not None and size < virtual_size:
            raise DiskError(
                f"disk size {size} is smaller than image {image.name} ({virtual_size} bytes)"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        if linked:
            argv = [
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                image_format,
                "-b",
                str(image),
                str(target),
            ]
            if size is not None:
                argv.append(str(size))
            await _qemu_img(*argv, what=f"creating overlay {target}")
        else:
            await _qemu_img(
                "convert", "-q", "-f", image_format, "-O", "qcow2", str(image), str(target),
                what=f"copying {image} to {target}",
            )  # fmt: skip
            if size is not None and size > virtual_size:
                await _qemu_img("resize", "-q", str(target), str(size), what=f"resizing {target}")
        return target

    async def delete_disk(self, path: Path) -> None:
        """Delete a VM disk; deleting a missing disk is a no-op (idempotent)."""
        path = Path(path)
        if not path.is_absolute():
            raise DiskError(f"disk path must be absolute: {str(path)!r}")
        for vm_id in await self.list_running():
            record = self._record(vm_id)
            if record and record.spec.disk_path and Path(record.spec.disk_path) == path:
                raise DiskError(f"disk {path} is in use by running VM {vm_id}")
        path.unlink(missing_ok=True)


async def _qemu_img(*args: str, what: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "qemu-img", *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise DiskError(
            f"{what}: qemu-img {args[0]} failed: {err.decode(errors='replace').strip()}"
        )
    return out.decode()
