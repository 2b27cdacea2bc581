"""Group commit of the public sign-ups: one writer task per process admits concurrent sign-ups together.

A sign-up on its own is a write transaction of several statements, and on SQLite (one writer at a time)
concurrent sign-ups wait for each other's. So the form and the JSON API queue their sign-ups here; the
writer takes everything queued (up to `max_batch`), admits it in ONE transaction by the same rules
(`Subscriptions.admit`: each sign-up sees the ones before it) and answers each request. While a batch
is written the next one gathers: no fixed wait, so a lone sign-up is answered as fast as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from services.subscriptions.domain import SignupRequest
from services.subscriptions.usecases import RequestContext, Signup, Subscriptions
from shared.logs import log_context

log = logging.getLogger(__name__)


class Unavailable(ConnectionError):
    """The service is stopping: the sign-up was not admitted (answered 503, try again)."""


@dataclass(frozen=True)
class Waiting:
    signup: Signup
    answer: asyncio.Future[bool]


class SignupAdmission:
    def __init__(self, subscriptions: Subscriptions, max_batch: int = 200) -> None:
        self.subscriptions, self.max_batch = subscriptions, max_batch
        self._queue: asyncio.Queue[Waiting] = asyncio.Queue()
        self._writing: list[Waiting] = []
        self._task: asyncio.Task | None = None
        self._stopped = False
        self.batches = 0  # for /metrics: sign-ups admitted / batches = the mean batch size
        self.admitted = 0

    async def request_subscription(self, req: SignupRequest, ctx: RequestContext) -> bool:
        """`Subscriptions.request_subscription` for the public form and API: the same answer and errors
        (RateLimited, the database's), after the writer's next transaction."""
        if self.subscriptions.is_bot(req, ctx):
            return False
        if self._stopped:
            raise Unavailable("the service is stopping")
        if self._task is None or self._task.done():  # (not started with the app, as in some tests)
            self.start()
        answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(Waiting(Signup(req, ctx), answer))
        return await answer

    @property
    def waiting(self) -> int:
        """Sign-ups queued or being written now."""
        return self._queue.qsize() + len(self._writing)

    def start(self) -> None:
        self._stopped = False
        with log_context(correlation_id=None):  # a batch's lines belong to no one request
            self._task = asyncio.create_task(self._write(), name="signup-admission")

    async def stop(self) -> None:
        """Stop the writer; sign-ups still waiting for it are refused (Unavailable), none hangs."""
        self._stopped = True
        if self._task:
            self._task.cancel()
        # At once: the batch being written may take a while to give up (a database that does not answer).
        self._refuse_waiting()
        if self._task:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _write(self) -> None:
        try:
            while True:
                batch = [await self._queue.get()]
                while len(batch) < self.max_batch and not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                # A request given up meanwhile (its client left) is not admitted, as its own transaction
                # would have been rolled back.
                self._writing = [w for w in batch if not w.answer.done()]
                if self._writing:
                    await self._admit(self._writing)
                self._writing = []
        finally:
            self._refuse_waiting()

    async def _admit(self, batch: list[Waiting]) -> None:
        try:
            outcomes = await self.subscriptions.admit([w.signup for w in batch])
        except Exception as exc:  # noqa: BLE001 - e.g. the database is away: every request answers it
            outcomes = [exc] * len(batch)
        self.batches += 1
        self.admitted += len(batch)
        for waiting, outcome in zip(batch, outcomes, strict=True):
            if waiting.answer.done():
                continue
            if isinstance(outcome, BaseException):
                waiting.answer.set_exception(outcome)
            else:
                waiting.answer.set_result(outcome)

    def _refuse_waiting(self) -> None:
        waiting = self._writing
        self._writing = []
        while not self._queue.empty():
            waiting.append(self._queue.get_nowait())
        for w in waiting:
            if not w.answer.done():
                w.answer.set_exception(Unavailable("the service is stopping"))
