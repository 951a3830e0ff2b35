"""Hostile input against a live gateway with real authentication (built-in directory,
TOTP, sessions, SQLite log): every operation of its own OpenAPI document, every
parameter and body field, with over-long, overflowing, control-character,
newline-terminated, Unicode-digit and invalid-UTF-8 values. Each answer is a 4xx
problem+json naming the field, and meanwhile the gateway keeps answering others.

The operations and fields are read from the served document, so a new route or field
is covered without touching this file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
import yarl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.auth_stack import ADMIN, Stack, auth_stack
from tests.support.hosts import up_host
from ucloud.commands.unit_of_work import SYSTEM

PROBLEM = "application/problem+json"
# What a free-text field (x-ucloud-free-text, e.g. user_data) rightly accepts; its length
# bound, NUL and invalid UTF-8 are still refused.
FREE_TEXT_ACCEPTS = {"overflowing", "control character", "newline-terminated", "unicode digits"}
MARK = "\u0000MARK\u0000"  # replaced by raw invalid UTF-8 bytes in a body
HOST_SECURITY = {"host": []}  # a host agent's route: called with a host's own credential


async def host_credential(stack: Stack) -> dict[str, str]:
    """A host's own credential, for the routes that take one (/v1/host-agent/...)."""
    host = await up_host(stack.commands, f"h-{uuid.uuid4().hex[:6]}", 8, "16GiB", "100GiB")
    issued = await stack.commands.issue_host_credential(SYSTEM, host.result)
    return {"Authorization": f"Bearer {issued.result}"}


@dataclass(frozen=True)
class Hostile:
    kind: str
    value: Any  # str, or a JSON value for a body


def hostile_values(schema: dict[str, Any], example: Any) -> Iterator[Hostile]:
    longest = max([s.get("maxLength", 0) for s in _branches(schema)] + [0])
    yield Hostile("over-long", "a" * (longest + 1 if longest else 5000))
    yield Hostile("overflowing", "9" * 400)
    yield Hostile("control character", "a\x01b")
    yield Hostile("nul", "a\x00b")
    yield Hostile("newline-terminated", f"{example}\n")
    yield Hostile("unicode digits", "\u0661\u0662\u0663")  # Arabic-Indic 123
    yield Hostile("invalid utf-8", MARK)


def _branches(schema: dict[str, Any]) -> list[dict[str, Any]]:
    return schema.get("anyOf", [schema])


def example_of(schema: dict[str, Any], components: dict[str, Any]) -> Any:
    """A valid value for a field: its example, else one derived from its type."""
    if "$ref" in schema:
        return example_of(components[schema["$ref"].rsplit("/", 1)[1]], components)
    for branch in _branches(schema):
        if branch.get("examples"):
            return branch["examples"][0]
    for branch in _branches(schema):
        if "enum" in branch:
            return branch["enum"][0]
        if branch.get("format") == "uuid":
            return str(uuid.uuid4())
        if branch.get("type") == "integer":
            return max(branch.get("minimum", 0), 1)
        if branch.get("type") == "boolean":
            return True
        if branch.get("type") == "string":
            return "x" + uuid.uuid4().hex[:8]  # unique: a created resource does not collide with the next
    return None


def body_schema(operation: dict[str, Any], components: dict[str, Any]) -> dict[str, Any] | None:
    body = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
    if body is None:
        return None
    return components[body["$ref"].rsplit("/", 1)[1]] if "$ref" in body else body


@dataclass
class Case:
    method: str
    path: str
    field: str
    kind: str
    url: str
    headers: dict[str, str]
    data: bytes | None
    host: bool = False  # a host agent's route: sent with a host's credential


def cases(document: dict[str, Any], base: str) -> Iterator[Case]:
    components = document["components"]["schemas"]
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            if method == "head":
                continue
            params = operation.get("parameters", [])
            path_values = {p["name"]: str(example_of(p["schema"], components)) for p in params if p["in"] == "path"}
            # Required query and header parameters get their examples, so that only the hostile value is wrong.
            required = {(p["in"], p["name"]): str(example_of(p["schema"], components)) for p in params
                        if p["in"] in ("query", "header") and p.get("required")}
            schema = body_schema(operation, components)
            body = ({name: example_of(schema["properties"][name], components) for name in schema.get("required", [])}
                    if schema else None)
            targets = [(p["name"], p["in"], p["schema"]) for p in params]
            targets += [(name, "body", field) for name, field in (schema or {}).get("properties", {}).items()]
            for name, where, field_schema in targets:
                example = example_of(field_schema, components)
                for hostile in hostile_values(field_schema, example):
                    if field_schema.get("x-ucloud-free-text") and hostile.kind in FREE_TEXT_ACCEPTS:
                        continue  # free text (user data): these are text like any other
                    if where == "header" and hostile.kind in ("control character", "nul", "newline-terminated",
                                                              "unicode digits", "invalid utf-8"):
                        continue  # an HTTP client cannot send these in a header at all
                    case = build(method, path, path_values, body, name, where, hostile, base,
                                 is_array=field_schema.get("type") == "array", required=required)
                    yield dataclasses.replace(case, host=operation.get("security") == [HOST_SECURITY])


