"""The event store's error hierarchy. No raw grpc or sqlite exception reaches a caller.

    EventStoreError
    ├── ConflictError          an optimistic-concurrency check failed; nothing was written
    │   ├── StreamConflict     a stream was not at the version the append expected
    │   └── TrackingConflict   a consumer's position is not behind the one it tries to record
    ├── UnavailableError       the backend could not be reached or timed out (operational)
    ├── AccessDenied           the backend refused our credential for this (configuration)
    └── DataError              bad input or data that cannot be stored or decoded
        └── InvalidAppend      an append request that is malformed (empty, bad stream name)
"""

from __future__ import annotations


class EventStoreError(Exception):
    """Base of every error the event store raises."""


class ConflictError(EventStoreError):
    """An optimistic-concurrency check failed. Nothing of the request was written."""


class StreamConflict(ConflictError):
    def __init__(self, stream: str, expected: int, actual: int | None = None) -> None:
        self.stream = stream
        self.expected = expected
        self.actual = actual
        found = "" if actual is None else f", it is at version {actual}"
        super().__init__(f"stream {stream!r} is not at version {expected}{found}")


class TrackingConflict(ConflictError):
    def __init__(self, consumer: str, position: int, recorded: int) -> None:
        self.consumer = consumer
        self.position = position
        self.recorded = recorded
        super().__init__(
            f"consumer {consumer!r} already recorded position {recorded}; "
            f"position {position} is stale"
        )


class UnavailableError(EventStoreError):
    """The backend is unreachable or did not answer in time.

    For an append this is ambiguous: the events may or may not have been written.
    Appends carry event ids, so a retry of the same request is recognised and not
    written twice (see GroupCommitter)."""


class DataError(EventStoreError):
    """Input or stored data is invalid: undecodable, too large, or malformed."""


class InvalidAppend(DataError):
    """An append request is malformed; the message names what is wrong."""


class AccessDenied(EventStoreError):
    """The backend refused this client: wrong credential, or a role without the right to
    this key. Not transient: retrying does not help; the configuration must change."""
