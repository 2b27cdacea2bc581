"""SQLite for SQLAlchemy's async engine, run on the event loop's own thread.

aiosqlite runs every call on the SQLite connection in a thread of its own and hands each result back to
the event loop, and SQLAlchemy's adapter makes one such call per cursor operation: a SELECT costs four
hand-overs (open a cursor, execute, fetch, close), a transaction two more (BEGIN, COMMIT), a session's
return to the pool one more (its reset). Each is a queue put, a thread wake-up, a wake-up of the event loop
and, on a busy process, a wait of up to the interpreter's switch interval (5 ms) for the GIL. Counted under
200 sign-ups/s: about 15 per sign-up in the subscriptions service and as many per mail in the mailer,
costing more CPU than SQLite needs for the statements themselves.

Our statements are short (by key, a batch of rows, a page), so this driver runs them where SQLAlchemy
calls them, on the loop's thread, with the standard library's `sqlite3`. The one thing that may take
long is waiting for another process's write lock (`BEGIN IMMEDIATE` while a CLI command or another
instance writes): the connection never waits inline (`busy_timeout` 0). A statement refused with
SQLITE_BUSY is run again in a worker thread that may wait up to the connect timeout, exactly what
SQLite's own busy handler would have done, while the loop goes on serving.

Used by `shared.db.create_engine` for every `sqlite+aiosqlite` URL (the `module` a dialect takes instead
of importing its DBAPI); the dialect stays SQLAlchemy's aiosqlite dialect.
"""

from __future__ import annotations

import asyncio
import collections
import sqlite3
import threading
import time
from typing import Any

import aiosqlite
from sqlalchemy.dialects.sqlite.aiosqlite import AsyncAdapt_aiosqlite_dbapi
from sqlalchemy.engine.interfaces import AdaptedConnection
from sqlalchemy.util.concurrency import await_

# How long SQLite's busy handler waits at a time before the waiting thread checks whether it should go on.
WAIT_STEP_MS = 50


