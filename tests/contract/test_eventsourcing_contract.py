"""The eventsourcing library's own recorder test cases, unchanged, on our stores.

Every test method of the library's AggregateRecorderTestCase, ApplicationRecorderTestCase
(including its optional subscription test), TrackingRecorderTestCase,
ProcessRecorderTestCase, NonInterleavingNotificationIDsBaseCase and
InfrastructureFactoryTestCase runs against ucloud.eventstore.eventsourcing_recorders on
a real etcd (tests/support/etcd.py) and on SQLite. Each test gets a fresh store: a new
etcd key prefix or a new SQLite file.

The library's base classes are reached through the module, never imported by name:
pytest collects every unittest.TestCase in a module's namespace.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, ClassVar

import pytest
from eventsourcing.persistence import (
    AggregateRecorder,
    ApplicationRecorder,
    ProcessRecorder,
    TrackingRecorder,
)
from eventsourcing.tests import persistence as library
from eventsourcing.utils import Environment

from tests.support.etcd import MAX_TXN_OPS, EtcdCluster
from ucloud.eventstore.etcd import EtcdEventStore
from ucloud.eventstore.eventsourcing_recorders import (
    BlockingEventStore,
    UcloudAggregateRecorder,
    UcloudApplicationRecorder,
    UcloudFactory,
    UcloudProcessRecorder,
    UcloudTrackingRecorder,
)
from ucloud.eventstore.sqlite import SqliteEventStore

MODULE = "ucloud.eventstore.eventsourcing_recorders"


def unique_prefix() -> str:
    return f"/es-contract-{uuid.uuid4().hex[:12]}/v1"


class OnOurStore:
    """Gives each test a fresh store of ``backend``, closed when the test ends."""

    backend: ClassVar[str]
    addCleanup: Any  # from unittest.TestCase

    @pytest.fixture(autouse=True)
    def _real_backend(self, request: pytest.FixtureRequest, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.etcd: EtcdCluster | None = request.getfixturevalue("etcd") if self.backend == "etcd" else None

    def store_url(self) -> str:
        if self.etcd is not None:
            return f"etcd://{','.join(self.etcd.endpoints)}{unique_prefix()}?max_txn_ops={MAX_TXN_OPS}"
        return f"sqlite://{self.tmp_path / f'{uuid.uuid4().hex}.sqlite'}"

    def open_store(self) -> BlockingEventStore:
        if self.etcd is not None:
            endpoints, prefix = self.etcd.endpoints, unique_prefix()
            bridge = BlockingEventStore(lambda: EtcdEventStore(endpoints, prefix=prefix, max_txn_ops=MAX_TXN_OPS))
        else:
            path = self.tmp_path / f"{uuid.uuid4().hex}.sqlite"
            bridge = BlockingEventStore(lambda: SqliteEventStore(path))
        self.addCleanup(bridge.close)
        return bridge


class OnSqlite(OnOurStore):
    backend = "sqlite"


@pytest.mark.etcd
class OnEtcd(OnOurStore):
    backend = "etcd"


# -- the library's test cases, one class per (case, backend) ------------------------


class AggregateRecorderCase(library.AggregateRecorderTestCase, OnOurStore):
    __test__ = False  # collected through the Test* classes below

    def create_recorder(self) -> AggregateRecorder:
        return UcloudAggregateRecorder(self.open_store())


class ApplicationRecorderCase(library.ApplicationRecorderTestCase[UcloudApplicationRecorder], OnOurStore):
    __test__ = False  # collected through the Test* classes below

    def create_recorder(self) -> UcloudApplicationRecorder:
        return UcloudApplicationRecorder(self.open_store())

    def test_insert_subscribe(self) -> None:
        # Optional in the library (not every recorder can subscribe); ours can.
        self.optional_test_insert_subscribe()


class TrackingRecorderCase(library.TrackingRecorderTestCase, OnOurStore):
    __test__ = False  # collected through the Test* classes below

    def create_recorder(self) -> TrackingRecorder:
        return UcloudTrackingRecorder(self.open_store())


class ProcessRecorderCase(library.ProcessRecorderTestCase, OnOurStore):
    __test__ = False  # collected through the Test* classes below

    def create_recorder(self) -> ProcessRecorder:
        return UcloudProcessRecorder(self.open_store())


class NonInterleavingCase(library.NonInterleavingNotificationIDsBaseCase, OnOurStore):
    __test__ = False  # collected through the Test* classes below

    def create_recorder(self) -> ApplicationRecorder:
        return UcloudApplicationRecorder(self.open_store())


class TrackingRecorderSubclass(UcloudTrackingRecorder):
    """For the factory test: a tracking recorder class named by argument or topic."""


class InfrastructureFactoryCase(library.InfrastructureFactoryTestCase[UcloudFactory], OnOurStore):
    __test__ = False  # collected through the Test* classes below

    def setUp(self) -> None:
        self.env = Environment("TestCase", {"PERSISTENCE_MODULE": MODULE, "UCLOUD_STORE_URL": self.store_url()})
        super().setUp()

    def expected_factory_class(self) -> type[UcloudFactory]:
        return UcloudFactory

    def expected_aggregate_recorder_class(self) -> type[AggregateRecorder]:
        return UcloudAggregateRecorder

    def expected_application_recorder_class(self) -> type[ApplicationRecorder]:
        return UcloudApplicationRecorder

    def expected_tracking_recorder_class(self) -> type[TrackingRecorder]:
        return UcloudTrackingRecorder

    def tracking_recorder_subclass(self) -> type[TrackingRecorder]:
        return TrackingRecorderSubclass

    def expected_process_recorder_class(self) -> type[ProcessRecorder]:
        return UcloudProcessRecorder


class TestAggregateRecorderOnSqlite(AggregateRecorderCase, OnSqlite):
    __test__ = True


class TestAggregateRecorderOnEtcd(AggregateRecorderCase, OnEtcd):
    __test__ = True


class TestApplicationRecorderOnSqlite(ApplicationRecorderCase, OnSqlite):
    __test__ = True


class TestApplicationRecorderOnEtcd(ApplicationRecorderCase, OnEtcd):
    __test__ = True


class TestTrackingRecorderOnSqlite(TrackingRecorderCase, OnSqlite):
    __test__ = True


class TestTrackingRecorderOnEtcd(TrackingRecorderCase, OnEtcd):
    __test__ = True


class TestProcessRecorderOnSqlite(ProcessRecorderCase, OnSqlite):
    __test__ = True


class TestProcessRecorderOnEtcd(ProcessRecorderCase, OnEtcd):
    __test__ = True


class TestNonInterleavingNotificationIdsOnSqlite(NonInterleavingCase, OnSqlite):
    __test__ = True


class TestNonInterleavingNotificationIdsOnEtcd(NonInterleavingCase, OnEtcd):
    __test__ = True


class TestInfrastructureFactoryOnSqlite(InfrastructureFactoryCase, OnSqlite):
    __test__ = True


class TestInfrastructureFactoryOnEtcd(InfrastructureFactoryCase, OnEtcd):
    __test__ = True
