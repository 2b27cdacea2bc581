"""The load generator of bench/signup.py: a process of its own that drives POST /api/v1/subscriptions.

It runs in a separate process (multiprocessing, started by signup.py), so that generating the load does not
share an event loop with measuring the system. Requests go over keep-alive HTTP/1.1 connections with a small
raw asyncio client: a full client library costs more CPU per request than a 2-core machine can spare beside
the system under test. Two modes:

- closed loop: `concurrency` connections, each sending its next request as soon as the previous one is
  answered, for `seconds` (throughput at that many requests in flight);
- open loop: one request every 1/`rate` s whether or not earlier ones are answered, each on an idle
  connection or a new one; latency counts from the moment the request was due, so a server that falls
  behind shows it (no coordinated omission). While `max_in_flight` requests are unanswered, a request that
  falls due is not sent but counted (status -1), so an overloaded server does not get an ever longer queue.

Each sign-up has its own address and, in `X-Forwarded-For`, a client address shared by `PER_IP` sign-ups:
the per-IP limit stays on (the service trusts the header) but is never reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import resource
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

PATH = "/api/v1/subscriptions"
PER_IP = 10  # sign-ups per client address: below SUBSCRIPTIONS_SIGNUPS_PER_IP (30 per 10 minutes)
IDLE_SECONDS = 2.0  # uvicorn closes idle keep-alive connections after 5 s; ours are dropped before that
# A mix of the languages (and so of the confirmation mails' templates), regions and topics people choose.
LANGUAGES = ["de", "de", "de", "ar", "ar", "uk", "fa", "en", "ru", "tr"]
REGIONS = [[], ["magdeburg"], ["halle", "saalekreis"], ["stendal"], [], ["harz"], ["landesweit"]]
TOPICS = [["arbeitsmarkt"], [], ["willkommenskultur", "teilhabe"], ["bildung"], ["veranstaltungen"]]
CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.I)
CONNECTION_CLOSE = re.compile(rb"\r\nconnection:[ \t]*close", re.I)


def address(tag: str, n: int, run: str) -> str:
    return f"{tag}-{n}.{run}@example.org"


def client_ip(n: int) -> str:
    k = n // PER_IP
    return f"10.{(k >> 16) & 255}.{(k >> 8) & 255}.{k & 255}"


@dataclass(frozen=True)
class Plan:
    """One load level. Sign-up numbers start at `first` (unique over the run, with `tag` and `run` in the address)."""

    mode: str  # "closed" or "open"
    seconds: float
    tag: str
    run: str
    first: int
    concurrency: int = 0
    rate: float = 0.0
    max_in_flight: int = 1000  # open loop: a request due while this many are unanswered is not sent (status -1)


def request_bytes(host: str, plan: Plan, n: int) -> bytes:
    body = json.dumps({
        "email": address(plan.tag, n, plan.run), "name": f"Bench {n}", "language": LANGUAGES[n % len(LANGUAGES)],
        "topics": TOPICS[n % len(TOPICS)], "regions": REGIONS[n % len(REGIONS)], "consent": True,
    }).encode()
    head = (f"POST {PATH} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nX-Forwarded-For: {client_ip(n)}\r\nUser-Agent: bridgepost-bench\r\n"
            "Accept: application/json\r\n\r\n")
    return head.encode() + body


class HttpConnection:
    """One keep-alive HTTP/1.1 connection: a request, then its answer, then the next request."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.last_used = 0.0

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.last_used = time.perf_counter()

    @property
    def is_open(self) -> bool:
        return self.writer is not None and not self.writer.is_closing()

    async def exchange(self, request: bytes) -> int:
        """Send one request, read its answer; the status code (the body is read and dropped)."""
        assert self.reader is not None and self.writer is not None
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        m = CONTENT_LENGTH.search(head)
        if m and int(m.group(1)):
            await self.reader.readexactly(int(m.group(1)))
        if CONNECTION_CLOSE.search(head):
            self.close()
        self.last_used = time.perf_counter()
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


