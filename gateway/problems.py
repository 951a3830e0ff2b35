"""Errors as RFC 9457 problem details (``application/problem+json``), in one place.

Every error the gateway answers goes through ``problem_for``: domain errors, event
store errors, body decoding errors, authentication failures, aiohttp's own 404/405,
and -- as the last resort -- anything unexpected (500, logged, no internals shown).
Handlers never catch broadly; they let errors reach the error middleware.
"""

from __future__ import annotations

import logging
import math
import re

import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler

from ucloud.domain.errors import Forbidden, InvalidValue, NotFound, Rejected
from ucloud.eventstore.errors import ConflictError, DataError, InvalidAppend, UnavailableError

from .identity import AuthenticationFailed

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
TYPE_PREFIX = "urn:ucloud:problem:"


class Problem(msgspec.Struct, omit_defaults=True, kw_only=True):
    """RFC 9457 problem details; ``field`` names the offending input where there is one."""

    type: str
    title: str
    status: int
    detail: str
    instance: str = ""
    field: str | None = None


class PositionNotReached(Exception):
    """The read models did not reach a position a query asked for in time (503)."""


class NotReady(Exception):
    """The gateway cannot answer well right now (its read models are not following the log)."""


class PaymentRequired(Exception):
    """What was asked is priced and must go through an order first (402)."""


class UnsupportedMediaType(Exception):
    """A request carries a body that does not say it is JSON (415 naming Content-Type)."""

    field = "Content-Type"


# (status, slug, title) per error class; the first match in order wins.
_MAPPING: list[tuple[type[BaseException], int, str, str]] = [
    (AuthenticationFailed, 401, "unauthenticated", "Authentication required"),
    (UnsupportedMediaType, 415, "unsupported-media-type", "Unsupported media type"),
    (InvalidValue, 400, "invalid", "Invalid request"),
    (msgspec.ValidationError, 400, "invalid", "Invalid request"),
    (msgspec.DecodeError, 400, "invalid", "Invalid request"),
    (InvalidAppend, 400, "invalid", "Invalid request"),
    (PaymentRequired, 402, "payment-required", "Payment required"),
    (Forbidden, 403, "forbidden", "Forbidden"),
    (NotFound, 404, "not-found", "Not found"),
    (ConflictError, 409, "conflict", "Conflict"),
    (Rejected, 422, "rejected", "Rejected"),
    (UnavailableError, 503, "unavailable", "Service unavailable"),
    (PositionNotReached, 503, "unavailable", "Service unavailable"),
    (NotReady, 503, "unavailable", "Service unavailable"),
    (DataError, 500, "internal", "Internal error"),
]

_AT = " - at `$"
_NAMED = "field `"
MAX_SHOWN = 64  # characters of a user-supplied name quoted back in a problem
MAX_DETAIL = 2000  # characters of a problem's detail: no megabyte is ever echoed back


def shorten(text: str, limit: int = MAX_SHOWN) -> str:
    """A user-supplied name as quoted back: at most ``limit`` characters."""
    return text if len(text) <= limit else text[:limit] + "…"


def _decode_error(error: msgspec.MsgspecError) -> tuple[str, str | None]:
    """A clear sentence and the field it is about, from msgspec's message.

    msgspec writes "<what> - at `$.path`" and "... field `name`"; the message is split
    with (r)partition, never a regular expression: a field name is the user's and may
    be a megabyte of spaces, and a backtracking pattern then stalls the event loop."""
    message = str(error)
    field: str | None = None
    head, at, path = message.rpartition(_AT)
    if at and path.endswith("`"):
        message, field = head, path[:-1].removeprefix(".") or None
    before, named, rest = message.partition(_NAMED)
    if named and rest.endswith("`"):  # "Object missing required field `name`", "unknown field `x`"
        name = shorten(rest[:-1])
        message = f"{before}{named}{name}`"
        field = f"{field}.{name}" if field else name
    if not isinstance(error, msgspec.ValidationError):  # ValidationError is a DecodeError too
        return f"the request body is not valid JSON ({shorten(message, 200)})", None
    if message.startswith("Expected `object`") and field is None:
        return "the request body must be a JSON object", None
    return (f"{field}: {message}" if field else message), field


