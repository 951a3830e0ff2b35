"""A real etcd with TLS (server certificate, client certificates) and authentication,
set up the way docs/operations.md tells an operator to: a throwaway CA made with
openssl, users and roles made with etcdctl, then ``auth enable``."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.etcd import ETCD, ETCDCTL, free_port

SECRET_PREFIX = "/ucloud-secrets/"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(directory: Path) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", "ca-key.pem", "-out", "ca.pem", "-days", "2", "-subj", "/CN=ucloud-test-ca", cwd=directory)


def make_certificate(directory: Path, name: str, common_name: str, *, server: bool = False) -> tuple[Path, Path]:
    """A key and a certificate signed by the CA in ``directory``; servers get 127.0.0.1 and
    localhost as subject alternative names."""
    extensions = directory / f"{name}.ext"
    usage = "serverAuth,clientAuth" if server else "clientAuth"
    lines = [f"extendedKeyUsage={usage}"]
    if server:
        lines.append("subjectAltName=IP:127.0.0.1,DNS:localhost")
    extensions.write_text("\n".join(lines) + "\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}-key.pem", "-out", f"{name}.csr", "-subj", f"/CN={common_name}", cwd=directory)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", extensions.name, cwd=directory)
    return directory / f"{name}.pem", directory / f"{name}-key.pem"


@dataclass
class SecureEtcd:
    directory: Path
    endpoint: str
    process: subprocess.Popen[bytes]

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    def etcdctl(self, *args: str) -> str:
        """etcdctl as root, authenticated by root's client certificate."""
        result = subprocess.run(
            [ETCDCTL, "--endpoints", f"https://{self.endpoint}", "--cacert", str(self.ca),
             "--cert", str(self.directory / "root.pem"), "--key", str(self.directory / "root-key.pem"), *args],
            capture_output=True, text=True, env={**os.environ, "ETCDCTL_API": "3"}, timeout=30)
        if result.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)}: {result.stderr}")
        return result.stdout

    def password_file(self, user: str, password: str) -> Path:
        path = self.directory / f"{user}.password"
        path.write_text(password + "\n")
        path.chmod(0o600)
        return path


@contextmanager
def secure_etcd(*, token_ttl: int = 300) -> Iterator[SecureEtcd]:
    """etcd on a free loopback port with TLS, client certificate verification and
    authentication enabled. Every client presents a certificate of this CA (etcd's
    --client-cert-auth refuses the TLS handshake otherwise); a request is then the user
    its password token names or, without a token, the user its certificate's CN names.
    Users: root (certificate CN=root), ``control`` (password; read-write on /v1/ and the
    secret prefix, as a gateway), ``reader`` (password; read-only on /v1/), ``host-a``
    (certificate CN=host-a; read-only on /v1/). ``client.pem`` (CN=no-such-user) is a
    certificate that names nobody."""
    directory = Path(tempfile.mkdtemp(prefix="ucloud-etcd-tls-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    make_ca(directory)
    make_certificate(directory, "server", "localhost", server=True)
    make_certificate(directory, "root", "root")
    make_certificate(directory, "host-a", "host-a")
    make_certificate(directory, "client", "no-such-user")  # TLS only: its name has no rights
    client, peer = free_port(), free_port()
    log = open(directory / "etcd.log", "ab")
    process = subprocess.Popen([
        ETCD, "--name", "secure", "--data-dir", str(directory / "data"),
        "--listen-client-urls", f"https://127.0.0.1:{client}",
        "--advertise-client-urls", f"https://127.0.0.1:{client}",
        "--listen-peer-urls", f"http://127.0.0.1:{peer}",
        "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
        "--initial-cluster", f"secure=http://127.0.0.1:{peer}",
        "--cert-file", str(directory / "server.pem"), "--key-file", str(directory / "server-key.pem"),
        "--trusted-ca-file", str(directory / "ca.pem"), "--client-cert-auth",
        "--auth-token-ttl", str(token_ttl),
        "--logger", "zap", "--log-level", "error",
    ], stdout=log, stderr=log, start_new_session=True)
    log.close()
    etcd = SecureEtcd(directory, f"127.0.0.1:{client}", process)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                etcd.etcdctl("endpoint", "health")
                break
            except RuntimeError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((directory / "etcd.log").read_text()[-2000:]) from None
                time.sleep(0.1)
        # The setup docs/operations.md gives, with the names of this test.
        etcd.etcdctl("user", "add", "root", "--new-user-password", "root-not-used")
        etcd.etcdctl("role", "add", "ucloud-control")
        etcd.etcdctl("role", "grant-permission", "ucloud-control", "readwrite", "/v1/", "--prefix=true")
        etcd.etcdctl("role", "grant-permission", "ucloud-control", "readwrite", SECRET_PREFIX, "--prefix=true")
        etcd.etcdctl("role", "add", "ucloud-reader")
        etcd.etcdctl("role", "grant-permission", "ucloud-reader", "read", "/v1/", "--prefix=true")
        etcd.etcdctl("user", "add", "control", "--new-user-password", "control-password")
        etcd.etcdctl("user", "grant-role", "control", "ucloud-control")
        etcd.etcdctl("user", "add", "reader", "--new-user-password", "reader-password")
        etcd.etcdctl("user", "grant-role", "reader", "ucloud-reader")
        etcd.etcdctl("user", "add", "host-a", "--no-password")
        etcd.etcdctl("user", "grant-role", "host-a", "ucloud-reader")
        etcd.etcdctl("auth", "enable")
        yield etcd
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        shutil.rmtree(directory, ignore_errors=True)
