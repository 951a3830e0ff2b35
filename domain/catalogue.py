"""Every event type ucloud records, in one place: the codec is built from this list."""

from __future__ import annotations

from .account import ACCOUNT_EVENT_TYPES
from .events import Event, EventCodec
from .file import FILE_EVENT_TYPES
from .host import HOST_EVENT_TYPES
from .image import IMAGE_EVENT_TYPES
from .invoice import INVOICE_EVENT_TYPES
from .network import IPAM_EVENT_TYPES, NETWORK_EVENT_TYPES
from .operators import OPERATOR_EVENT_TYPES
from .order import ORDER_EVENT_TYPES
from .pricing import PRICING_EVENT_TYPES
from .sshkey import SSHKEY_EVENT_TYPES
from .vm import VM_EVENT_TYPES

ALL_EVENT_TYPES: tuple[type[Event], ...] = (*VM_EVENT_TYPES, *HOST_EVENT_TYPES, *SSHKEY_EVENT_TYPES,
                                            *OPERATOR_EVENT_TYPES, *PRICING_EVENT_TYPES, *ACCOUNT_EVENT_TYPES,
                                            *INVOICE_EVENT_TYPES, *ORDER_EVENT_TYPES,
                                            *NETWORK_EVENT_TYPES, *IPAM_EVENT_TYPES, *FILE_EVENT_TYPES,
                                            *IMAGE_EVENT_TYPES)


def build_codec() -> EventCodec:
    return EventCodec(ALL_EVENT_TYPES)


def markdown() -> str:
    """The event catalogue as Markdown: docs/events.md is this text, checked by a test."""
    import msgspec

    lines = [
        "# Event catalogue",
        "",
        "Every event type ucloud records, generated from the code by",
        "`python -m ucloud.domain.catalogue > docs/events.md` (a test fails when this file is stale).",
        "",
        "Every event travels in an envelope the store adds (see docs/architecture.md): `id`, `type`,",
        "`stream`, `version`, `position`, `time`, `actor`, `causation_id`, `correlation_id`, `schema`.",
        "Sizes are bytes; ids are UUIDs. A field with a default was added after the type was first",
        "recorded; old events decode with that default.",
        "",
    ]
    for event_type in ALL_EVENT_TYPES:
        info = msgspec.inspect.type_info(event_type)
        assert isinstance(info, msgspec.inspect.StructType)
        tag = event_type.__struct_config__.tag
        doc = (event_type.__doc__ or "").strip().splitlines()
        lines += [f"## `{tag}` (schema {event_type.schema})", ""]
        if doc and not doc[0].startswith(event_type.__name__ + "("):
            lines += [doc[0], ""]
        lines += ["| field | type | default |", "|---|---|---|"]
        for field in info.fields:
            default = "" if field.required else _default(field)
            lines.append(f"| `{field.name}` | {_type_name(field.type)} | {default} |")
        lines.append("")
    return "\n".join(lines)


def _default(field: object) -> str:
    import enum

    import msgspec

    value = field.default if field.default is not msgspec.NODEFAULT else field.default_factory()  # type: ignore[attr-defined]
    if isinstance(value, enum.Enum):
        value = value.value
    return f"`{value!r}`" if not isinstance(value, tuple) else f"`{list(value)!r}`"


def _type_name(info: object) -> str:
    import msgspec

    match info:
        case msgspec.inspect.UUIDType():
            return "uuid"
        case msgspec.inspect.StrType():
            return "string"
        case msgspec.inspect.IntType():
            return "integer"
        case msgspec.inspect.BoolType():
            return "boolean"
        case msgspec.inspect.EnumType():
            return "one of " + ", ".join(f"`{m.value}`" for m in info.cls)
        case msgspec.inspect.UnionType():
            return " or ".join(_type_name(t) for t in info.types)
        case msgspec.inspect.NoneType():
            return "null"
        case msgspec.inspect.DateTimeType():
            return "time (RFC 3339, UTC)"
        case msgspec.inspect.StructType():
            return f"`{info.cls.__name__}` ({', '.join(f.name for f in info.fields)})"
        case msgspec.inspect.VarTupleType() | msgspec.inspect.ListType():
            return f"list of {_type_name(info.item_type)}"
    return type(info).__name__


if __name__ == "__main__":
    print(markdown())
