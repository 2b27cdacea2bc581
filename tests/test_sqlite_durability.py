"""How durable a SQLite database is: `?synchronous=` on its URL (shared/db.py, docs/deployment.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text

from shared.db import Database, migrate

MAILER_MIGRATIONS = Path(__file__).resolve().parent.parent / "services" / "mailer" / "migrations"


async def pragmas(url: str) -> tuple[str, int]:
    db = Database(url)
    try:
        async with db.transaction() as s:
            await s.execute(text("CREATE TABLE IF NOT EXISTS probe (id INTEGER PRIMARY KEY)"))
            await s.execute(text("INSERT INTO probe DEFAULT VALUES"))
        async with db.sessions() as s:
            return (await s.scalar(text("PRAGMA journal_mode")), await s.scalar(text("PRAGMA synchronous")))
    finally:
        await db.dispose()


async def test_the_default_is_wal_with_normal_sync(tmp_path: Path) -> None:
    assert await pragmas(f"sqlite+aiosqlite:///{tmp_path}/a.db") == ("wal", 1)


async def test_synchronous_full_on_the_url_fsyncs_every_commit_and_keeps_the_path(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/data/b.db?synchronous=full"
    assert await pragmas(url) == ("wal", 2)
    assert sorted(p.name for p in (tmp_path / "data").iterdir() if p.suffix == ".db") == ["b.db"]
    await migrate(url, MAILER_MIGRATIONS)  # the services' migrations take the same URL


async def test_an_unknown_synchronous_mode_is_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"synchronous=off in the SQLite URL: use one of normal, full, extra"):
        Database(f"sqlite+aiosqlite:///{tmp_path}/c.db?synchronous=off")