def _encode(text: str) -> str:
    return "%FF" if text == MARK else quote(text, safe="")


def build(method: str, path: str, path_values: dict[str, str], body: dict[str, Any] | None, name: str,
          where: str, hostile: Hostile, base: str, is_array: bool,
          required: dict[tuple[str, str], str] | None = None) -> Case:
    values = dict(path_values)
    query: list[str] = []
    headers = {"Content-Type": "application/json"} if body is not None else {}
    for (place, param), example in (required or {}).items():
        if (place, param) == (where, name):
            continue
        if place == "query":
            query.append(f"{quote(param)}={quote(example, safe='')}")
        else:
            headers[param] = example
    data: bytes | None = None
    if where == "path":
        values[name] = hostile.value
    elif where == "query":
        query.append(f"{quote(name)}={_encode(hostile.value)}")
    elif where == "header":
        headers[name] = hostile.value
    url_path = path
    for key, value in values.items():
        url_path = url_path.replace("{" + key + "}", _encode(value))
    if body is not None:
        sent = dict(body)
        if where == "body":
            # A hostile field goes first: whatever checks fields in order meets it first.
            sent = {name: [hostile.value] if is_array else hostile.value,
                    **{k: v for k, v in sent.items() if k != name}}
        data = json.dumps(sent).encode().replace(json.dumps(MARK).encode()[1:-1], b"a\xffb")
    url = f"{base}{url_path}" + (f"?{'&'.join(query)}" if query else "")
    return Case(method.upper(), path, name, hostile.kind, url, headers, data)


