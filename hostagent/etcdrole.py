"""The etcd role of one host agent that writes through the gateway (docs/operations.md,
"Host credentials"): it reads the log, and writes only its own heartbeat lease key and
its own snapshots. Nothing under the log's prefix that others read as truth (events,
stream index, head, slices, tracking, other snapshots, other leases) and nothing under
the secret prefix.

What the agent writes to etcd itself, and why each is safe to leave to the host:
- ``<prefix>/leases/host-<id>``: its heartbeat (the failure detector reads it); a host can
  only keep itself alive or let itself die;
- ``<prefix>/snapshots/projection-hostagent-<id>`` (and ``...-networks``) and their chunks
  under ``<prefix>/snapshot-chunks/``: its own views of its slice, read by nobody else.
"""

from __future__ import annotations

from uuid import UUID

from ucloud.domain.host import host_id_for, slice_name


def host_role_grants(role: str, hostname: str, prefix: str = "/v1") -> list[list[str]]:
    """The ``etcdctl`` arguments that make ``role`` the etcd role of host ``hostname``'s
    agent on a log under ``prefix`` (one list per command, ``role add`` first)."""
    host_id: UUID = host_id_for(hostname)
    base = prefix.rstrip("/")
    return [
        ["role", "add", role],
        ["role", "grant-permission", role, "read", f"{base}/", "--prefix=true"],
        ["role", "grant-permission", role, "readwrite", f"{base}/leases/{slice_name(host_id)}"],
        ["role", "grant-permission", role, "readwrite", f"{base}/snapshots/projection-hostagent-{host_id}",
         "--prefix=true"],
        ["role", "grant-permission", role, "readwrite", f"{base}/snapshot-chunks/projection-hostagent-{host_id}",
         "--prefix=true"],
    ]
