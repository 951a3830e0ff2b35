"""Invoices: closed billing periods and the numbered invoices issued for them.

Numbering is gap-free per installation by construction: every ``invoice.issued`` is
appended to the one ``invoices`` stream, its number is the version it takes there, and
an append states the version it expects (optimistic concurrency). Two billing processes
can therefore never give two invoices one number, skip a number, or invoice an
(owner, period) twice: the loser's append conflicts, it folds the winner's invoices and
decides again.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from uuid import UUID

import msgspec

from .events import Event

INVOICES_ID = uuid.UUID("6f1f1d2e-8d53-4c1e-9a0e-4b2f5bd0c013")
PERIODS_ID = uuid.UUID("6f1f1d2e-8d53-4c1e-9a0e-4b2f5bd0c014")
INVOICES_STREAM = "invoices"
PERIODS_STREAM = "billing-periods"


class InvoiceLine(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One resource of one VM at one price version: ``quantity_seconds`` (core-seconds,
    byte-seconds) at ``micros`` per ``per_seconds`` per ``quantum``; ``amount`` in micros."""

    vm_id: UUID
    vm_name: str
    resource: str
    price_version: int
    quantity_seconds: int
    micros: int
    per: str
    per_seconds: int
    quantum: int
    amount: int


class PeriodClosed(Event, tag="billing.period_closed", frozen=True):
    """Usage up to ``period_end`` is final (what runs across it is cut there).

    Late events about earlier seconds count from ``period_end`` on."""

    period_start: datetime
    period_end: datetime


class InvoiceIssued(Event, tag="invoice.issued", frozen=True):
    """An owner's usage in a closed period, numbered gap-free (the version in ``invoices``)."""

    number: int
    owner: str
    period_start: datetime
    period_end: datetime
    currency: str
    lines: tuple[InvoiceLine, ...]
    total: int  # micros: the sum of the lines' amounts
    reference: str = ""  # for a bank transfer: quote it and the payment finds the invoice


INVOICE_EVENT_TYPES: tuple[type[Event], ...] = (PeriodClosed, InvoiceIssued)


def reference_for(number: int) -> str:
    """The payment reference printed on an invoice (bank transfers quote it)."""
    check = sum((i + 1) * int(d) for i, d in enumerate(str(number))) % 97
    return f"UC-{number:06d}-{check:02d}"
