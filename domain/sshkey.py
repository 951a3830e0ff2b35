"""SSH keys: a user's public keys, by name. Private keys never enter ucloud."""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import uuid
from uuid import UUID

import msgspec

from .errors import InvalidValue, NotFound, Rejected
from .events import Command, Event

SSHKEY_NAMESPACE = uuid.UUID("6f1f1d2e-8d53-4c1e-9a0e-4b2f5bd0c002")
_KEY_TYPES = {
    "ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com",
}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


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


def validate_public_key(text: str) -> str:
    """Return the normalised key line or raise InvalidValue('public_key', ...)."""
    if "PRIVATE KEY" in text:
        raise InvalidValue("public_key", "this is a private key; give the public key (.pub)")
    parts = text.strip().split()
    if len(parts) < 2 or parts[0] not in _KEY_TYPES:
        raise InvalidValue("public_key", "expected an OpenSSH public key like 'ssh-ed25519 AAAA... comment'")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidValue("public_key", "the key data is not valid base64") from None
    # The blob starts with the length-prefixed key type; it must match the first word.
    if len(blob) < 4 or blob[4 : 4 + int.from_bytes(blob[:4], "big")] != parts[0].encode():
        raise InvalidValue("public_key", f"the key data is not an {parts[0]} key")
    return " ".join(parts[:3])


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
            if not _NAME.match(command.name):
                raise InvalidValue("name", "use 1-64 letters, digits or _.@- (starting with a letter or digit)")
            line = validate_public_key(command.public_key)
            if key is not None and not key.deleted:
                raise Rejected(f"an SSH key named {command.name!r} already exists")
            return [SshKeyAdded(key_id=key_id_for(command.owner, command.name), owner=command.owner,
                                name=command.name, public_key=line, fingerprint=fingerprint(line))]
        case DeleteSshKey():
            if key is None or key.deleted:
                raise NotFound(f"no SSH key named {command.name!r}")
            return [SshKeyDeleted(key_id=key.id)]
    raise Rejected(f"{type(command).__name__} is not an SSH key command")


def stream_name(key_id: UUID) -> str:
    return f"sshkey-{key_id}"
