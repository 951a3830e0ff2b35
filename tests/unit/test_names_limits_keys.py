"""The one name rule, the installation's limits, SSH key parsing: pure domain checks."""

from __future__ import annotations

import base64
import re
import time

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given
from hypothesis import strategies as st

from ucloud.domain.errors import InvalidValue, OutOfBounds
from ucloud.domain.limits import DEFAULT_LIMITS, Limits, TiB, load_limits
from ucloud.domain.names import NAME_PATTERN, check_hostname, check_name, check_user_name, is_name
from ucloud.domain.sshkey import PUBLIC_KEY_MAX_LENGTH, parse_public_key
from ucloud.domain.units import parse_size

PUBLIC_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICvYBsl/DgCvGh/DMo+nY6kmlyPI24+sT5OvcdsYbW6Q alice@laptop"


@pytest.mark.parametrize("name", ["a", "web1", "web-1", "0", "a" * 63, "debian-12"])
def test_names_that_follow_the_rule(name: str) -> None:
    assert check_name(name) == name and is_name(name)


@pytest.mark.parametrize("name", ["", "web\n", "\nweb", "Web", "web_1", "-web", "web-", "a" * 64, "we b",
                                  "web١", "wéb", "web\x00", "a.b", "ｗｅｂ"])
def test_names_that_do_not(name: str) -> None:
    with pytest.raises(InvalidValue, match="^vm: .* is not a name"):
        check_name(name, "vm")
    assert not is_name(name)


def test_the_rule_is_the_documented_pattern() -> None:
    assert NAME_PATTERN == r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"


@given(st.text(max_size=80))
def test_a_name_is_exactly_what_the_pattern_fullmatches_in_ascii(text: str) -> None:
    expected = re.fullmatch(NAME_PATTERN[1:-1], text, re.ASCII) is not None and len(text) <= 63
    assert is_name(text) is expected


def test_host_names_are_labels_joined_by_dots() -> None:
    assert check_hostname("node1.example.org") == "node1.example.org"
    for bad in ("node1.", ".node1", "node1..x", "Node1", "node1\n", "a" * 64 + ".x", ("a" * 63 + ".") * 4 + "a"):
        with pytest.raises(InvalidValue, match="^hostname: "):
            check_hostname(bad)


def test_user_names_refuse_spaces_controls_and_trailing_newlines() -> None:
    assert check_user_name("alice@example.org") == "alice@example.org"
    for bad in ("alice\n", "al ice", "", "a" * 257, "ålice"):
        with pytest.raises(InvalidValue, match="^owner: "):
            check_user_name(bad)


def test_long_inputs_are_refused_by_length_before_any_pattern() -> None:
    started = time.process_time()
    for text in ("a" * 1_000_000 + "\n", "1" + " " * 1_000_000 + "x"):
        with pytest.raises(InvalidValue):
            check_name(text)
        with pytest.raises(InvalidValue):
            parse_size(text)
    assert time.process_time() - started < 5  # a stall would be hours, not seconds


def test_limits_default_and_load_from_json() -> None:
    assert DEFAULT_LIMITS.vm_ram == 4 * TiB and DEFAULT_LIMITS.vm_cores == 1024
    assert load_limits(b'{"vm_ram": 1099511627776}').vm_ram == TiB
    assert load_limits(b"").vm_disk == DEFAULT_LIMITS.vm_disk
    for bad in (b'{"vm_ram": 0}', b'{"colour": 1}', b'{"vm_ram": 4611686018427387904000}', b"[",
                b'{"vm_min_ram": 2, "vm_ram": 1}'):
        with pytest.raises(ValueError, match="limits|vm_min_ram"):
            load_limits(bad)
    with pytest.raises(ValueError, match="vm_min_disk"):
        Limits(vm_min_disk=10, vm_disk=5)


def _openssh(key: object) -> str:
    return key.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()  # type: ignore[attr-defined]


def test_a_public_key_is_parsed_and_fingerprinted_from_its_key_material() -> None:
    line, fingerprint = parse_public_key(PUBLIC_KEY)
    assert line == PUBLIC_KEY
    # What `ssh-keygen -lf` prints for this key.
    assert fingerprint == "SHA256:" + base64.b64encode(
        __import__("hashlib").sha256(base64.b64decode(PUBLIC_KEY.split()[1])).digest()).decode().rstrip("=")
    for key in (ed25519.Ed25519PrivateKey.generate().public_key(), ec.generate_private_key(ec.SECP384R1()).public_key(),
                rsa.generate_private_key(65537, 2048).public_key()):
        text = _openssh(key)
        assert parse_public_key(text + " me@host")[0] == text + " me@host"
        assert parse_public_key(text)[0] == text  # the comment is optional


@pytest.mark.parametrize(("text", "error", "detail"), [
    ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5", OutOfBounds, "not a valid ssh-ed25519 key"),
    ("ssh-ed25519 " + "A" * (PUBLIC_KEY_MAX_LENGTH + 1), InvalidValue, "longer than"),
    ("ssh-ed25519 " + "QUFB" * 250_000, InvalidValue, "longer than"),  # a megabyte of "key material"
    (PUBLIC_KEY + "\nssh-rsa AAAA", InvalidValue, "one OpenSSH public key line"),
    (PUBLIC_KEY + "\n", InvalidValue, "one OpenSSH public key line"),
    ("ssh-dss AAAAB3NzaC1kc3M=", InvalidValue, "one OpenSSH public key line"),
    (PUBLIC_KEY.replace("ssh-ed25519", "ecdsa-sha2-nistp256"), OutOfBounds, "not a valid ecdsa-sha2-nistp256"),
])
def test_bad_public_keys(text: str, error: type[Exception], detail: str) -> None:
    with pytest.raises(error, match=f"^public_key: .*{re.escape(detail)}"):
        parse_public_key(text)


def test_rsa_keys_below_2048_bits_are_refused() -> None:
    with pytest.raises(OutOfBounds, match="2048 to 16384 bits, this one has 1024"):
        parse_public_key(_openssh(rsa.generate_private_key(65537, 1024).public_key()))
