"""docs/ stays true: the event catalogue is generated from the code."""

from __future__ import annotations

from pathlib import Path

from ucloud.domain.catalogue import markdown

ROOT = Path(__file__).resolve().parents[2]


def test_event_catalogue_lists_every_event_with_its_fields() -> None:
    written = (ROOT / "docs" / "events.md").read_text()
    assert written.strip() == markdown().strip(), "run: python -m ucloud.domain.catalogue > docs/events.md"
