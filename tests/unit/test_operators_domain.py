"""The admin account aggregate: a recovery becomes one admin.recovered event, no secret."""

from __future__ import annotations

import pytest

from ucloud.domain.errors import InvalidValue
from ucloud.domain.operators import (
    AdminRecovered,
    RecordAdminRecovery,
    admin_id_for,
    decide,
    evolve,
    stream_name,
)


def command(**changes: object) -> RecordAdminRecovery:
    fields: dict[str, object] = {"name": "admin", "realm": "ucloud-admin", "created_user": False, "reenabled": True,
                                 "granted_realm": False, "replaced_seed": True, "machine": "vm1"}
    return RecordAdminRecovery(**{**fields, **changes})  # type: ignore[arg-type]


def test_a_recovery_is_recorded_with_what_changed_and_counted() -> None:
    [event] = decide(None, command())
    assert event == AdminRecovered(admin_id=admin_id_for("admin"), name="admin", realm="ucloud-admin",
                                   created_user=False, reenabled=True, granted_realm=False, replaced_seed=True,
                                   machine="vm1")
    account = evolve(evolve(None, event), event)
    assert account is not None and account.recoveries == 2 and account.name == "admin"
    assert stream_name(admin_id_for("admin")) == f"admin-{admin_id_for('admin')}"
    assert admin_id_for("admin") != admin_id_for("ops")


@pytest.mark.parametrize("field, value", [("name", ""), ("realm", "a\nb"), ("machine", "x" * 257)])
def test_unprintable_or_empty_names_are_refused_naming_the_field(field: str, value: str) -> None:
    with pytest.raises(InvalidValue) as error:
        decide(None, command(**{field: value}))
    assert error.value.field == field
