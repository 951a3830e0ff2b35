"""Store URLs: every form a tool accepts, and a clear error for each way one can be wrong."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from ucloud.eventstore.etcd import EtcdEventStore
from ucloud.eventstore.memory import MemoryEventStore
from ucloud.eventstore.sqlite import SqliteEventStore
from ucloud.eventstore.url import InvalidStoreUrl, StoreLocation, open_store, parse_store_url


def test_sqlite_urls_and_bare_paths() -> None:
    assert parse_store_url("sqlite:///var/lib/ucloud/log.sqlite") == StoreLocation(
        "sqlite", path=Path("/var/lib/ucloud/log.sqlite"))
    assert parse_store_url("sqlite://log.sqlite").path == Path("log.sqlite")
    assert parse_store_url("/srv/log.sqlite").path == Path("/srv/log.sqlite")
    assert parse_store_url("relative/log.sqlite").path == Path("relative/log.sqlite")
    assert parse_store_url("SQLITE:///x.db").scheme == "sqlite"
    assert parse_store_url("~/log.sqlite").path == Path.home() / "log.sqlite"
    assert str(parse_store_url("/srv/log.sqlite")) == "sqlite:///srv/log.sqlite"


def test_etcd_urls() -> None:
    one = parse_store_url("etcd://127.0.0.1:2379")
    assert (one.endpoints, one.prefix, one.options) == (("127.0.0.1:2379",), "/v1", {})
    many = parse_store_url("etcd://a.example:2379,b.example:2380,[2001:db8::1]:2379/ucloud/v1")
    assert many.endpoints == ("a.example:2379", "b.example:2380", "[2001:db8::1]:2379")
    assert many.prefix == "/ucloud/v1"
    assert str(many) == "etcd://a.example:2379,b.example:2380,[2001:db8::1]:2379/ucloud/v1"
    assert parse_store_url("etcd://h:1/").prefix == "/v1"
    assert parse_store_url("etcd://h:1//x/").prefix == "/x"
    assert parse_store_url("etcd://[::1]:02379").endpoints == ("[::1]:2379",)
    options = parse_store_url("etcd://h:1/v1?timeout=2.5&max_txn_ops=1024").options
    assert options == {"timeout": 2.5, "max_txn_ops": 1024}


def test_memory_url() -> None:
    assert parse_store_url("memory://") == StoreLocation("memory")


@pytest.mark.parametrize(("url", "message"), [
    ("", "the store URL is empty"),
    ("   ", "the store URL is empty"),
    ("http://h:2379", "unknown scheme 'http'"),
    ("etcd:h:2379", "lacks '//' after 'etcd:'"),
    ("sqlite:/x.db", "lacks '//' after 'sqlite:'"),
    ("sqlite://", "names no file"),
    ("sqlite:///tmp/x.db?mode=ro", "a sqlite URL takes no options"),
    ("sqlite:///tmp/", "names a directory"),
    ("/tmp", "names a directory"),
    ("memory://x", "memory:// takes nothing after '//'"),
    ("etcd://", "names no etcd endpoint"),
    ("etcd:///v1", "names no etcd endpoint"),
    ("etcd://h", "etcd endpoint 'h' has no port"),
    ("etcd://h:", "etcd endpoint 'h:' has no port"),
    ("etcd://h:0", "port '0' of etcd endpoint 'h:0' is not a number in 1..65535"),
    ("etcd://h:65536", "is not a number in 1..65535"),
    ("etcd://h:http", "port 'http' of etcd endpoint 'h:http'"),
    ("etcd://h:1,,g:2", "an empty etcd endpoint"),
    ("etcd://h:1,", "an empty etcd endpoint"),
    ("etcd://h:1,h:1", "names an etcd endpoint twice"),
    ("etcd://::1:2379", "looks like an IPv6 address: put it in brackets"),
    ("etcd://[::1]", "etcd endpoint '[::1]' has no port"),
    ("etcd://[::zz]:1", "'::zz' in etcd endpoint '[::zz]:1' is not an IPv6 address"),
    ("etcd://[::1:1", "etcd endpoint '[::1:1' is malformed"),
    ("etcd://bad_host:1", "'bad_host' in etcd endpoint 'bad_host:1' is not a host name or address"),
    ("etcd://user:pw@h:1", "credentials in the URL are not supported"),
    ("etcd://h:1/v 1", "key prefix /v 1 has an empty or invalid part 'v 1'"),
    ("etcd://h:1/a//b", "has an empty or invalid part ''"),
    ("etcd://h:1?colour=red", "unknown etcd option 'colour'; known: append_timeout, ca, cert, key, max_txn_bytes"),
    ("etcd://h:1?cert=/c.pem", "a client certificate needs both cert and key"),
    ("etcd://h:1?user=ucloud", "etcd authentication needs both user and password_file"),
    ("etcd://h:1?ca=", "etcd option 'ca' needs a value"),
    ("etcd://h:1?ca=/a&ca=/b", "etcd option 'ca' is given twice"),
    ("etcd://h:1?timeout=soon", "etcd option timeout='soon' must be a positive number"),
    ("etcd://h:1?timeout=-1", "must be a positive number"),
    ("etcd://h:1?timeout=nan", "must be a positive number"),
    ("etcd://h:1?max_txn_ops=1.5", "etcd option max_txn_ops='1.5' must be a positive integer"),
    ("etcd://h:1?timeout=1&timeout=2", "etcd option 'timeout' is given twice"),
    ("etcd://h:1?timeout", "options 'timeout' are not name=value pairs joined by '&'"),
    ("etcd://h:1?timeout=", "etcd option timeout='' must be a positive number"),
    ("etcd://h:1#frag", "'#' has no meaning in an etcd URL"),
])
def test_bad_urls_name_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(InvalidStoreUrl) as error:
        parse_store_url(url)
    assert message in str(error.value)


async def test_open_store_picks_the_backend(tmp_path: Path) -> None:
    sqlite = open_store(f"sqlite://{tmp_path / 'a' / 'log.sqlite'}")
    assert isinstance(sqlite, SqliteEventStore)
    assert await sqlite.head() == 0
    await sqlite.close()
    assert (tmp_path / "a" / "log.sqlite").exists()
    etcd = open_store("etcd://127.0.0.1:1,[::1]:2/p?max_txn_ops=512&timeout=1")
    assert isinstance(etcd, EtcdEventStore)
    assert (etcd.prefix, etcd.max_txn_ops, etcd.client.endpoints) == (b"/p", 512, ["127.0.0.1:1", "[::1]:2"])
    await etcd.close()
    assert isinstance(open_store("memory://"), MemoryEventStore)


def test_open_store_reports_the_backends_own_limits() -> None:
    with pytest.raises(InvalidStoreUrl) as error:
        open_store("etcd://h:1?max_txn_ops=4")
    assert "max_txn_ops must be at least 8" in str(error.value)


def test_open_store_without_create_refuses_what_is_not_a_log(tmp_path: Path) -> None:
    missing = tmp_path / "missing.sqlite"
    with pytest.raises(InvalidStoreUrl, match="no SQLite log at .*missing.sqlite: the file does not exist"):
        open_store(str(missing), create=False)
    assert not missing.exists()
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"\x00not a database" * 200)
    with pytest.raises(InvalidStoreUrl, match="is not a SQLite log: file is not a database"):
        open_store(str(garbage), create=False)
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE t (x)")
    conn.close()
    with pytest.raises(InvalidStoreUrl, match="not a ucloud log"):
        open_store(str(other), create=False)


def test_etcd_security_options_are_carried_to_the_client() -> None:
    location = parse_store_url("etcd://h:2379?ca=/etc/u/ca.pem&cert=/etc/u/me.pem&key=/etc/u/me-key.pem"
                               "&user=gw&password_file=/etc/u/pw&server_name=etcd.example&timeout=2")
    assert location.security == {"ca_file": "/etc/u/ca.pem", "cert_file": "/etc/u/me.pem",
                                 "key_file": "/etc/u/me-key.pem", "user": "gw", "password_file": "/etc/u/pw",
                                 "server_name": "etcd.example"}
    assert location.options == {"timeout": 2.0}
