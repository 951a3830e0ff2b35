"""SSH keys: a user's public keys, by name. Private keys never enter ucloud."""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import uuid
from uuid import UUID

import msgspec
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_ssh_public_key

from .errors import InvalidValue, NotFound, OutOfBounds, Rejected
from .events import Command, Event
from .names import check_name

SSHKEY_NAMESPACE = uuid.UUID("6f1f1d2e-8d53-4c1e-9a0e-4b2f5bd0c002")
# The key types ucloud accepts: what OpenSSH offers today and `cryptography` parses
# (ssh-dss is gone from OpenSSH and is refused).
KEY_TYPES = (
    "ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com",
)
PUBLIC_KEY_MAX_LENGTH = 16 * 1024  # a 16384-bit RSA key is ~2.8 KiB; the rest is comment
RSA_MIN_BITS, RSA_MAX_BITS = 2048, 16384
# "type base64 [comment]": one line, single spaces, a comment without control characters.
# The same text is the OpenAPI pattern; the check is a fullmatch after the length cap.
PUBLIC_KEY_PATTERN = (
    "^(" + "|".join(t.replace(".", r"\.") for t in KEY_TYPES) + r") [A-Za-z0-9+/]+={0,2}( [^\x00-\x1f\x7f]*)?$"
)
_PUBLIC_KEY = re.compile(PUBLIC_KEY_PATTERN[1:-1], re.ASCII)
_SK_TYPES = frozenset(t for t in KEY_TYPES if t.startswith("sk-"))


def key_id_for(owner: str, name: str) -> UUID:
    """One stream per (owner, name): adding a second key of the same name conflicts."""
    return uuid.uuid5(SSHKEY_NAMESPACE, f"{owner}\0{name}")


class SshKeyAdded(Event, tag="sshkey.added", frozen=True):
    """A user added a public SSH key under a name."""

    key_id: UUID
    owner: str
    name: str
    public_key: str
    fingerprint: str


class SshKeyDeleted(Event, tag="sshkey.deleted", frozen=True):
    """A user removed an SSH key."""

    key_id: UUID


SSHKEY_EVENT_TYPES: tuple[type[Event], ...] = (SshKeyAdded, SshKeyDeleted)


class AddSshKey(Command, tag="sshkey.add", frozen=True):
    owner: str
    name: str
    public_key: str


class DeleteSshKey(Command, tag="sshkey.delete", frozen=True):
    owner: str
    name: str


class SshKey(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    id: UUID
    owner: str
    name: str
    public_key: str
    fingerprint: str
    deleted: bool = False


def fingerprint(public_key: str) -> str:
    """OpenSSH's SHA256 fingerprint of a public key line."""
    blob = base64.b64decode(public_key.split()[1])
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


def parse_public_key(text: str) -> tuple[str, str]:
    """(normalised key line, fingerprint) of an OpenSSH public key, or an error naming
    ``public_key``: InvalidValue (400) when the text is not of the form
    ``type base64 [comment]``, OutOfBounds (422) when the key material does not parse as
    a key of that type (through the ``cryptography`` library) or is of a refused size.
    The fingerprint is taken over the key as parsed and encoded again."""
    if len(text) > PUBLIC_KEY_MAX_LENGTH:
        raise InvalidValue("public_key", f"longer than {PUBLIC_KEY_MAX_LENGTH} characters")
    if "PRIVATE KEY" in text:
        raise InvalidValue("public_key", "this is a private key; give the public key (.pub)")
    if _PUBLIC_KEY.fullmatch(text) is None:
        raise InvalidValue("public_key", "expected one OpenSSH public key line: '<type> <base64> [comment]' "
                                         f"with single spaces, the type one of {', '.join(KEY_TYPES)}")
    key_type, material, *comment = text.split(" ", 2)
    try:
        blob = base64.b64decode(material, validate=True)
    except (binascii.Error, ValueError):
        raise OutOfBounds("public_key", "the key data is not valid base64") from None
    try:
        key = load_ssh_public_key(f"{key_type} {material}".encode())
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise OutOfBounds("public_key", f"the key data is not a valid {key_type} key") from None
    if isinstance(key, rsa.RSAPublicKey) and not RSA_MIN_BITS <= key.key_size <= RSA_MAX_BITS:
        raise OutOfBounds("public_key", f"an RSA key must have {RSA_MIN_BITS} to {RSA_MAX_BITS} bits, "
                                        f"this one has {key.key_size}")
    if key_type not in _SK_TYPES:
        # Encoded again from the parsed key: what is stored and fingerprinted is the key
        # itself, never bytes the parser skipped.
        canonical = key.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()
        if canonical.split(" ", 1)[0] != key_type:
            raise OutOfBounds("public_key", f"the key data is not an {key_type} key")
        blob = base64.b64decode(canonical.split(" ", 1)[1])
    # A security key's blob also names its application, which the parsed key lacks:
    # that blob (validated by the parse above) is the one OpenSSH fingerprints.
    line = " ".join([key_type, base64.b64encode(blob).decode(), *[c for c in comment if c]])
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return line, f"SHA256:{digest}"


def validate_public_key(text: str) -> str:
    """Return the normalised key line or raise (see parse_public_key)."""
    return parse_public_key(text)[0]


def evolve(key: SshKey | None, event: Event) -> SshKey | None:
    match event:
        case SshKeyAdded():
            return SshKey(id=event.key_id, owner=event.owner, name=event.name,
                          public_key=event.public_key, fingerprint=event.fingerprint)
        case SshKeyDeleted() if key is not None:
            return msgspec.structs.replace(key, deleted=True)
    return key


def decide(key: SshKey | None, command: Command) -> list[Event]:
    match command:
        case AddSshKey():
            check_name(command.name)
            line, print_ = parse_public_key(command.public_key)
            if key is not None and not key.deleted:
                raise Rejected(f"an SSH key named {command.name!r} already exists")
            return [SshKeyAdded(key_id=key_id_for(command.owner, command.name), owner=command.owner,
                                name=command.name, public_key=line, fingerprint=print_)]
        case DeleteSshKey():
            if key is None or key.deleted:
                raise NotFound(f"no SSH key named {command.name!r}")
            return [SshKeyDeleted(key_id=key.id)]
    raise Rejected(f"{type(command).__name__} is not an SSH key command")


def stream_name(key_id: UUID) -> str:
    return f"sshkey-{key_id}"
