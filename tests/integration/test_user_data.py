"""User data on VM creation: stored with the VM's request in the log, bounded per
installation (stated in the OpenAPI document), refused with a problem naming the field
when too long or not text, and part of what an Idempotency-Key compares."""

from __future__ import annotations

import io
import uuid

import click
import pytest
from aiohttp.test_utils import TestClient, TestServer

from tests.support.gateway import Api, user, vm_body
from ucloud.cli.main import read_user_data
from ucloud.domain import vm as vm_domain
from ucloud.domain.catalogue import build_codec
from ucloud.domain.limits import Limits
from ucloud.eventstore.memory import MemoryEventStore
from ucloud.gateway.app import GatewayConfig, init_app

SCRIPT = "#!/bin/sh\necho 'hello from user data' > /tmp/hello\n"


async def test_user_data_is_recorded_bounded_and_compared_on_retries() -> None:
    store = MemoryEventStore()
    app = init_app(GatewayConfig(store=store, limits=Limits(vm_user_data=100)))
    try:
        async with TestClient(TestServer(app)) as client:
            alice = Api(client, user("alice"))
            document = await alice.ok("GET", "/v1/openapi.json")
            assert document["components"]["schemas"]["CreateVmBody"]["properties"]["user_data"]["maxLength"] == 100

            created = await alice.ok("POST", "/v1/vms", vm_body("scripted", user_data=SCRIPT))
            codec = build_codec()
            records = await store.read_all(0)
            requested = [codec.decode(r.type, r.schema, r.data) for r in records if r.type == "vm.requested"]
            assert [(e.vm_id, e.user_data) for e in requested] == [(uuid.UUID(created["id"]), SCRIPT)]

            for text, status, detail in (("x" * 101, 422, "101 characters; at most 100"),
                                         ("a\x00b", 400, "NUL")):
                got, problem, _ = await alice.call("POST", "/v1/vms", vm_body("bad", user_data=text))
                assert got == status and detail in problem["detail"] and problem["field"] == "user_data", problem

            key = {"Idempotency-Key": "once"}
            first = await alice.ok("POST", "/v1/vms", vm_body("again", user_data=SCRIPT), headers=key)
            same = await alice.ok("POST", "/v1/vms", vm_body("again", user_data=SCRIPT), headers=key)
            assert same["id"] == first["id"]
            got, problem, _ = await alice.call("POST", "/v1/vms", vm_body("again", user_data="other"), headers=key)
            assert got == 422 and "Idempotency-Key" in problem["detail"]
    finally:
        await store.close()


def test_user_data_that_is_not_unicode_text_is_refused_by_the_domain() -> None:
    from ucloud.domain.errors import InvalidValue

    with pytest.raises(InvalidValue, match="lone surrogate"):
        vm_domain.check_user_data("\ud800", 100)


def test_an_old_vm_requested_event_decodes_with_empty_user_data() -> None:
    codec = build_codec()
    old = (b'{"type":"vm.requested","vm_id":"6f1f1d2e-8d53-4c1e-9a0e-4b2f5bd0c0a1","owner":"alice",'
           b'"name":"web1","cores":1,"ram":268435456,"disk":1048576,"image":"tiny"}')
    event = codec.decode("vm.requested", 1, old)
    assert isinstance(event, vm_domain.VmRequested) and event.user_data == ""


def test_the_cli_reads_user_data_as_utf8_text_and_names_the_option_otherwise() -> None:
    assert read_user_data(io.BytesIO(SCRIPT.encode())) == SCRIPT
    with pytest.raises(click.BadParameter, match="not UTF-8 text"):
        read_user_data(io.BytesIO(b"\x1f\x8b\x08\x00gzip"))
