"""The gateway's configuration."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ucloud.commands.service import HOST_IMAGES
from ucloud.domain.limits import DEFAULT_LIMITS, GiB, Limits
from ucloud.eventstore.interface import EventStore

from .identity import Authenticator


@dataclasses.dataclass
class GatewayConfig:
    """Everything a gateway needs; tests and production build it the same way.

    ``store`` is an already open event store that the caller owns (and closes); when it
    is None the gateway opens ``store_url`` itself and closes it on shutdown.
    """

    store_url: str = "sqlite:///var/lib/ucloud/events.sqlite"  # see ucloud.eventstore.url
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
    # Bounds on sizes and counts a request may ask for (domain/limits.py); the OpenAPI
    # document states them.
    limits: Limits = DEFAULT_LIMITS
    # The longest request line (method, path and query) and header line aiohttp reads;
    # longer ones are answered 400 problem+json by gateway/lowlevel.py.
    max_line_size: int = 8190
    # Users' files (<files_root>/<user>/<name>): uploads land here, the file scanner and
    # the image scanner read here. None: uploads answer 501.
    files_root: Path | None = None
    max_file_size: int = 64 * GiB  # one upload
    file_quota: int = 256 * GiB  # all of one user's files together
    # The image stores images may be imported into (the first is the default).
    image_stores: tuple[str, ...] = ("local",)
    # Image names the hosts may provide themselves when the catalogue has none of the name
    # (commands/service.py, HOST_IMAGES); empty: catalogue images only.
    host_images: tuple[str, ...] = tuple(sorted(HOST_IMAGES))

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535, got {self.port}")
        if not self.listen:
            raise ValueError("listen needs at least one address")
        if self.read_timeout <= 0:
            raise ValueError(f"read_timeout must be positive, got {self.read_timeout}")
        if self.max_file_size <= 0 or self.file_quota <= 0:
            raise ValueError("max_file_size and file_quota must be positive")
        if not self.image_stores:
            raise ValueError("image_stores needs at least one store")
        if self.snapshot_interval <= 0:
            raise ValueError(f"snapshot_interval must be positive, got {self.snapshot_interval}")
