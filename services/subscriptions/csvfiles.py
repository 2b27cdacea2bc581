"""Subscribers as CSV files for staff: the export and the import behind `bridgepost subscribers`.

The export is safe to open in a spreadsheet (no cell is read as a formula) and is itself a valid
import file: active subscribers carry their proof of consent, so moving subscribers to another
installation keeps them active, and pending ones get the double opt-in there.
"""

from __future__ import annotations

import csv
import getpass
import io
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TextIO

from pydantic import ValidationError
from sqlalchemy import select

from services.subscriptions import store
from services.subscriptions.domain import STATUSES, ImportedSubscriber
from services.subscriptions.usecases import RequestContext, Subscriptions
from shared.auth import Staff, audit
from shared.db import Database

LIST_COLUMNS = ("topics", "regions", "groups")
IMPORT_COLUMNS = ("email", "name", "language", "topics", "regions", "groups", "audience",
                  "consent_at", "consent_source", "consent_text_version", "consent_ip")
# The export's columns: an import reads `status` too, and ignores the informational rest.
EXPORT_COLUMNS = ("email", "name", "language", "topics", "regions", "groups", "audience", "status",
                  "consent_at", "consent_source", "consent_text_version",
                  "id", "created_at", "updated_at", "confirmed_at", "hard_bounces")
KNOWN_COLUMNS = frozenset(IMPORT_COLUMNS) | frozenset(EXPORT_COLUMNS)
IMPORTABLE_STATUSES = ("", "active", "pending")
# A cell starting with one of these is a formula to a spreadsheet (CSV injection): it gets a leading '.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
LIST_SEPARATOR = ";"
PAGE = 1000


