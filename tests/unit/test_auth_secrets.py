"""FileSecretStore and Secret: permissions, atomic writes, no leaks."""

from __future__ import annotations

import asyncio
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ucloud.auth.files import PrivateFileError
from ucloud.auth.secrets import (
    FileSecretStore,
    InvalidSecretKey,
    Secret,
    SecretStoreError,
    check_key,
    otp_key,
)

SEED = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_secret_never_shows_its_value() -> None:
    secret = Secret(SEED)
    for text in (repr(secret), str(secret), f"{secret}", f"{secret!r}", f"{secret:>40}", repr([secret]),
                 repr({"seed": secret})):
        assert SEED not in text
        assert "***" in text
    assert secret.reveal() == SEED


def test_secret_compares_by_value_but_cannot_be_hashed_or_pickled() -> None:
    assert Secret(SEED) == Secret(SEED)
    assert Secret(SEED) != Secret(SEED[::-1])
    with pytest.raises(TypeError):
        hash(Secret(SEED))
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(Secret(SEED))
    with pytest.raises(TypeError, match="holds a str"):
        Secret(b"bytes")  # type: ignore[arg-type]


def test_otp_keys_are_distinct_and_safe_for_any_name() -> None:
    assert otp_key("ucloud", "alice") == "otp/ucloud/alice"
    assert otp_key("ucloud", "a/b") != otp_key("ucloud", "a%2Fb")
    weird = ["a/b", "../x", "white space", "ümlaut", "x%2Fy", "*"]
    keys = {otp_key("ucloud", n) for n in weird}
    assert len(keys) == len(weird)
    for key in keys:
        assert key.count("/") == 2
        check_key(key)
    with pytest.raises(InvalidSecretKey):
        otp_key("", "alice")


@pytest.mark.parametrize("key", ["", "/a", "a/", "a//b", "a/../b", "./a", "a b", "a\nb", "x" * 513])
def test_bad_keys_are_refused_with_a_clear_error(key: str) -> None:
    with pytest.raises(InvalidSecretKey, match="secret key"):
        check_key(key)


async def test_put_get_delete_and_put_new(tmp_path: Path) -> None:
    store = FileSecretStore(tmp_path / "secrets.json")
    assert await store.get("otp/ucloud/alice") is None
    await store.put("otp/ucloud/alice", Secret(SEED))
    assert await store.get("otp/ucloud/alice") == Secret(SEED)
    assert await store.put_new("otp/ucloud/alice", Secret("OTHER")) is False
    assert (await store.get("otp/ucloud/alice")) == Secret(SEED)
    assert await store.put_new("otp/ucloud/bob", Secret("BOB")) is True
    assert await store.delete("otp/ucloud/alice") is True
    assert await store.delete("otp/ucloud/alice") is False
    assert await store.get("otp/ucloud/alice") is None
    assert await store.get("otp/ucloud/bob") == Secret("BOB")


async def test_values_must_be_secrets(tmp_path: Path) -> None:
    store = FileSecretStore(tmp_path / "secrets.json")
    with pytest.raises(TypeError, match="Secret objects"):
        await store.put("k", SEED)  # type: ignore[arg-type]


async def test_the_file_is_created_0600_in_a_0700_directory(tmp_path: Path) -> None:
    path = tmp_path / "new" / "secrets.json"
    store = FileSecretStore(path)
    await store.put("k", Secret(SEED))
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700
    assert [p.name for p in path.parent.iterdir() if not p.name.endswith(".lock")] == ["secrets.json"]


@pytest.mark.parametrize("wide", [0o644, 0o640, 0o604, 0o660, 0o666])
def test_a_file_readable_by_others_is_refused(tmp_path: Path, wide: int) -> None:
    path = tmp_path / "secrets.json"
    path.write_text('{"version": 1, "secrets": {}}')
    path.chmod(wide)
    with pytest.raises(PrivateFileError) as error:
        FileSecretStore(path)
    message = str(error.value)
    assert str(path) in message and f"{wide:04o}" in message and "chmod 600" in message


async def test_the_mode_is_checked_again_on_every_read(tmp_path: Path) -> None:
    path = tmp_path / "secrets.json"
    store = FileSecretStore(path)
    await store.put("k", Secret(SEED))
    path.chmod(0o644)
    os.utime(path, ns=(1, 1))  # a different identity: the store must re-read and re-check
    with pytest.raises(PrivateFileError, match="chmod 600"):
        await store.get("k")


