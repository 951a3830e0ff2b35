"""Event names, schema numbers and fields are frozen: the log outlives the code.

An event's tag is its name in the log forever; renaming or dropping one (or one of its
fields) would make old logs unreadable. This test holds the literal list. Adding an
event type means adding its line here; adding a field to an existing type is fine only
with a default (old events decode with it); changing a meaning takes a new schema number
and an upcaster, and this list records the new number."""

from __future__ import annotations

import msgspec

from ucloud.domain.catalogue import ALL_EVENT_TYPES, build_codec

# tag: (schema, fields as first recorded)
FROZEN: dict[str, tuple[int, tuple[str, ...]]] = {
    "vm.requested": (1, ('vm_id', 'owner', 'name', 'cores', 'ram', 'disk', 'image', 'ssh_keys', 'restart_policy')),
    "vm.scheduled": (1, ('vm_id', 'host_id')),
    "vm.unschedulable": (1, ('vm_id', 'reason')),
    "vm.start_requested": (1, ('vm_id',)),
    "vm.started": (1, ('vm_id', 'host_id', 'accelerator')),
    "vm.stop_requested": (1, ('vm_id',)),
    "vm.stopped": (1, ('vm_id', 'host_id', 'reason')),
    "vm.reboot_requested": (1, ('vm_id',)),
    "vm.rebooted": (1, ('vm_id', 'host_id')),
    "vm.crashed": (1, ('vm_id', 'host_id', 'reason')),
    "vm.failed": (1, ('vm_id', 'host_id', 'reason')),
    "vm.delete_requested": (1, ('vm_id',)),
    "vm.deleted": (1, ('vm_id', 'host_id')),
    "vm.host_lost": (1, ('vm_id', 'host_id', 'reason')),
    "host.registered": (1, ('host_id', 'hostname', 'cores', 'ram', 'disk', 'hypervisor')),
    "host.capacity_changed": (1, ('host_id', 'cores', 'ram', 'disk')),
    "host.capacity_claimed": (1, ('host_id', 'vm_id', 'cores', 'ram', 'disk')),
    "host.capacity_released": (1, ('host_id', 'vm_id')),
    "host.up": (1, ('host_id', 'session', 'lease_ttl')),
    "host.declared_dead": (1, ('host_id', 'session', 'evidence', 'by')),
    "host.maintenance_changed": (1, ('host_id', 'maintenance')),
    "host.evacuation_requested": (1, ('host_id',)),
    "host.removed": (1, ('host_id',)),
    "host.evacuated": (1, ('host_id', 'vms')),
    "sshkey.added": (1, ('key_id', 'owner', 'name', 'public_key', 'fingerprint')),
    "sshkey.deleted": (1, ('key_id',)),
    "admin.recovered": (1, ('admin_id', 'name', 'realm', 'created_user', 'reenabled', 'granted_realm', 'replaced_seed', 'machine')),
    "price.set": (1, ('resource', 'micros', 'currency', 'per', 'per_seconds', 'effective_from')),
    "account.configured": (1, ('owner', 'kind')),
    "account.credited": (1, ('owner', 'micros', 'currency', 'source', 'reference')),
    "coupon.created": (1, ('coupon_id', 'micros', 'currency', 'expires')),
    "coupon.redeemed": (1, ('coupon_id', 'owner')),
    "account.depleted": (1, ('owner', 'at', 'grace_seconds')),
    "account.suspended": (1, ('owner', 'reason', 'vm_ids')),
    "account.resumed": (1, ('owner', 'vm_ids')),
    "invoice.reminded": (1, ('owner', 'number', 'level', 'due', 'due_micros')),
    "payment.settled": (1, ('payment_id', 'provider', 'intent', 'owner', 'micros', 'currency')),
    "order.quoted": (1, ('order_id', 'owner', 'name', 'cores', 'ram', 'disk', 'image', 'ssh_keys',
                         'restart_policy', 'currency', 'per_hour', 'lines')),
    "order.confirmed": (1, ('order_id',)),
    "order.rejected": (1, ('order_id', 'reason')),
    "order.provisioned": (1, ('order_id', 'vm_id')),
    "order.cancelled": (1, ('order_id', 'reason')),
    "billing.period_closed": (1, ('period_start', 'period_end')),
    "invoice.issued": (1, ('number', 'owner', 'period_start', 'period_end', 'currency', 'lines', 'total',
                           'reference')),
    "vm.resized": (1, ('vm_id', 'cores', 'ram', 'disk')),
    "vm.disk_resized": (1, ('vm_id', 'host_id', 'disk', 'online')),
    "host.stores_declared": (1, ('host_id', 'stores')),
    "host.claim_changed": (1, ('host_id', 'vm_id', 'cores', 'ram', 'disk')),
    "host.credential_issued": (1, ('host_id', 'digest', 'by')),
    "file.appeared": (1, ('file_id', 'owner', 'name', 'size', 'sha256')),
    "file.changed": (1, ('file_id', 'size', 'sha256')),
    "file.removed": (1, ('file_id',)),
    "image.requested": (1, ('image_id', 'owner', 'name', 'public', 'store', 'file_id', 'file_name', 'file_size',
                            'file_sha256')),
    "image.import_progressed": (1, ('image_id', 'percent')),
    "image.imported": (1, ('image_id', 'virtual_size', 'stored_size', 'location')),
    "image.import_failed": (1, ('image_id', 'reason')),
    "image.used": (1, ('image_id', 'vm_id', 'vm_name')),
    "image.released": (1, ('image_id', 'vm_id')),
    "image.deleted": (1, ('image_id',)),
    "vm.nic_added": (1, ('vm_id', 'nic_id', 'network_id')),
    "vm.nic_allocated": (1, ('vm_id', 'nic_id', 'mac')),
    "vm.nic_removed": (1, ('vm_id', 'nic_id')),
    "network.requested": (1, ('network_id', 'owner', 'name', 'ipam')),
    "network.allocated": (1, ('network_id', 'vni', 'group', 'prefix')),
    "network.allocation_failed": (1, ('network_id', 'reason')),
    "network.port_added": (1, ('network_id', 'vm_id', 'nic_id')),
    "network.port_removed": (1, ('network_id', 'vm_id', 'nic_id')),
    "network.deleted": (1, ('network_id',)),
    "ipam.pool_configured": (1, ('pool',)),
    "ipam.claimed": (1, ('resource', 'holder')),
    "ipam.released": (1, ('resource', 'holder')),
}


