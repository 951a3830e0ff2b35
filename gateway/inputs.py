"""What a request carries is checked against what its route declares, before a handler
parses anything: path, query and header parameters against their schemas, and a body's
media type, size and UTF-8.

A parameter's schema comes from a msgspec type (``Param.of``), so the OpenAPI document
and this check read one declaration. The check itself is an explicit grammar per schema
keyword: a length cap first, then ``fullmatch`` of ASCII-only patterns, integers as
ASCII digits only (``int()`` and ``str.isdigit`` take Arabic-Indic digits too), UUIDs
in their one canonical text form; nothing here backtracks over user data.
"""

from __future__ import annotations

import codecs
import re
from functools import cache
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler

from ucloud.domain.errors import InvalidValue

from .problems import UnsupportedMediaType, shorten

JSON = "application/json"
_INTEGER = re.compile(r"-?[0-9]{1,20}", re.ASCII)
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}", re.ASCII)
_BOOLEANS = {"true": True, "false": False}


@cache
def _pattern(pattern: str) -> re.Pattern[str]:
    # Our patterns are anchored ECMA/Python-compatible texts: "^...$". fullmatch of the
    # inner part, because Python's "$" also matches before a final newline.
    if not (pattern.startswith("^") and pattern.endswith("$")):
        raise ValueError(f"a parameter pattern must be anchored with ^ and $: {pattern!r}")
    return re.compile(pattern[1:-1], re.ASCII)


def check_value(field: str, schema: dict[str, Any], raw: str) -> Any:
    """``raw`` read by ``schema`` (type string, integer or boolean; maxLength, pattern,
    format uuid, enum, minimum, maximum): the value, or InvalidValue naming ``field``."""
    kind = schema.get("type", "string")
    if kind == "integer":
        if len(raw) > 20 or not _INTEGER.fullmatch(raw):
            raise InvalidValue(field, f"{shorten(raw)!r} is not a whole number (ASCII digits)")
        value = int(raw)
        if "minimum" in schema and value < schema["minimum"]:
            raise InvalidValue(field, f"must be at least {schema['minimum']}, got {value}")
        if "maximum" in schema and value > schema["maximum"]:
            raise InvalidValue(field, f"must be at most {schema['maximum']}, got {value}")
        return value
    if kind == "boolean":
        if raw not in _BOOLEANS:
            raise InvalidValue(field, f"{shorten(raw)!r} is not a boolean (true or false)")
        return _BOOLEANS[raw]
    limit = schema.get("maxLength")
    if limit is not None and len(raw) > limit:
        raise InvalidValue(field, f"longer than {limit} characters")
    if len(raw) < schema.get("minLength", 0):
        raise InvalidValue(field, f"shorter than {schema['minLength']} characters")
    if "enum" in schema and raw not in schema["enum"]:
        raise InvalidValue(field, f"{shorten(raw)!r} is not one of {', '.join(map(str, schema['enum']))}")
    if schema.get("format") == "uuid" and not (len(raw) == 36 and _UUID.fullmatch(raw)):
        raise InvalidValue(field, f"{shorten(raw)!r} is not a UUID (like 6f1f1d2e-8d53-4c1e-9a0e-4b2f5bd0c002)")
    if "pattern" in schema and not _pattern(schema["pattern"]).fullmatch(raw):
        if "description" in schema:  # the rule in words, as the document states it
            raise InvalidValue(field, f"{shorten(raw)!r} is not {schema['description']}")
        raise InvalidValue(field, f"{shorten(raw)!r} does not match {schema['pattern']}")
    return raw


def text(max_length: int, pattern: str, example: str, rule: str | None = None, **extra: Any) -> msgspec.Meta:
    """A text field's declared limits for its msgspec type: a length (msgspec checks it while
    decoding), an anchored pattern (``check_patterns`` fullmatches it; ``extra`` adds other
    schema keywords), an example and the rule in words (the problem's detail when the
    pattern is not met)."""
    return msgspec.Meta(max_length=max_length, examples=[example], description=rule,
                        extra_json_schema={"pattern": pattern, **extra})


def schema_of(value_type: Any) -> dict[str, Any]:
    """The JSON schema of a parameter's msgspec type (a plain, reference-free type)."""
    schema = msgspec.json.schema(value_type)
    if "$ref" in schema or "$defs" in schema:
        raise TypeError(f"a parameter type must be plain, not {value_type!r}")
    return schema


# -- the body ---------------------------------------------------------------------------------------


_RULES: dict[type, tuple[tuple[str, dict[str, Any], bool], ...]] = {}