def spreadsheet_safe(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def from_spreadsheet(value: str) -> str:
    """Undo `spreadsheet_safe`, so an exported file imports unchanged."""
    if value.startswith("'") and value[1:].startswith(FORMULA_START):
        return value[1:]
    return value


def actor() -> Staff:
    """Who runs a command-line action, for the audit log."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return Staff(key_id="command line", name=user[:150], role="admin")


# --- export -------------------------------------------------------------------------------------------------


def _iso(value: datetime | None) -> str:
    return value.isoformat() if value else ""


async def _consent_proofs(db: Database) -> dict[str, tuple[str, str | None]]:
    """Per subscriber, how consent was given: (source, consent text version) of the latest request or import."""
    c = store.consent_log
    proofs: dict[str, tuple[str, str | None]] = {}
    last_id = 0
    while True:
        # Page by page, each in a short transaction: on SQLite a transaction holds the write lock.
        async with db.sessions() as s:
            rows = (await s.execute(
                select(c.c.id, c.c.subscriber_id, c.c.action, c.c.source, c.c.consent_text_version, c.c.details)
                .where(c.c.action.in_(("requested", "imported")), c.c.id > last_id)
                .order_by(c.c.id).limit(PAGE))).all()
        for row in rows:
            if row.action == "imported":
                source = str((row.details or {}).get("consent_source") or "import")
            else:
                source = f"double opt-in ({row.source})"
            proofs[row.subscriber_id] = (source, row.consent_text_version)
        if len(rows) < PAGE:
            return proofs
        last_id = rows[-1].id


async def export_csv(db: Database, out: TextIO, statuses: Iterable[str] = (), staff: Staff | None = None) -> int:
    """Write subscribers (all but erased ones, or those with `statuses`) to `out`; returns how many."""
    s_ = store.subscribers
    wanted = [s for s in statuses if s != "erased"] or [s for s in STATUSES if s != "erased"]
    proofs = await _consent_proofs(db)
    writer = csv.writer(out)
    writer.writerow(EXPORT_COLUMNS)
    count = 0
    after: tuple[datetime, str] | None = None
    while True:
        query = select(s_).where(s_.c.status.in_(wanted), s_.c.email.is_not(None))
        if after is not None:
            query = query.where((s_.c.created_at > after[0]) | ((s_.c.created_at == after[0]) & (s_.c.id > after[1])))
        async with db.sessions() as s:
            rows = (await s.execute(query.order_by(s_.c.created_at, s_.c.id).limit(PAGE))).all()
        for row in rows:
            # Only an active subscriber's consent stands; a pending one must confirm (again).
            source, version = proofs.get(row.id, ("bridgepost", None)) if row.status == "active" else ("", None)
            values = {
                "email": row.email, "name": row.name or "", "language": row.language,
                **{c: LIST_SEPARATOR.join(getattr(row, c)) for c in LIST_COLUMNS},
                "audience": row.audience, "status": row.status,
                "consent_at": _iso(row.confirmed_at or row.created_at) if row.status == "active" else "",
                "consent_source": source, "consent_text_version": version or "",
                "id": row.id, "created_at": _iso(row.created_at), "updated_at": _iso(row.updated_at),
                "confirmed_at": _iso(row.confirmed_at), "hard_bounces": row.hard_bounces,
            }
            writer.writerow([spreadsheet_safe(values[c]) for c in EXPORT_COLUMNS])
        count += len(rows)
        if len(rows) < PAGE:
            break
        after = (rows[-1].created_at, rows[-1].id)
    async with db.transaction() as s:
        await audit(s, store.infra, staff or actor(), "subscribers.export", None, count=count, statuses=wanted)
    return count


# --- import -------------------------------------------------------------------------------------------------


class CsvProblem(ValueError):
    """The file as a whole cannot be imported (encoding, header); nothing was imported."""


@dataclass
class ImportSummary:
    active: int = 0
    confirmation: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    invalid: list[tuple[int, str]] = field(default_factory=list)
    groups_added: int = 0

    def lines(self) -> list[str]:
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(self.skipped.items()))
        return [
            f"imported active: {self.active}",
            f"confirmation requested: {self.confirmation}",
            f"skipped: {sum(self.skipped.values())}" + (f" ({reasons})" if reasons else ""),
            f"invalid: {len(self.invalid)}",
        ] + ([f"partner groups added: {self.groups_added}"] if self.groups_added else [])


def decode(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CsvProblem(f"the file is not UTF-8 (byte {exc.start}); save it as \"CSV UTF-8\"") from exc


def _header_name(cell: str) -> str:
    return re.sub(r"[\s-]+", "_", cell.strip().lower())


@dataclass(frozen=True)
class Row:
    line: int  # where the row starts in the file, as a spreadsheet shows it
    cells: dict[str, str]  # by column name
    problem: str | None = None


def read_rows(text: str) -> Iterator[Row]:
    """Every non-empty row; the delimiter (, ; or tab) is guessed from the header.
    Raises CsvProblem for a file that cannot be imported at all."""
    first = text.split("\n", 1)[0]
    delimiter = max((",", ";", "\t"), key=first.count)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = [_header_name(c) for c in next(reader)]
    except StopIteration:
        raise CsvProblem("the file is empty") from None
    except csv.Error as exc:
        raise CsvProblem(f"line 1: {exc}") from exc
    unknown = [c for c in header if c and c not in KNOWN_COLUMNS]
    if unknown:
        raise CsvProblem(f"unknown column(s) {', '.join(map(repr, unknown))}; known: {', '.join(IMPORT_COLUMNS)}"
                         f" (and the export's {', '.join(sorted(KNOWN_COLUMNS - set(IMPORT_COLUMNS)))})")
    duplicates = sorted({c for c in header if c and header.count(c) > 1})
    if duplicates:
        raise CsvProblem(f"column(s) given twice: {', '.join(duplicates)}")
    if "email" not in header:
        raise CsvProblem("the file has no 'email' column")
    line = reader.line_num
    while True:
        start = line + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise CsvProblem(f"line {start}: {exc}") from exc
        line = reader.line_num
        if not any(c.strip() for c in cells):
            continue
        row = {name: cells[i].strip() if i < len(cells) else "" for i, name in enumerate(header) if name}
        extra = any(c.strip() for c in cells[len(header):])
        yield Row(start, row, f"{len(cells)} cells but {len(header)} columns" if extra else None)


def parse_row(cells: dict[str, str]) -> ImportedSubscriber:
    """The row's subscriber (validated like a sign-up); raises ValidationError or ValueError."""
    status = cells.get("status", "")
    if status not in STATUSES and status not in IMPORTABLE_STATUSES:
        raise ValueError(f"status: one of {', '.join(STATUSES)}, or empty")
    data: dict[str, Any] = {}
    for column in IMPORT_COLUMNS:
        value = from_spreadsheet(cells.get(column, ""))
        if column in LIST_COLUMNS:
            data[column] = [v for v in re.split(r"[;,|\s]+", value) if v]
        elif value:
            data[column] = value
    if "email" not in data:
        data["email"] = ""
    if status == "pending" and any(data.get(c) for c in ("consent_at", "consent_source")):
        raise ValueError("status: a pending subscriber has no proof of consent yet")
    return ImportedSubscriber.model_validate(data)


def describe(exc: Exception) -> str:
    """What is wrong with a row, field by field, without repeating its content."""
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in e['loc'] if not isinstance(p, int)) or 'row'}: {e['msg']}"
                         for e in exc.errors(include_input=False, include_url=False))
    return str(exc)


async def import_csv(subscriptions: Subscriptions, text: str, staff: Staff | None = None) -> ImportSummary:
    """Import every valid row of a CSV file; invalid ones are reported with their line number."""
    summary = ImportSummary()
    ctx = RequestContext(ip=None, user_agent=None, source="import")
    seen: set[str] = set()
    for row in list(read_rows(text)):  # the whole file is read first: a broken one imports nothing
        status = row.cells.get("status", "")
        if status in STATUSES and status not in IMPORTABLE_STATUSES:
            # An exported unsubscribed, suppressed or erased subscriber is not brought back.
            summary.skipped[status] += 1
            continue
        try:
            if row.problem:
                raise ValueError(row.problem)
            sub = parse_row(row.cells)
        except (ValidationError, ValueError) as exc:
            summary.invalid.append((row.line, describe(exc)))
            continue
        if sub.email in seen:
            summary.skipped["repeated in the file"] += 1
            continue
        seen.add(sub.email)
        outcome = await subscriptions.import_subscriber(sub, ctx)
        summary.groups_added += outcome.groups_added
        if outcome.result == "active":
            summary.active += 1
        elif outcome.result == "confirmation":
            summary.confirmation += 1
        else:
            summary.skipped[outcome.reason] += 1
    async with subscriptions.db.transaction() as s:
        await audit(s, store.infra, staff or actor(), "subscribers.import", None, active=summary.active,
                    confirmation=summary.confirmation, skipped=sum(summary.skipped.values()),
                    invalid=len(summary.invalid))
    return summary