def _current() -> dict[str, tuple[int, msgspec.inspect.StructType]]:
    result = {}
    for event_type in ALL_EVENT_TYPES:
        info = msgspec.inspect.type_info(event_type)
        assert isinstance(info, msgspec.inspect.StructType)
        tag = event_type.__struct_config__.tag
        assert isinstance(tag, str)
        result[tag] = (event_type.schema, info)
    return result


def test_no_event_type_was_renamed_or_dropped() -> None:
    current = _current()
    missing = sorted(set(FROZEN) - set(current))
    assert not missing, f"event types gone from the code (old logs hold them): {missing}"


def test_every_event_type_is_in_the_frozen_list() -> None:
    unlisted = sorted(set(_current()) - set(FROZEN))
    assert not unlisted, f"new event types: add them to FROZEN in this file: {unlisted}"


def test_schema_numbers_match_the_frozen_list() -> None:
    current = _current()
    changed = {tag: (FROZEN[tag][0], current[tag][0]) for tag in FROZEN
               if tag in current and current[tag][0] != FROZEN[tag][0]}
    assert not changed, f"schema numbers changed (frozen, now): {changed}; update FROZEN with an upcaster"


def test_no_recorded_field_was_renamed_or_dropped_and_new_fields_have_defaults() -> None:
    current = _current()
    for tag, (_, fields) in FROZEN.items():
        info = current[tag][1]
        names = {field.name: field for field in info.fields}
        assert set(fields) <= set(names), f"{tag}: fields gone: {sorted(set(fields) - set(names))}"
        added = [name for name in names if name not in fields and names[name].required]
        assert not added, f"{tag}: new fields need a default so old events still decode: {added}"


def test_an_upcaster_exists_for_every_schema_after_the_first() -> None:
    codec = build_codec()
    for tag, (schema, _) in FROZEN.items():
        for old in range(1, schema):
            assert codec.upcasts(tag, old), f"{tag}: no upcaster from schema {old}"