def body_rules(body_type: type) -> tuple[tuple[str, dict[str, Any], bool], ...]:
    """(field, string schema, is a list of them) for every field of a body Struct whose
    text has a declared pattern: what ``check_patterns`` holds a decoded body to. msgspec
    checks lengths, ranges and enums while it decodes, but its own pattern check is a
    ``search`` (so "x\\n" passes a "$"): patterns are checked here, with fullmatch."""
    if body_type in _RULES:
        return _RULES[body_type]
    schema = msgspec.json.schema(body_type)
    if "$ref" in schema:
        schema = schema["$defs"][schema["$ref"].rsplit("/", 1)[1]]
    rules = []
    for name, field in schema.get("properties", {}).items():
        for branch in field.get("anyOf", [field]):
            if branch.get("type") == "string" and "pattern" in branch:
                rules.append((name, branch, False))
            elif branch.get("type") == "array" and "pattern" in branch.get("items", {}):
                rules.append((name, branch["items"], True))
    _RULES[body_type] = tuple(rules)
    return _RULES[body_type]


def check_patterns(body: Any, prefix: str = "") -> None:
    """Every patterned text of a decoded body Struct, and of the Structs in its fields,
    fullmatches its pattern (InvalidValue naming the field -- ``field[i]`` in a list,
    ``outer.inner`` in a nested object -- otherwise)."""
    for name, schema, is_list in body_rules(type(body)):
        value = getattr(body, name)
        if is_list and isinstance(value, list | tuple):
            for index, item in enumerate(value):
                if isinstance(item, str):
                    check_value(f"{prefix}{name}[{index}]", schema, item)
        elif isinstance(value, str):
            check_value(f"{prefix}{name}", schema, value)
    for name in body.__struct_fields__:
        value = getattr(body, name)
        if isinstance(value, msgspec.Struct):
            check_patterns(value, f"{prefix}{name}.")

_MARK = "\ufdd0"  # a Unicode noncharacter: where a byte was not UTF-8


def _mark(error: UnicodeError) -> tuple[str, int]:
    assert isinstance(error, UnicodeDecodeError)
    return _MARK, error.end


codecs.register_error("ucloud-mark-invalid", _mark)


def utf8_field(raw: bytes) -> str | None:
    """Where a body that is not UTF-8 has its bad bytes: the top-level JSON field (or the
    path to it, 'ssh_keys[2]'), or None when it cannot be told (not JSON at all)."""
    text = raw.decode("utf-8", errors="ucloud-mark-invalid")
    try:
        document = msgspec.json.decode(text.encode())
    except msgspec.DecodeError:
        return None
    # Iterative, depth-first in document order: a deeply nested body cannot exhaust the stack.
    stack: list[tuple[str, Any]] = [("", document)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, str):
            if _MARK in node:
                return path or None
        elif isinstance(node, dict):
            items = []
            for key, value in node.items():
                name = shorten(key)
                where = f"{path}.{name}" if path else name
                if _MARK in key:
                    return where
                items.append((where, value))
            stack.extend(reversed(items))
        elif isinstance(node, list):
            stack.extend(reversed([(f"{path}[{index}]", value) for index, value in enumerate(node)]))
    return None


async def check_body(request: web.Request, limit: int | None = None) -> None:
    """A request with a body must fit (``limit``: the operation's own, below the gateway's),
    say it is JSON and be UTF-8."""
    if limit is not None and request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    raw = await request.read()  # 413 past the gateway's limit; kept: the handler's read() gets these bytes
    if limit is not None and len(raw) > limit:  # chunked: no Content-Length to judge by
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(raw))
    if request.content_type != JSON or request.charset not in (None, "utf-8", "UTF-8"):
        raise UnsupportedMediaType(
            f"Content-Type: this request carries JSON; send it as '{JSON}' (UTF-8), "
            f"not {shorten(request.headers.get('Content-Type', 'none'))!r}")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        field = utf8_field(raw)
        raise InvalidValue(field or "body", "is not valid UTF-8") from None


@web.middleware
async def input_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Check every declared parameter and the body's kind before the handler runs."""
    doc = getattr(request.match_info.handler, "api_doc", None)
    if doc is None:  # aiohttp's own 404/405 answers
        return await handler(request)
    from .routes import declared_params

    for param in declared_params(doc, request.match_info.route.resource):
        if param.where == "path":
            values = [request.match_info[param.name]] if param.name in request.match_info else []
        elif param.where == "query":
            values = request.query.getall(param.name, [])
        else:
            values = request.headers.getall(param.name, [])
        if param.where != "path" and len(values) > 1:
            raise InvalidValue(param.name, f"given {len(values)} times; give it once")
        if param.required and not values:
            raise InvalidValue(param.name, f"missing: this request needs the {param.where} parameter {param.name}")
        for value in values:
            check_value(param.name, param.schema, value)
    if request.body_exists and doc.body is not None:
        await check_body(request, doc.max_body)
    return await handler(request)
