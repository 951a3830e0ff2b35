"""Image stores as configuration names them: NAME=fs:/path or NAME=rbd:POOL[:CONF]."""

from __future__ import annotations

from pathlib import Path

import pytest

from ucloud.imagestore.rbd import RbdStore
from ucloud.imagestore.stores import FsStore, parse_stores


def test_fs_and_rbd_stores_are_read_from_their_specs() -> None:
    stores = parse_stores(["local=fs:/var/lib/ucloud/image-store", "ceph=rbd:vms:/etc/ceph/other.conf",
                           "plain=rbd:rbd"])
    assert list(stores) == ["local", "ceph", "plain"]  # the first is the default
    local, ceph, plain = stores.values()
    assert isinstance(local, FsStore) and local.root == Path("/var/lib/ucloud/image-store")
    assert isinstance(ceph, RbdStore) and (ceph.pool, ceph.conf) == ("vms", Path("/etc/ceph/other.conf"))
    assert isinstance(plain, RbdStore) and plain.conf == Path("/etc/ceph/ceph.conf")


@pytest.mark.parametrize("spec, says", [
    ("local", "write NAME=fs:/path"),
    ("Local=fs:/x", "the name must be"),
    ("local=fs:relative/path", "must be absolute"),
    ("local=nfs:/x", "the kind must be fs or rbd"),
    ("ceph=rbd:Bad_Pool", "NAME=rbd:POOL"),
])
def test_a_wrong_spec_is_refused_naming_what_is_wrong(spec: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_stores([spec])


def test_two_stores_of_one_name_are_refused() -> None:
    with pytest.raises(ValueError, match="two image stores are named 'a'"):
        parse_stores(["a=fs:/x", "a=fs:/y"])
