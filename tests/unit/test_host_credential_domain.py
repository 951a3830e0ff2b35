"""The host credential's form and its life in the Host aggregate (pure, no I/O)."""

from __future__ import annotations

import os
import uuid

import pytest

from ucloud.domain import host as host_domain
from ucloud.domain.errors import InvalidValue, NotFound


def registered(hostname: str = "node1") -> host_domain.Host:
    state = None
    for event in host_domain.decide(None, host_domain.RegisterHost(hostname=hostname, cores=4, ram=2**30, disk=2**34)):
        state = host_domain.evolve(state, event)
    assert state is not None
    return state


def test_a_credential_names_its_host_and_nothing_else_parses_as_one() -> None:
    host_id = uuid.uuid4()
    credential = host_domain.credential_for(host_id, os.urandom(32))
    assert len(credential) == host_domain.CREDENTIAL_LENGTH
    assert host_domain.credential_host(credential) == host_id
    assert host_domain.credential_digest(credential) != host_domain.credential_digest(
        host_domain.credential_for(host_id, os.urandom(32)))
    for wrong in ("", credential[:-1], credential + "A", credential.replace("uch1.", "uch2."),
                  credential[:10] + "G" + credential[11:], credential[:-1] + "=", "uch1." + "0" * 76):
        assert host_domain.credential_host(wrong) is None, wrong
    with pytest.raises(ValueError):
        host_domain.credential_for(host_id, b"short")


def test_issuing_replaces_the_digest_and_removal_revokes_it() -> None:
    host = registered()
    first, second = "a" * 64, "b" * 64
    for digest in (first, second):
        (event,) = host_domain.decide(host, host_domain.IssueCredential(host_id=host.id, digest=digest, by="root"))
        host = host_domain.evolve(host, event)  # type: ignore[assignment]
        assert host.credential == digest
    (removed,) = host_domain.decide(host, host_domain.RemoveHost(host_id=host.id))
    host = host_domain.evolve(host, removed)  # type: ignore[assignment]
    assert host.credential == ""
    with pytest.raises(NotFound):
        host_domain.decide(host, host_domain.IssueCredential(host_id=host.id, digest=first))
    with pytest.raises(NotFound):
        host_domain.decide(None, host_domain.IssueCredential(host_id=uuid.uuid4(), digest=first))
    with pytest.raises(InvalidValue, match="digest"):
        host_domain.decide(registered(), host_domain.IssueCredential(host_id=host.id, digest="A" * 64))
