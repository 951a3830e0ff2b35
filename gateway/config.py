"""The gateway's configuration, and opening the event store it names."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from ucloud.eventstore.interface import EventStore

from .identity import Authenticator


@dataclasses.dataclass
class GatewayConfig:
    """Everything a gateway needs; tests and production build it the same way.

    ``store`` is an already open event store that the caller owns (and closes); when it
    is None the gateway opens ``store_url`` itself and closes it on shutdown.
    """

    store_url: str = "sqlite:///var/lib/ucloud/events.sqlite"
    store: EventStore | None = None
    # The first address must bind; the others are tried and skipped with a warning
    # when the machine lacks them (no IPv4 loopback, say).
    listen: tuple[str, ...] = ("::1", "127.0.0.1")
    port: int = 8080
    # An Authenticator object, "header" (trust X-Ucloud-User/-Realm: development only)
    # or "package.module:factory".
    authenticator: Authenticator | str = "header"
    read_timeout: float = 10.0  # how long a query waits for ?position before 503
    snapshot_interval: float = 30.0  # seconds between read-model snapshots
    projection_name: str = "read-models"  # gateways sharing a log share its snapshots
    max_body_size: int = 1024 * 1024

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535, got {self.port}")
        if not self.listen:
            raise ValueError("listen needs at least one address")
        if self.read_timeout <= 0:
            raise ValueError(f"read_timeout must be positive, got {self.read_timeout}")
        if self.snapshot_interval <= 0:
            raise ValueError(f"snapshot_interval must be positive, got {self.snapshot_interval}")


def open_store(url: str) -> EventStore:
    """An event store from a URL:

    * ``memory:`` -- in this process only, gone at exit;
    * ``sqlite:///abs/path.sqlite`` or ``sqlite:relative.sqlite``;
    * ``etcd://host:port[,host:port...][/prefix][?max_txn_ops=N]`` (prefix default /v1).
    """
    scheme, _, rest = url.partition(":")
    if scheme == "memory":
        from ucloud.eventstore.memory import MemoryEventStore

        return MemoryEventStore()
    if scheme == "sqlite":
        from ucloud.eventstore.sqlite import SqliteEventStore

        path = rest[2:] if rest.startswith("//") else rest
        if not path:
            raise ValueError(f"store URL {url!r} names no file: write sqlite:///path/to/events.sqlite")
        return SqliteEventStore(Path(path))
    if scheme == "etcd":
        from ucloud.eventstore.etcd import EtcdEventStore

        parts = urlsplit(url)
        endpoints = [e for e in parts.netloc.split(",") if e]
        if not endpoints:
            raise ValueError(f"store URL {url!r} names no etcd endpoint: write etcd://127.0.0.1:2379/v1")
        query = parse_qs(parts.query)
        unknown = set(query) - {"max_txn_ops"}
        if unknown:
            raise ValueError(f"store URL {url!r}: unknown option(s) {sorted(unknown)}")
        max_txn_ops = int(query.get("max_txn_ops", ["128"])[-1])
        return EtcdEventStore(endpoints, prefix=parts.path or "/v1", max_txn_ops=max_txn_ops)
    raise ValueError(f"store URL {url!r}: the scheme must be memory, sqlite or etcd")
