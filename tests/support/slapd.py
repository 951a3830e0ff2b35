"""A real OpenLDAP server for tests: Debian's slapd 2.5 on a free loopback port.

The server gets a throwaway slapd.conf (mdb backend, the stock core, cosine, nis and
inetorgperson schemas) and a data dir on tmpfs, runs in the foreground (``-d 0``) as
our child, and is killed at the end. Data is loaded with the real ``ldapadd``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SLAPD = shutil.which("slapd") or "/usr/sbin/slapd"
LDAPADD = shutil.which("ldapadd") or "/usr/bin/ldapadd"
SCHEMA_DIR = Path("/etc/ldap/schema")
MODULE_DIR = Path("/usr/lib/ldap")

BASE_DN = "dc=ucloud,dc=test"
ROOT_DN = f"cn=admin,{BASE_DN}"
ROOT_PW = "root-secret"
# The account the gateway binds as: it may read people and groups, nothing more.
SERVICE_DN = f"cn=gateway,ou=services,{BASE_DN}"
SERVICE_PW = "gateway-secret"
PEOPLE_DN = f"ou=people,{BASE_DN}"
GROUPS_DN = f"ou=groups,{BASE_DN}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tmp_root() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


SLAPD_CONF = """\
include {schema}/core.schema
include {schema}/cosine.schema
include {schema}/nis.schema
include {schema}/inetorgperson.schema

modulepath {modules}
moduleload back_mdb

pidfile {root}/slapd.pid
argsfile {root}/slapd.args

database mdb
maxsize 67108864
suffix "{base}"
rootdn "{rootdn}"
rootpw {rootpw}
directory {root}/data

access to attrs=userPassword
    by self write
    by anonymous auth
    by * none
access to *
    by users read
    by * none
"""


class Slapd:
    """One slapd on ``127.0.0.1:port``; ``restart()`` keeps the port and the data."""

    def __init__(self, port: int | None = None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="ucloud-slapd-", dir=_tmp_root()))
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.root / "slapd.log"
        (self.root / "data").mkdir()
        (self.root / "slapd.conf").write_text(SLAPD_CONF.format(
            schema=SCHEMA_DIR, modules=MODULE_DIR, root=self.root, base=BASE_DN, rootdn=ROOT_DN,
            rootpw=ROOT_PW,
        ))

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    def start(self) -> Slapd:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [SLAPD, "-f", str(self.root / "slapd.conf"), "-h", self.url, "-d", "0"],
            stdout=log, stderr=log, start_new_session=True,
        )
        log.close()
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"slapd exited: {self.log_path.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"slapd not listening on {self.port} after {timeout}s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def ldapadd(self, ldif: str) -> None:
        result = subprocess.run(
            [LDAPADD, "-x", "-H", self.url, "-D", ROOT_DN, "-w", ROOT_PW],
            input=ldif, capture_output=True, text=True, timeout=30,
        )
        if result.returncode != 0:
            raise RuntimeError(f"ldapadd failed ({result.returncode}): {result.stderr}")

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def base_ldif() -> str:
    """The tree every test server starts with: the suffix, people, groups, the service account."""
    return f"""\
dn: {BASE_DN}
objectClass: dcObject
objectClass: organization
dc: ucloud
o: ucloud test

dn: ou=people,{BASE_DN}
objectClass: organizationalUnit
ou: people

dn: ou=groups,{BASE_DN}
objectClass: organizationalUnit
ou: groups

dn: ou=services,{BASE_DN}
objectClass: organizationalUnit
ou: services

dn: {SERVICE_DN}
objectClass: organizationalRole
objectClass: simpleSecurityObject
cn: gateway
userPassword: {SERVICE_PW}
"""


def person_ldif(uid: str, cn: str, mail: str | None = None, employee_type: str | None = None) -> str:
    lines = [
        f"dn: uid={uid},{PEOPLE_DN}",
        "objectClass: inetOrgPerson",
        f"uid: {uid}",
        f"cn: {cn}",
        f"sn: {cn.split()[-1]}",
        f"displayName: {cn}",
    ]
    if mail:
        lines.append(f"mail: {mail}")
    if employee_type:
        lines.append(f"employeeType: {employee_type}")
    return "\n".join(lines) + "\n"


def group_ldif(cn: str, members: list[str]) -> str:
    lines = [f"dn: cn={cn},{GROUPS_DN}", "objectClass: groupOfNames", f"cn: {cn}"]
    lines += [f"member: uid={m},{PEOPLE_DN}" for m in members]
    return "\n".join(lines) + "\n"


@contextmanager
def slapd_server(ldif: str | None = None) -> Iterator[Slapd]:
    """A started slapd with the base tree and ``ldif`` loaded; removed on exit."""
    server = Slapd()
    try:
        server.start()
        server.ldapadd(base_ldif())
        if ldif:
            server.ldapadd(ldif)
        yield server
    finally:
        server.close()
