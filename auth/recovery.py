"""Recovery for a locked-out operator: a fresh admin identity, made on the server.

Whoever can read and write the state dir of ``ucloud up`` (root, or the service's own
user) already holds every seed, so letting them enrol an admin adds no power; it only
means that nobody who runs the server can be locked out of it. ``recover_admin``:

* finds the admin to recover: ``name``, else the first admin this state dir made
  (``bootstrap/first-admin`` in the secret store), else ``admin``;
* with the built-in directory, adds that user if missing, enables them if disabled and
  grants the admin realm if not granted; with LDAP (no ``users.json``) it changes
  nothing there (the user must exist, be enabled and be granted the realm in LDAP);
* enrols a fresh seed in the admin realm, replacing any older one.

It returns what it did, with the new enrolment, for the CLI to store and to record in
the log (``admin.recovered``, no secret). The files keep their rules (0600, owner,
atomic writes, locks), so a running gateway sees the change at its next request.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import FIRST_ADMIN, FIRST_ADMIN_MARK
from .directory import BuiltinDirectory, UnknownUser
from .otp import Enrolment, enrol
from .realms import Realms
from .secrets import FileSecretStore, Secret, otp_key

__all__ = ["Recovery", "RecoveryError", "recover_admin"]

USERS = "users.json"
SECRETS = "secrets.json"


class RecoveryError(Exception):
    """Recovery cannot run here (no state dir of ucloud, unusable files)."""


@dataclass(frozen=True)
class Recovery:
    name: str
    realm: str
    enrolment: Enrolment  # holds the seed: show or store it once, never log it
    builtin_directory: bool  # False: users live in LDAP and were not touched
    created_user: bool
    reenabled: bool
    granted_realm: bool
    replaced_seed: bool


async def recover_admin(state_dir: Path, name: str | None = None, realms: Realms | None = None) -> Recovery:
    realms = realms or Realms()
    users_path, secrets_path = state_dir / USERS, state_dir / SECRETS
    if not users_path.exists() and not secrets_path.exists():
        raise RecoveryError(f"{state_dir} holds no ucloud state ({USERS}, {SECRETS}): give the --state-dir "
                            f"that `ucloud up` uses")
    secrets = FileSecretStore(secrets_path)
    try:
        if name is None:
            first = await secrets.get(FIRST_ADMIN_MARK)
            name = first.reveal() if first is not None else FIRST_ADMIN
        created = reenabled = granted = False
        builtin = users_path.exists()
        if builtin:
            directory = BuiltinDirectory(users_path, default_realms=(realms.user,))
            try:
                user = directory.get(name)
            except UnknownUser:
                user = directory.add_user(name, "administrator (recovered)", realms=[realms.user, realms.admin])
                created = True
            if not user.enabled:
                user = directory.enable_user(user.name)
                reenabled = True
            if user.realms is not None and realms.admin not in user.realms:
                user = directory.set_realms(user.name, {*user.realms, realms.admin})
                granted = True
            name = user.name
        replaced = await secrets.get(otp_key(realms.admin, name)) is not None
        enrolment = await enrol(secrets, name, realms.admin, replace=True)
        # A state dir whose first admin was never made (an LDAP user missing at the first
        # start) must not make one later on top of this recovery.
        await secrets.put_new(FIRST_ADMIN_MARK, Secret(name))
    finally:
        await secrets.close()
    return Recovery(name=name, realm=realms.admin, enrolment=enrolment, builtin_directory=builtin,
                    created_user=created, reenabled=reenabled, granted_realm=granted, replaced_seed=replaced)
