"""Domain errors: the gateway maps them to HTTP problems (422, 404, 400)."""

from __future__ import annotations


class DomainError(Exception):
    """Base of every error the domain raises."""


class Rejected(DomainError):
    """The command is well-formed but not allowed in the aggregate's current state."""


class NotFound(DomainError):
    """The aggregate does not exist (or is not visible to the actor)."""


class InvalidValue(DomainError):
    """A value the user wrote is malformed; the message names the field."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")
