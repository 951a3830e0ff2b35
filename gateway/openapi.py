"""The OpenAPI 3.1 description of the gateway, built from its route table.

Paths and methods come from ``app.router``; summaries, parameters and statuses from
the ``ApiDoc`` each handler carries; request and response schemas from the msgspec
Structs themselves (``msgspec.json.schema_components``), so the document cannot drift
from the code: a route without an ApiDoc is refused when the document is built.
"""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from ucloud.domain.limits import Limits

from .identity import REALM_HEADER, TOKEN_HEADER, USER_HEADER
from .keys import CONFIG
from .problems import PROBLEM_JSON, Problem
from .routes import LIMIT_KEY, ApiDoc, declared_params

_TITLES = {400: "Invalid request: the problem's detail and field say what is wrong",
           413: "The body is larger than the gateway accepts", 415: "The body is not sent as application/json",
           401: "Not authenticated",
           403: "Forbidden: a host reports only about the VMs placed on it", 402: "Priced and the account prepaid: order it (POST /v1/orders)",
           404: "Not found (or not yours)", 405: "Method not allowed",
           409: "Conflict with a concurrent writer; retry",
           422: "Rejected: not allowed in the resource's current state, or a value (named by the problem's "
                "field) beyond this installation's limits once its units are read",
           429: "Too many failed authentication attempts for this name or network; see Retry-After",
           501: "Not available with this gateway's configuration (user directory, verifier)",
           503: "Event store unreachable, or the read models did not reach ?position in time"}
OPENAPI = web.AppKey("openapi_document", dict)


def _apply_limits(node: Any, limits: Limits) -> Any:
    """The schemas with each ``x-ucloud-limit`` marker replaced by this installation's
    bound: ``maximum`` of an integer, ``maxItems`` of an array, ``maxLength`` of a string."""
    if isinstance(node, list):
        return [_apply_limits(item, limits) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _apply_limits(value, limits) for key, value in node.items() if key != LIMIT_KEY}
    if LIMIT_KEY in node:
        bound = getattr(limits, node[LIMIT_KEY])
        key = {"array": "maxItems", "string": "maxLength"}.get(node.get("type", ""), "maximum")
        out[key] = min(bound, node.get(key, bound))
    return out


def documented_routes(app: web.Application) -> list[tuple[str, str, ApiDoc]]:
    """(method, path, doc) for every route; raises if a route has no ApiDoc."""
    found = []
    for route in app.router.routes():
        resource = route.resource
        if resource is None:
            continue
        doc = getattr(route.handler, "api_doc", None)
        if not isinstance(doc, ApiDoc):
            raise RuntimeError(f"route {route.method} {resource.canonical} has no ApiDoc")
        found.append((route.method, resource.canonical, doc))
    return found


def build_openapi(app: web.Application) -> dict[str, Any]:
    routes = documented_routes(app)
    types: list[Any] = [Problem]
    for _, _, doc in routes:
        types.extend(t for t in (doc.body, doc.response) if t is not None)
    schemas, components = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    limits = app[CONFIG].limits if CONFIG in app else Limits()
    components = _apply_limits(components, limits)
    schema_of = dict(zip(map(id, types), schemas, strict=True))
    problem_ref = schema_of[id(Problem)]

    paths: dict[str, dict[str, Any]] = {}
    for method, path, doc in routes:
        resource = next(r.resource for r in app.router.routes()
                        if r.resource is not None and r.resource.canonical == path)
        declared = declared_params(doc, resource)
        params: list[dict[str, Any]] = [
            {"name": p.name, "in": p.where, "required": p.required or p.where == "path",
             **({"description": p.description} if p.description else {}), "schema": p.schema}
            for p in declared]
        responses: dict[str, Any] = {}
        for status in (doc.status, *doc.also):
            responses[str(status)] = {"description": doc.description}
            if doc.response is not None:
                responses[str(status)]["content"] = {doc.media_type: {"schema": schema_of[id(doc.response)]}}
        errors = set(doc.errors) | (({401} if doc.host else {401, 429}) if doc.auth else set()) | ({400, 422, 503} if doc.reads else set())
        if declared:
            errors.add(400)  # a parameter outside its schema
        if doc.body is not None:
            errors |= {400, 413, 415, 422}  # malformed; too large; not JSON; beyond a limit
        for status in sorted(errors):
            responses[str(status)] = {"description": _TITLES.get(status, "Error"),
                                      "content": {PROBLEM_JSON: {"schema": problem_ref}}}
        operation: dict[str, Any] = {"operationId": doc.operation_id, "summary": doc.summary, "tags": [doc.tag],
                                     "responses": responses}
        if params:
            operation["parameters"] = params
        if doc.body is not None:
            operation["requestBody"] = {"required": doc.body_required,
                                        "content": {"application/json": {"schema": schema_of[id(doc.body)]}}}
        if doc.upload is not None:
            operation["requestBody"] = {"required": True, "content": {
                doc.upload: {"schema": {"type": "string", "format": "binary",
                                        "description": "The file's bytes, streamed; at most the gateway's "
                                                       "max_file_size and within the user's quota (413)."}}}}
        if not doc.auth:
            operation["security"] = []
        elif doc.host:
            operation["security"] = [{"host": []}]
        if method == "HEAD":  # aiohttp answers HEAD for every GET: the same, without a body
            operation["operationId"] += "Head"
            operation["summary"] += " (headers only)"
            for response in responses.values():
                response.pop("content", None)
        paths.setdefault(path, {})[method.lower()] = operation

    return {
        "openapi": "3.1.0",
        "info": {"title": "ucloud API", "version": "1",
                 "description": "IPv6-first VM manager. Sizes are bytes, or strings such as '2GB', '512mb', "
                                "'1 TiB' (binary units). Errors are RFC 9457 problem details."},
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": components,
            "securitySchemes": {
                "session": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                            "description": "A session token from POST /v1/sessions (docs/auth.md)."},
                "user": {"type": "apiKey", "in": "header", "name": USER_HEADER,
                         "description": "Who calls: the user's name in the directory."},
                "realm": {"type": "apiKey", "in": "header", "name": REALM_HEADER,
                          "description": "The realm; 'ucloud' by default, 'ucloud-admin' is the admin realm."},
                "host": {"type": "http", "scheme": "bearer",
                         "description": "A host's own credential (POST /v1/hosts/{id}/credential, 'ucloud "
                                        "host join'); accepted only on /v1/host-agent/..."},
                "token": {"type": "apiKey", "in": "header", "name": TOKEN_HEADER,
                          "description": "The current TOTP (RFC 6238, 6 digits, 30 s) of the user's seed in "
                                         "the realm; accepted once."},
            },
        },
        # A session, or name + realm + TOTP (a gateway started with --insecure-header-auth
        # trusts name and realm alone: development only).
        "security": [{"session": []}, {"user": [], "realm": [], "token": []}],
    }


def openapi_document(app: web.Application) -> dict[str, Any]:
    """The document init_app built (and so checked) before the application started."""
    document: dict[str, Any] = app[OPENAPI]
    return document
