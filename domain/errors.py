"""Domain errors: the gateway maps them to HTTP problems (422, 404, 400)."""

from __future__ import annotations


class DomainError(Exception):
    """Base of every error the domain raises."""


class Rejected(DomainError):
    """The command is well-formed but not allowed: by the aggregate's current state, or
    because a value, once read, is beyond what this installation accepts (then ``field``
    names it)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        self.field = field
        super().__init__(message)


class NotFound(DomainError):
    """The aggregate does not exist (or is not visible to the actor)."""


class InvalidValue(DomainError):
    """A value the user wrote is malformed; the message names the field."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


class OutOfBounds(Rejected):
    """A value is well-formed but not acceptable here (over a limit, not a whole number
    of bytes, below a minimum): 422 naming the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}", field)


class Forbidden(DomainError):
    """The caller may not do this to this aggregate: a host reporting about a VM that is
    not placed on it (403; the message names the VM and where it is placed)."""