class Targets:
    """The service instances, taken in turn for each new connection (as a load balancer would)."""

    def __init__(self, urls: list[str]) -> None:
        self.hosts = []
        for url in urls:
            host, _, port = url.split("://", 1)[-1].rstrip("/").rpartition(":")
            self.hosts.append((host, int(port)))
        self.turn = 0

    async def connect(self) -> HttpConnection:
        host, port = self.hosts[self.turn % len(self.hosts)]
        self.turn += 1
        conn = HttpConnection(host, port)
        await conn.open()
        return conn


# (sign-up number, HTTP status (0: connection failed, -1: not sent, too many in flight), latency s, start time)
Sample = tuple[int, int, float, float]


async def closed_loop(targets: Targets, plan: Plan) -> list[Sample]:
    samples: list[Sample] = []
    counter = iter(range(plan.first, plan.first + 10**9))
    deadline = time.perf_counter() + plan.seconds

    async def worker() -> None:
        conn = await targets.connect()
        while time.perf_counter() < deadline:
            n = next(counter)
            request = request_bytes(f"{conn.host}:{conn.port}", plan, n)
            started, wall = time.perf_counter(), time.time()
            try:
                if not conn.is_open:
                    conn = await targets.connect()
                status = await conn.exchange(request)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
                status = 0  # not retried: the sign-up may have been stored, a retry would be a second one
                conn.close()
            samples.append((n, status, time.perf_counter() - started, wall))
        conn.close()

    await asyncio.gather(*(worker() for _ in range(plan.concurrency)))
    return samples


async def open_loop(targets: Targets, plan: Plan) -> list[Sample]:
    samples: list[Sample] = []
    idle: list[HttpConnection] = []
    total = max(1, round(plan.rate * plan.seconds))
    start = time.perf_counter() + 0.05
    start_wall = time.time() + (start - time.perf_counter())

    in_flight = 0

    async def one(n: int, due: float) -> None:
        nonlocal in_flight
        if in_flight >= plan.max_in_flight:  # the server is that far behind: this one would only queue
            samples.append((n, -1, 0.0, start_wall + (due - start)))
            return
        in_flight += 1
        conn = None
        while idle and conn is None:
            candidate = idle.pop()
            if candidate.is_open and time.perf_counter() - candidate.last_used < IDLE_SECONDS:
                conn = candidate
            else:
                candidate.close()
        try:
            if conn is None:
                conn = await targets.connect()
            status = await conn.exchange(request_bytes(f"{conn.host}:{conn.port}", plan, n))
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            status = 0
            if conn is not None:
                conn.close()
        in_flight -= 1
        samples.append((n, status, time.perf_counter() - due, start_wall + (due - start)))
        if conn is not None and conn.is_open:
            idle.append(conn)

    tasks = []
    for i in range(total):
        due = start + i / plan.rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(plan.first + i, due)))
    await asyncio.gather(*tasks)
    for conn in idle:
        conn.close()
    return samples


async def run_plan(targets: Targets, plan: Plan) -> dict[str, Any]:
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    started_wall, started = time.time(), time.perf_counter()
    if plan.mode == "closed":
        samples = await closed_loop(targets, plan)
    else:
        samples = await open_loop(targets, plan)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"samples": samples, "started": started_wall, "ended": started_wall + elapsed, "elapsed": elapsed,
            "cpu": (after.ru_utime - cpu.ru_utime) + (after.ru_stime - cpu.ru_stime)}


def serve(conn: Connection, urls: list[str]) -> None:
    """The process's main function: runs each Plan it receives and sends back its result; None ends it."""
    targets = Targets(urls)
    with contextlib.suppress(EOFError, KeyboardInterrupt):
        while (plan := conn.recv()) is not None:
            conn.send(asyncio.run(run_plan(targets, plan)))