async def probe(stack: Stack, stop: asyncio.Event, latencies: list[float]) -> None:
    """Health checks while the hostile requests run: the gateway must keep answering."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        started = loop.time()
        status, _, _ = await stack.call("GET", "/healthz")
        assert status == 200
        latencies.append(loop.time() - started)
        await asyncio.sleep(0.02)


async def send(http: aiohttp.ClientSession, case: Case, auth: dict[str, str]) -> tuple[int, str, Any]:
    async with http.request(case.method, yarl.URL(case.url, encoded=True), data=case.data,
                            headers={**auth, **case.headers}) as response:
        text = await response.text(errors="replace")
        try:
            body = json.loads(text)
        except ValueError:
            body = text
        return response.status, response.content_type, body


@pytest.fixture
async def stack(tmp_path: Path) -> Any:
    async with auth_stack(tmp_path, "builtin") as running:
        yield running


async def test_every_field_of_every_operation_refuses_hostile_values_with_a_problem_naming_it(stack: Stack) -> None:
    status, document, _ = await stack.call("GET", "/v1/openapi.json")
    assert status == 200
    admin = await stack.session("root", ADMIN)
    host = await host_credential(stack)
    all_cases = list(cases(document, stack.url))
    operations = {(c.method, c.path) for c in all_cases}
    assert len(operations) >= 10 and len(all_cases) > 200  # the document really was walked
    stop, latencies = asyncio.Event(), list[float]()
    prober = asyncio.create_task(probe(stack, stop, latencies))
    failures: list[str] = []
    try:
        async with aiohttp.ClientSession() as http:
            for start in range(0, len(all_cases), 8):  # a few at a time, as concurrent clients would
                batch = all_cases[start:start + 8]
                answers = await asyncio.gather(*(send(http, case, host if case.host else admin) for case in batch))
                for case, (got, content_type, body) in zip(batch, answers, strict=True):
                    where = f"{case.method} {case.path} {case.field} ({case.kind}): {got} {body!r:.300}"
                    if not 400 <= got < 500 or content_type != PROBLEM:
                        failures.append(where)
                    elif not isinstance(body, dict) or not str(body.get("field") or "").startswith(case.field):
                        failures.append("does not name the field: " + where)
    finally:
        stop.set()
        await prober
    assert not failures, "\n".join(failures)
    # The health probe kept being answered throughout (a stall of the event loop would
    # hold every probe): a liveness bound, far above a normal answer's milliseconds.
    assert len(latencies) >= 5 and max(latencies) < 2.0, (len(latencies), max(latencies))


async def test_the_worst_bodies_at_the_size_limits_are_refused_while_others_are_answered(stack: Stack) -> None:
    """At the gateway's 1 MiB limit the create, key and price operations refuse by declared
    length (413, unread); at their own 128 KiB limit the body is read, parsed and refused (400)."""
    from tests.bench.bench_hostile_input import OPERATION_LIMIT, hostile_bodies, target

    admin = await stack.session("root", ADMIN)
    vm = {"name": "web1", "cores": 1, "ram": "1GiB", "disk": "1GiB", "image": "debian-12"}
    stop, latencies = asyncio.Event(), list[float]()
    prober = asyncio.create_task(probe(stack, stop, latencies))
    try:
        async with aiohttp.ClientSession() as http:
            for size, expect in ((1024 * 1024, 413), (OPERATION_LIMIT, 400)):
                for what, body in hostile_bodies(size).items():
                    assert size - 64 <= len(body) <= size
                    url = stack.url + target(body)
                    async with http.post(url, data=body, headers={**admin, "Content-Type": "application/json"}) as response:
                        answer = await response.json(content_type=None)
                        assert response.status == expect and response.content_type == PROBLEM, (what, size, answer)
                        assert len(answer["detail"]) < 1000, what  # nothing of the body is echoed back
                        if expect == 400 and what != "unknown field of spaces":
                            assert answer.get("field"), (what, answer)
            status, created, _ = await stack.call("POST", "/v1/vms", admin, json=vm)
            assert status == 202, created
    finally:
        stop.set()
        await prober
    assert len(latencies) >= 1 and max(latencies) < 2.0, latencies


async def test_json_bodies_must_say_they_are_json(stack: Stack) -> None:
    admin = await stack.session("root", ADMIN)
    body = json.dumps({"name": "k", "public_key": "x"}).encode()
    async with aiohttp.ClientSession() as http:
        for content_type in ("text/plain", "application/x-www-form-urlencoded", "application/json; charset=latin-1",
                             None):
            headers = {**admin, **({"Content-Type": content_type} if content_type else {})}
            async with http.post(stack.url + "/v1/ssh-keys", data=body, headers=headers,
                                 skip_auto_headers=["Content-Type"]) as response:
                answer = await response.json(content_type=None)
                assert response.status == 415 and response.content_type == PROBLEM, (content_type, answer)
                assert answer["field"] == "Content-Type"


async def test_an_over_long_request_line_or_header_gets_problem_json(stack: Stack) -> None:
    host, port = stack.gateway.addresses[0]
    for request, field in ((f"GET /v1/vms?owner={'a' * 10_000} HTTP/1.1\r\nHost: x\r\n\r\n", "request line"),
                           (f"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long: {'a' * 10_000}\r\n\r\n", "headers")):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(request.encode())
            await writer.drain()
            raw = await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()
        head, _, payload = raw.partition(b"\r\n\r\n")
        assert head.split(b" ")[1] == b"400", head
        assert b"content-type: application/problem+json" in head.lower(), head
        problem = json.loads(payload)
        assert problem["status"] == 400 and problem["field"] == field and "aaaa" not in problem["detail"]
    assert (await stack.call("GET", "/healthz"))[0] == 200


# -- a property: no generated request gets a 5xx ------------------------------------------------------

_TEXT = st.one_of(st.text(max_size=80), st.sampled_from(["١٢", "web\n", "9" * 400, "a\x00", "2GB", "web1"]))
_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _TEXT,
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4),
                     max_leaves=12)


_SESSIONS: dict[int, tuple[dict[str, Any], dict[str, str], dict[str, str]]] = {}


async def _document_and_admin(stack: Stack) -> tuple[dict[str, Any], dict[str, str]]:
    if id(stack) not in _SESSIONS:
        _, document, _ = await stack.call("GET", "/v1/openapi.json")
        _SESSIONS[id(stack)] = (document, await stack.session("root", ADMIN), await host_credential(stack))
    document, admin, _ = _SESSIONS[id(stack)]
    return document, admin


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
async def test_no_generated_body_query_or_path_gets_a_server_error(stack: Stack, data: st.DataObject) -> None:
    """One gateway for all examples; each example picks an operation of the document and
    fills its path, query and body with arbitrary JSON and text."""
    document, admin = await _document_and_admin(stack)
    if_host = _SESSIONS[id(stack)][2]
    operations = sorted((path, method) for path, ops in document["paths"].items() for method in ops
                        if method != "head")
    path, method = data.draw(st.sampled_from(operations))
    operation = document["paths"][path][method]
    url_path = path
    for param in operation.get("parameters", []):
        if param["in"] == "path":
            value = data.draw(_TEXT.filter(lambda t: t not in ("", ".", "..")))
            url_path = url_path.replace("{" + param["name"] + "}", quote(value, safe=""))
    query = "&".join(f"{quote(p['name'])}={quote(data.draw(_TEXT), safe='')}"
                     for p in operation.get("parameters", []) if p["in"] == "query" and data.draw(st.booleans()))
    body = data.draw(_JSON) if "requestBody" in operation or data.draw(st.booleans()) else None
    raw = None if body is None else json.dumps(body).encode()
    if raw is not None and data.draw(st.booleans()):
        raw = raw.replace(b"a", b"\xff", 1)  # invalid UTF-8 somewhere, if there is an "a"
    url = yarl.URL(stack.url + url_path + (f"?{query}" if query else ""), encoded=True)
    async with aiohttp.ClientSession() as http, http.request(
            method.upper(), url, data=raw, headers={**(if_host if operation.get("security") == [HOST_SECURITY]
                                                        else admin), "Content-Type": "application/json"}) as response:
        text = await response.text(errors="replace")
        assert response.status < 500, (method, url_path, query, raw, response.status, text)
        if response.status >= 400:
            assert response.content_type == PROBLEM, (response.status, text)