# Absolute paths under the usual roots of a server's file system. Details are built from
# exception text; whatever an error says about where the server keeps its files is cut
# out (/v1/... API paths are not among these roots). Linear: one class, no nesting.
_SERVER_PATH = re.compile(r"(?<![\w/])/(?:var|etc|tmp|home|root|run|srv|opt|usr|proc|dev|mnt|work|lib|sys)"
                          r"(?:/[^\s'\"`]*)?")


def _from_os(error: BaseException) -> bool:
    """The error is, or was raised from, an operating-system error about a file (whose
    text names the file: "[Errno 17] File exists: '/var/lib/...'")."""
    seen: BaseException | None = error
    for _ in range(16):
        if seen is None:
            return False
        if isinstance(seen, OSError) and (seen.filename is not None or seen.filename2 is not None):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def problem_for(error: BaseException, instance: str = "") -> tuple[Problem, dict[str, str]]:
    """The problem (and extra headers) answering ``error``."""
    headers: dict[str, str] = {}
    if isinstance(error, web.HTTPException):
        # aiohttp's own answers: unknown route (404), wrong method (405), body too large (413).
        if "Allow" in error.headers:
            headers["Allow"] = error.headers["Allow"]
        detail = error.text if error.text and not error.text.startswith(f"{error.status}:") else error.reason
        if error.status == 404:
            detail = f"no such resource: {instance}"
        elif error.status == 405:
            detail = f"method not allowed here; allowed: {headers.get('Allow', 'none')}"
        slug = {404: "not-found", 405: "method-not-allowed", 413: "too-large", 414: "too-large",
                415: "unsupported-media-type", 431: "too-large", 501: "not-implemented"}.get(error.status, "http")
        return Problem(type=TYPE_PREFIX + slug, title=error.reason, status=error.status, detail=detail,
                       instance=instance), headers
    match = next(((status, slug, title) for error_type, status, slug, title in _MAPPING
                  if isinstance(error, error_type)), None)
    if match is None:
        log.exception("unexpected error answering %s", instance, exc_info=error)
        return Problem(type=TYPE_PREFIX + "internal", title="Internal error", status=500,
                       detail="the gateway failed unexpectedly; the error is in its log",
                       instance=instance), headers
    status, slug, title = match
    field: str | None = None
    if isinstance(error, msgspec.MsgspecError):
        detail, field = _decode_error(error)  # short: user-supplied names are cut (shorten)
    else:
        detail = str(error)
        if isinstance(error, InvalidValue | Rejected | UnsupportedMediaType):
            field = error.field
    if _from_os(error):
        log.warning("answering %s with %d for an error of the operating system: %s", instance, status, detail)
        detail = title  # its text names the server's files; the log has it
    if len(detail) > MAX_DETAIL:
        detail = detail[:MAX_DETAIL] + "…"
    detail = _SERVER_PATH.sub("<server path>", detail)
    if isinstance(error, AuthenticationFailed):
        retry_after = getattr(error, "retry_after", None)
        if retry_after:
            # Too many failures for this name or from this network (unknown names are
            # limited exactly like known ones, so this says nothing about who exists).
            seconds = max(1, math.ceil(retry_after))
            return Problem(type=TYPE_PREFIX + "rate-limited", title="Too many failed attempts", status=429,
                           detail=f"too many failed authentication attempts for this name or from this "
                                  f"network; retry in {seconds} s", instance=instance), {"Retry-After": str(seconds)}
        headers["WWW-Authenticate"] = error.challenge
    elif isinstance(error, UnavailableError | PositionNotReached | NotReady):
        headers["Retry-After"] = "1"
    if status == 500:
        log.error("data error answering %s: %s", instance, error)
    return Problem(type=TYPE_PREFIX + slug, title=title, status=status, detail=detail or title,
                   instance=instance, field=field), headers


def problem_response(problem: Problem, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=msgspec.json.encode(problem), status=problem.status,
                        content_type=PROBLEM_JSON, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one place errors become HTTP answers."""
    try:
        return await handler(request)
    except web.HTTPException as error:
        if error.status < 400:
            raise  # redirects and the like are answers, not errors
        problem, headers = problem_for(error, request.path)
        return problem_response(problem, headers)
    except Exception as error:
        problem, headers = problem_for(error, request.path)
        return problem_response(problem, headers)
