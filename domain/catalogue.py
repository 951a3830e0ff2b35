"""Every event type ucloud records, in one place: the codec is built from this list."""

from __future__ import annotations

from .events import Event, EventCodec
from .host import HOST_EVENT_TYPES
from .sshkey import SSHKEY_EVENT_TYPES
from .vm import VM_EVENT_TYPES

ALL_EVENT_TYPES: tuple[type[Event], ...] = (*VM_EVENT_TYPES, *HOST_EVENT_TYPES, *SSHKEY_EVENT_TYPES)


def build_codec() -> EventCodec:
    return EventCodec(ALL_EVENT_TYPES)