def _busy(error: sqlite3.OperationalError) -> bool:
    return (getattr(error, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_BUSY


class InlineSQLite(sqlite3.Connection):
    """The `sqlite3` connection: never waits for a lock on the calling thread (busy_timeout 0)."""

    lock_timeout: float = 30.0

    def run(self, sql: str, parameters: Any, many: bool) -> tuple[Any, list[Any], int, Any]:
        """One statement, its rows fetched: (description, rows, rowcount, lastrowid)."""
        # Through a coroutine that finishes without suspending, unless it has to wait for the lock:
        # SQLAlchemy's async layer insists that a statement awaits, and this await costs a greenlet
        # switch, not a pass through the event loop.
        return await_(self._call(self._run, sql, parameters, many))

    def commit(self) -> None:
        await_(self._call(super().commit))

    async def _call(self, call: Any, *args: Any) -> Any:
        """`call(*args)` here; refused with SQLITE_BUSY, again in a worker thread that waits for the lock."""
        changes = self.total_changes
        try:
            return call(*args)
        except sqlite3.OperationalError as error:
            # Refused, a statement changed nothing, and running it again is what SQLite's busy handler
            # does. An executemany refused after some of its rows were written would write those twice.
            if not _busy(error) or self.total_changes != changes:
                raise
        return await self._waiting(call, *args)

    def _run(self, sql: str, parameters: Any, many: bool) -> tuple[Any, list[Any], int, Any]:
        cursor = sqlite3.Connection.cursor(self)
        try:
            if many:
                cursor.executemany(sql, parameters)
            elif parameters is None:
                cursor.execute(sql)
            else:
                cursor.execute(sql, parameters)
            description = cursor.description
            return description, cursor.fetchall() if description else [], cursor.rowcount, cursor.lastrowid
        finally:
            cursor.close()

    async def _waiting(self, call: Any, *args: Any) -> Any:
        """`call` again in a worker thread until SQLite gives it the lock or `lock_timeout` has passed."""
        given_up = threading.Event()

        def wait() -> Any:
            deadline = time.monotonic() + self.lock_timeout
            self._pragma(f"PRAGMA busy_timeout={WAIT_STEP_MS}")  # SQLite's busy handler, in short steps
            try:
                while True:
                    changes = self.total_changes
                    try:
                        return call(*args)
                    except sqlite3.OperationalError as error:
                        if (not _busy(error) or self.total_changes != changes or given_up.is_set()
                                or time.monotonic() > deadline):
                            raise
            finally:
                self._pragma("PRAGMA busy_timeout=0")

        waiting = asyncio.ensure_future(asyncio.to_thread(wait))
        cancelled = False
        while not waiting.done():
            try:
                await asyncio.shield(waiting)
            except asyncio.CancelledError:
                # The thread is using the connection, and whoever cancelled us may close it next
                # (SQLAlchemy does): closed under the thread's feet, it crashes the process. So the
                # thread stops waiting at its next step, and we give up after it.
                cancelled = True
                given_up.set()
            except Exception:  # noqa: BLE001 - the thread's outcome, raised below
                pass
        if cancelled:
            raise asyncio.CancelledError
        return waiting.result()

    def _pragma(self, pragma: str) -> None:
        sqlite3.Connection.execute(self, pragma).close()


class InlineCursor:
    """A buffered DBAPI cursor: `execute` runs the statement and fetches its rows at once."""

    __slots__ = ("_connection", "description", "rowcount", "lastrowid", "arraysize", "_rows")
    server_side = False

    def __init__(self, connection: InlineSQLite) -> None:
        self._connection = connection
        self.description: Any = None
        self.rowcount, self.lastrowid, self.arraysize = -1, None, 1
        self._rows: collections.deque[Any] = collections.deque()

    def execute(self, operation: str, parameters: Any = None) -> None:
        self.description, rows, self.rowcount, self.lastrowid = self._connection.run(operation, parameters, False)
        self._rows = collections.deque(rows)

    def executemany(self, operation: str, seq_of_parameters: Any) -> None:
        self.description, rows, self.rowcount, self.lastrowid = self._connection.run(
            operation, list(seq_of_parameters), True)
        self._rows = collections.deque(rows)

    async def _async_soft_close(self) -> None:
        """(SQLAlchemy's async layer closes a driver's cursor here; the rows are already in memory.)"""

    def close(self) -> None:
        self._rows.clear()

    def fetchone(self) -> Any:
        return self._rows.popleft() if self._rows else None

    def fetchmany(self, size: int | None = None) -> list[Any]:
        n = min(size or self.arraysize, len(self._rows))
        return [self._rows.popleft() for _ in range(n)]

    def fetchall(self) -> list[Any]:
        rows = list(self._rows)
        self._rows.clear()
        return rows

    def __iter__(self) -> Any:
        while self._rows:
            yield self._rows.popleft()

    def setinputsizes(self, *sizes: Any) -> None:
        pass

    def setoutputsize(self, size: Any, column: Any = None) -> None:
        pass


class InlineConnection(AdaptedConnection):
    """What SQLAlchemy's aiosqlite dialect expects of a connection, with plain `sqlite3` calls inside."""

    __slots__ = ("dbapi",)

    def __init__(self, dbapi: InlineDBAPI, connection: InlineSQLite) -> None:
        self.dbapi = dbapi
        self._connection = connection

    @property
    def isolation_level(self) -> str | None:
        return self._connection.isolation_level

    @isolation_level.setter
    def isolation_level(self, value: str | None) -> None:
        self._connection.isolation_level = value

    def create_function(self, *args: Any, **kw: Any) -> None:
        self._connection.create_function(*args, **kw)

    def cursor(self, server_side: bool = False) -> InlineCursor:
        return InlineCursor(self._connection)

    def execute(self, operation: Any, parameters: Any = None) -> InlineCursor:
        cursor = InlineCursor(self._connection)
        cursor.execute(operation, parameters)
        return cursor

    def commit(self) -> None:
        self._connection.commit()

    def rollback(self) -> None:
        self._connection.rollback()  # nothing sent when no transaction is open

    def close(self) -> None:
        self._connection.close()

    def terminate(self) -> None:
        self._connection.close()


class InlineDBAPI(AsyncAdapt_aiosqlite_dbapi):
    """The `module` for `create_async_engine` with a `sqlite+aiosqlite` URL."""

    def __init__(self) -> None:
        super().__init__(aiosqlite, sqlite3)
        self.has_stop = True  # terminate() closes the connection

    def connect(self, *args: Any, **kw: Any) -> InlineConnection:  # type: ignore[override]
        lock_timeout = float(kw.pop("timeout", InlineSQLite.lock_timeout))
        kw.pop("async_creator_fn", None)
        kw.update(timeout=0, check_same_thread=False, factory=InlineSQLite)
        connection = sqlite3.connect(*args, **kw)
        connection.lock_timeout = lock_timeout
        return InlineConnection(self, connection)

