"""The campaign hand-over in isolation: CPU per group of mails, against the cost of one statement.

Each SMTP connection of a campaign takes its next group (`MAILER_CAMPAIGN_HANDOVER_SIZE` mails) in one
transaction that also records the previous group's answers (`Campaigns._record` and `Campaigns._take`).
This script runs exactly that loop in-process — no broker, no SMTP, no rendering — over a ledger of
`--recipients` pending rows of one sending campaign in a fresh database, batch by batch as the batches'
jobs drain them (`MAILER_CAMPAIGN_BATCH_SIZE`, 200), until the ledger is empty, and
prints the CPU time per group and per mail. The reference measured in the same run is one `SELECT 1`
through the same engine and session (a statement's round trip through SQLAlchemy and the driver), so the
hand-over's cost reads as "so many statements".

    .venv/bin/python bench/handover.py                      # SQLite, 20,000 recipients, groups of 25
    .venv/bin/python bench/handover.py --size 100
    .venv/bin/python bench/handover.py --database postgres  # a fresh database on PostgreSQL

Nothing is written to bench/results: this is the magnifying glass for docs/performance.md, not a target.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import DEFAULT_POSTGRES_URL, postgres_databases  # noqa: E402
from sqlalchemy import insert, select, text  # noqa: E402

from services.mailer import store  # noqa: E402
from services.mailer.campaigns import Campaigns, Outcome  # noqa: E402
from services.mailer.settings import MailerSettings  # noqa: E402
from shared.db import Database, utcnow  # noqa: E402

LANGUAGES = ("de", "en", "ar", "fa", "tr", "uk", "ru")


async def seed(db: Database, recipients: int, batch_size: int) -> tuple[str, dict[str, str]]:
    """A sending campaign with `recipients` pending ledger rows; (its id, each subscriber's address)."""
    async with db.engine.begin() as conn:
        await conn.run_sync(store.metadata.create_all)
    now = utcnow()
    campaign_id = str(uuid.uuid4())
    addresses: dict[str, str] = {}
    async with db.transaction() as s:
        await s.execute(insert(store.campaigns).values(
            id=campaign_id, kind="newsletter", status="sending", segment={}, subject={"de": "Hallo"},
            body_markdown={"de": "Hallo {{ name }}"}, created_at=now, updated_at=now, started_at=now))
        for offset in range(0, recipients, 1000):
            ids = [str(uuid.uuid4()) for _ in range(min(1000, recipients - offset))]
            addresses.update((sid, f"r{offset + i}@example.org") for i, sid in enumerate(ids))
            await s.execute(insert(store.audience), [
                {"subscriber_id": sid, "email": addresses[sid], "name": f"Name {offset + i}",
                 "language": LANGUAGES[i % 7], "topics": ["events"], "regions": ["berlin"],
                 "audience": "public", "groups": [], "status": "active", "manage_token": "t" * 40,
                 "updated_at": now} for i, sid in enumerate(ids)])
            await s.execute(insert(store.campaign_deliveries), [
                {"campaign_id": campaign_id, "subscriber_id": sid, "batch": (offset + i) // batch_size,
                 "status": "pending", "attempts": 0, "next_attempt_at": now} for i, sid in enumerate(ids)])
    return campaign_id, addresses


async def statement_cost(db: Database, n: int) -> float:
    """CPU seconds of one extra `SELECT 1` inside a transaction."""
    async with db.transaction() as s:
        for _ in range(50):
            await s.execute(text("SELECT 1"))
        start = time.process_time()
        for _ in range(n):
            await s.execute(text("SELECT 1"))
        return (time.process_time() - start) / n


async def hand_over(db: Database, settings: MailerSettings, campaign_id: str,
                    addresses: dict[str, str]) -> tuple[int, int, float, float]:
    """Take groups until none are left, recording each as sent; (groups, mails, CPU s, wall s). Each row
    taken must come with its own recipient's address."""
    campaigns = Campaigns(db, renderer=None, settings=settings, pool=None, limiter=None)
    groups = mails = 0
    cpu, wall = time.process_time(), time.perf_counter()
    for batch in range(-(-len(addresses) // settings.campaign_batch_size)):  # as the batch's job drains it
        params = {"w_campaign": campaign_id, "w_batch": batch}
        outcome = Outcome()
        while True:
            async with db.transaction() as s:
                await campaigns._record(s, outcome)
                rows = await campaigns._take(s, "batch", params, settings.campaign_handover_size, "sending")
            if not rows:
                break
            wrong = [row for row in rows if row.email != addresses[row.subscriber_id]]
            assert not wrong, f"{len(wrong)} row(s) taken with another recipient's address"
            groups += 1
            mails += len(rows)
            outcome = Outcome(sent=[(row, f"<{row.subscriber_id}@bench>") for row in rows])
    return groups, mails, time.process_time() - cpu, time.perf_counter() - wall


async def run(args: argparse.Namespace, url: str) -> None:
    settings = MailerSettings(database_url=url, campaign_handover_size=args.size)
    db = Database(url)
    try:
        campaign_id, addresses = await seed(db, args.recipients, settings.campaign_batch_size)
        groups, mails, cpu, wall = await hand_over(db, settings, campaign_id, addresses)
        async with db.sessions() as s:
            sent = await s.scalar(select(store.campaign_deliveries.c.subscriber_id).where(
                store.campaign_deliveries.c.status != "sent").limit(1))
        statement = await statement_cost(db, 2000)
    finally:
        await db.dispose()
    assert mails == args.recipients and sent is None, (mails, sent)
    per_group = cpu / groups
    print(f"{args.database}: {mails:,} mails in {groups:,} groups of {args.size} — "
          f"{per_group * 1e3:.2f} ms CPU per group, {cpu / mails * 1e6:.0f} µs per mail, wall {wall:.2f} s")
    print(f"  reference: one SELECT 1 through the same engine {statement * 1e6:.0f} µs CPU; "
          f"a hand-over costs {per_group / statement:.1f} of those")


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    p.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL)
    p.add_argument("--recipients", type=int, default=20_000)
    p.add_argument("--size", type=int, default=25, help="MAILER_CAMPAIGN_HANDOVER_SIZE (default 25)")
    p.add_argument("--uvloop", action=argparse.BooleanOptionalAction, default=True,
                   help="run on uvloop as the services do (default on)")
    args = p.parse_args()
    if args.database == "sqlite":
        with tempfile.TemporaryDirectory() as folder:
            await run(args, f"sqlite+aiosqlite:///{folder}/mailer.db")
    else:
        async with postgres_databases(args.postgres_url, ["bench_handover"]) as urls:
            await run(args, urls["bench_handover"])


if __name__ == "__main__":
    args_uvloop = "--no-uvloop" not in sys.argv
    if args_uvloop:
        import uvloop
        uvloop.run(main())
    else:
        asyncio.run(main())
