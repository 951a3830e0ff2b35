"""The base of every event and command, and the codec that turns them into log records.

An event is a frozen msgspec Struct tagged with its stable name (``vm.requested``);
the tag is its name in the log forever. A new optional field gets a default; a
changed meaning gets a new ``schema`` number and an upcaster from the old one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import msgspec


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", gc=False):
    """Base of every fact in the log. The tag is the event's name forever.

    gc=False (inherited): events hold atoms and tuples of strings only, so they cannot
    be part of a reference cycle; replaying a million of them then costs the cyclic
    garbage collector nothing."""

    schema: ClassVar[int] = 1


class Command(msgspec.Struct, frozen=True, kw_only=True, tag_field="command"):
    """Base of every intent. Commands are never stored; their events are."""


def tag_of(event_type: type[Event]) -> str:
    tag = event_type.__struct_config__.tag
    if not isinstance(tag, str):
        raise TypeError(f"{event_type.__name__} has no string tag")
    return tag


Upcaster = Callable[[dict[str, Any]], dict[str, Any]]


class EventCodec:
    """Encodes events to JSON bytes and decodes them back, upcasting old schemas.

    Built once per set of event types; decoding uses one typed decoder per type.
    """

    def __init__(self, event_types: Iterable[type[Event]]) -> None:
        self._types: dict[str, type[Event]] = {}
        for event_type in event_types:
            tag = tag_of(event_type)
            if tag in self._types:
                raise ValueError(f"two event types share the tag {tag!r}")
            self._types[tag] = event_type
        self._decoders = {tag: msgspec.json.Decoder(t) for tag, t in self._types.items()}
        self._upcasters: dict[tuple[str, int], Upcaster] = {}
        self._encoder = msgspec.json.Encoder()

    def register_upcaster(self, tag: str, from_schema: int, upcaster: Upcaster) -> None:
        """``upcaster`` turns the JSON object of schema ``from_schema`` into ``from_schema + 1``."""
        self._upcasters[(tag, from_schema)] = upcaster

    def upcasts(self, tag: str, from_schema: int) -> bool:
        """Whether events of ``tag`` recorded with ``from_schema`` are upcast."""
        return (tag, from_schema) in self._upcasters

    @property
    def tags(self) -> frozenset[str]:
        return frozenset(self._types)

    def knows(self, tag: str) -> bool:
        return tag in self._types

    def encode(self, event: Event) -> tuple[str, int, bytes]:
        """(type tag, schema, JSON bytes) of an event."""
        return tag_of(type(event)), type(event).schema, self._encoder.encode(event)

    def fast_decoder(self, tag: str) -> tuple[int, Callable[[bytes], Event]] | None:
        """(current schema, decode function) of a known type, for hot loops that check
        the schema themselves and fall back to decode() for older ones."""
        event_type = self._types.get(tag)
        if event_type is None:
            return None
        return event_type.schema, self._decoders[tag].decode

    def decode(self, tag: str, schema: int, data: bytes) -> Event:
        event_type = self._types.get(tag)
        if event_type is None:
            raise KeyError(f"unknown event type {tag!r}")
        if schema == event_type.schema:
            return self._decoders[tag].decode(data)
        if schema > event_type.schema:
            raise ValueError(f"event {tag!r} has schema {schema}, newer than this code ({event_type.schema})")
        raw: dict[str, Any] = msgspec.json.decode(data)
        for version in range(schema, event_type.schema):
            upcaster = self._upcasters.get((tag, version))
            if upcaster is None:
                raise ValueError(f"no upcaster for {tag!r} from schema {version}")
            raw = upcaster(raw)
        return msgspec.convert(raw, event_type)