def test_a_symlink_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real.json"
    real.write_text('{"version": 1, "secrets": {}}')
    real.chmod(0o600)
    link = tmp_path / "secrets.json"
    link.symlink_to(real)
    with pytest.raises(PrivateFileError, match="symbolic link"):
        FileSecretStore(link)


def test_a_file_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "secrets.json"
    path.write_text('{"version": 1, "secrets": {}}')
    path.chmod(0o600)
    os.chown(path, 65534, 65534)  # the tests run as root (see the briefing)
    with pytest.raises(PrivateFileError, match="owned by uid 65534"):
        FileSecretStore(path)


@pytest.mark.parametrize("content", [
    '{"version": 1, "secrets": {"k": "' + SEED + '"',  # truncated JSON around a secret
    '[1, 2, 3]',
    '{"version": 2, "secrets": {}}',
    '{"version": 1, "secrets": {"k": 5}}',
])
def test_a_broken_file_gives_an_error_that_does_not_quote_it(tmp_path: Path, content: str) -> None:
    path = tmp_path / "secrets.json"
    path.write_text(content)
    path.chmod(0o600)
    with pytest.raises(SecretStoreError) as error:
        FileSecretStore(path)
    assert str(path) in str(error.value)
    assert SEED not in str(error.value)


async def test_changes_by_another_process_are_seen(tmp_path: Path) -> None:
    path = tmp_path / "secrets.json"
    gateway = FileSecretStore(path)
    cli = FileSecretStore(path)
    assert await gateway.get("k") is None
    await cli.put("k", Secret(SEED))
    assert await gateway.get("k") == Secret(SEED)
    await cli.delete("k")
    assert await gateway.get("k") is None


def test_repr_of_the_store_shows_no_secret(tmp_path: Path) -> None:
    store = FileSecretStore(tmp_path / "secrets.json")
    asyncio.run(store.put("k", Secret(SEED)))
    assert SEED not in repr(store) and SEED not in str(store)


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parents[2])


def test_a_failed_write_leaves_the_old_file_intact_and_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "secrets.json"
    store = FileSecretStore(path)
    asyncio.run(store.put("old", Secret(SEED)))
    before = path.read_bytes()
    # A child process whose file size limit is smaller than the new file: the write
    # fails half-way (EFBIG), exactly like a full disk.
    result = _run(f"""
        import asyncio, resource, signal
        from ucloud.auth.secrets import FileSecretStore, Secret
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        store = FileSecretStore({str(path)!r})
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            asyncio.run(store.put("big", Secret("X" * 100_000)))
        except OSError as error:
            print("failed:", error.errno, error)
    """)
    assert "failed: 27" in result.stdout, result.stderr  # EFBIG
    assert "XXXX" not in result.stdout + result.stderr
    assert path.read_bytes() == before
    assert asyncio.run(store.get("old")) == Secret(SEED)
    assert asyncio.run(store.get("big")) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secrets.json", "secrets.json.lock"]


def test_concurrent_writers_in_two_processes_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "secrets.json"
    FileSecretStore(path)
    code = """
        import asyncio, sys
        from ucloud.auth.secrets import FileSecretStore, Secret
        store = FileSecretStore({path!r})
        async def main():
            for i in range(40):
                await store.put(f"{who}/{{i}}", Secret("v"))
        asyncio.run(main())
    """
    children = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code.format(path=str(path), who=who))],
                                 cwd=Path(__file__).resolve().parents[2]) for who in ("a", "b")]
    assert [c.wait(timeout=60) for c in children] == [0, 0]
    store = FileSecretStore(path)
    for who in ("a", "b"):
        for i in range(40):
            assert asyncio.run(store.get(f"{who}/{i}")) == Secret("v")


async def test_keys_lists_names_under_a_prefix_never_values(tmp_path: Path) -> None:
    store = FileSecretStore(tmp_path / "secrets.json")
    for key in ("otp/ucloud-admin/root", "otp/ucloud/alice", "session/hmac-key"):
        await store.put(key, Secret("S" * 32))
    assert await store.keys("otp/ucloud-admin/") == ["otp/ucloud-admin/root"]
    assert await store.keys("otp/") == ["otp/ucloud-admin/root", "otp/ucloud/alice"]
    other = FileSecretStore(tmp_path / "secrets.json")  # another process's view: from the file
    assert await other.keys("") == ["otp/ucloud-admin/root", "otp/ucloud/alice", "session/hmac-key"]
