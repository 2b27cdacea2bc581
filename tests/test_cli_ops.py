"""The operator commands of `bridgepost` (subscribers export/import, topics create, outbox status, dlq list/replay),
run in-process through `shared.cli.main` against the real broker, SMTP sink and databases of the test stack."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import os
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import TopicPartition
from sqlalchemy import func, select

from services.mailer import store as mailer_store
from services.subscriptions import csvfiles
from services.subscriptions import store as subscriptions_store
from services.subscriptions.app import MIGRATIONS as SUBSCRIPTIONS_MIGRATIONS
from services.subscriptions.app import create_app as create_subscriptions
from services.subscriptions.csvfiles import EXPORT_COLUMNS, FORMULA_START
from services.subscriptions.settings import SubscriptionsSettings
from shared import messages, topics
from shared.cli import main
from shared.db import Database, migrate
from shared.dlq import REPLAYED_FROM_HEADER
from tests.conftest import SESSION_TIMEOUT_MS, Broker, Stack, free_port, manage_token, until
from tests.kafka_tools import publish_raw, read_all

BRIDGEPOST = Path(sys.executable).with_name("bridgepost")
LEAKY_PREFIXES = ("SUBSCRIPTIONS_", "EVENTS_", "MAILER_", "BRIDGEPOST_", "KAFKA_", "SMTP_", "DEV_ADMIN")
OPS_COMMANDS = [["subscribers", "export"], ["subscribers", "import"], ["topics", "create"], ["outbox", "status"],
                ["dlq", "list"], ["dlq", "replay"]]
HEADER = ["email", "name", "language", "topics", "regions", "groups", "consent_at", "consent_source",
          "consent_text_version", "consent_ip"]
s_ = subscriptions_store.subscribers


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


def invoke(capsys: pytest.CaptureFixture[str], *args: str) -> Result:
    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse: --help, usage errors
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


async def run(capsys: pytest.CaptureFixture[str], *args: str) -> Result:
    """The command as a person would run it; in a thread, since it runs its own event loop."""
    return await asyncio.to_thread(invoke, capsys, *args)


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """Environment variables for the command line: nothing from the surroundings, then what a test sets."""
    for key in list(os.environ):
        if key.startswith(LEAKY_PREFIXES):
            monkeypatch.delenv(key)
    monkeypatch.setenv("BRIDGEPOST_ENV", "test")
    monkeypatch.setenv("KAFKA_ENABLE_IDEMPOTENCE", "false")

    def point(**env: str) -> None:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
    aiokafka_logger = logging.getLogger("aiokafka")
    level = aiokafka_logger.level
    yield point
    aiokafka_logger.setLevel(level)  # the Kafka commands quieten it; the test stack's logs want it back


@pytest.fixture
def ops(stack: Stack, cli_env: Callable[..., None]) -> Stack:
    """The command line pointed at the test stack's databases and broker."""
    cli_env(SUBSCRIPTIONS_DATABASE_URL=stack.sub_settings.database_url,
            EVENTS_DATABASE_URL=stack.events_settings.database_url,
            MAILER_DATABASE_URL=stack.mail_settings.database_url,
            KAFKA_BOOTSTRAP_SERVERS=stack.kafka.bootstrap, KAFKA_TOPIC_PREFIX=stack.topic_prefix)
    return stack


def write_csv(path: Path, rows: list[list[str]], header: list[str] = HEADER) -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def row(email: str, name: str = "", language: str = "de", topics_: str = "", regions: str = "", groups: str = "",
        consent_at: str = "", consent_source: str = "", version: str = "", ip: str = "") -> list[str]:
    return [email, name, language, topics_, regions, groups, consent_at, consent_source, version, ip]


def when(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


async def count(db: Database, table, *where) -> int:
    async with db.sessions() as s:
        return int(await s.scalar(select(func.count()).select_from(table).where(*where)) or 0)


async def mails_settled(stack: Stack, addresses: list[str]) -> dict[str, set[str]]:
    """Once the mailer has handled every mail to these addresses: the kinds of mail each got."""
    m = mailer_store.outgoing_mail

    async def settled():
        async with stack.mail_app.state.db.sessions() as s:
            rows = (await s.execute(select(m.c.recipient, m.c.kind, m.c.status)
                                    .where(m.c.recipient.in_(addresses)))).all()
        if any(r.status not in ("sent", "failed", "cancelled", "ambiguous") for r in rows):
            return None
        return {a: {r.kind for r in rows if r.recipient == a} for a in addresses}
    return await stack.until(settled, what="the mailer to handle the mails")


async def audience_row(stack: Stack, email: str, status: str = "active", groups: list[str] | None = None):
    """The subscriber's row in the mailer's audience projection, once it has `status` (and `groups`)."""
    a = mailer_store.audience

    async def projected():
        async with stack.mail_app.state.db.sessions() as s:
            r = (await s.execute(select(a).where(a.c.email == email))).first()
        if r is None or r.status != status or groups is not None and r.groups != groups:
            return None
        return r
    return await stack.until(projected, what=f"{email} {status} in the mailer's audience")


# --- help and argument errors ---------------------------------------------------------------------------


def test_top_level_help_lists_the_operator_commands(capsys: pytest.CaptureFixture[str]) -> None:
    result = invoke(capsys, "--help")
    assert result.code == 0
    for command in ("subscribers", "topics", "outbox", "dlq"):
        assert command in result.out


@pytest.mark.parametrize("command", OPS_COMMANDS + [["subscribers"], ["topics"], ["outbox"], ["dlq"]],
                         ids=" ".join)
def test_every_command_has_help(capsys: pytest.CaptureFixture[str], command: list[str]) -> None:
    result = invoke(capsys, *command, "--help")
    assert result.code == 0, result.err
    assert result.out.startswith(f"usage: bridgepost {' '.join(command)}")
    assert result.err == ""


@pytest.mark.parametrize(("args", "message"), [
    (["subscribers"], "required: action"),
    (["subscribers", "import"], "required: FILE"),
    (["subscribers", "export", "--status", "gone"], "invalid choice: 'gone'"),
    (["subscribers", "import", "/nonexistent/people.csv"], "cannot read /nonexistent/people.csv"),
    (["topics"], "required: action"),
    (["topics", "create", "--bootstrap-servers"], "expected one argument"),
    (["outbox", "status", "billing"], "unknown service 'billing'"),
    (["dlq", "replay"], "required: TOPIC"),
    (["dlq", "replay", "mailer.delivery.v1", "--limit", "0"], "must be at least 1"),
    (["dlq", "replay", "mailer.delivery.v1", "--limit", "many"], "'many' is not a whole number"),
    (["dlq", "list", "billing.invoices.v1"], "unknown topic 'billing.invoices.v1'"),
    (["dlq", "replay", "nosuch.dlq"], "unknown topic 'nosuch.dlq'"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_bad_arguments_are_refused_with_a_message(capsys: pytest.CaptureFixture[str], cli_env: Callable[..., None],
                                                   args: list[str], message: str) -> None:
    result = invoke(capsys, *args)
    assert result.code == 2, result
    assert message in result.err
    assert "Traceback" not in result.err and result.out == ""


@pytest.mark.parametrize(("content", "message"), [
    (b"", "the file is empty"),
    (b"mail,name\nx@example.org,X\n", "unknown column(s) 'mail'"),
    (b"name,language\nX,de\n", "no 'email' column"),
    (b"email,email\na@example.org,b@example.org\n", "given twice: email"),
    ("email,name\njörg@example.org,Jörg\n".encode("latin-1"), "not UTF-8"),
], ids=["empty", "unknown-column", "no-email-column", "column-twice", "latin-1"])
async def test_a_file_that_cannot_be_imported_imports_nothing(
        capsys: pytest.CaptureFixture[str], ops: Stack, tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "people.csv"
    path.write_bytes(content)
    before = await count(ops.sub_app.state.db, s_)
    result = await run(capsys, "subscribers", "import", str(path))
    assert result.code == 2
    assert message in result.err and "nothing imported" in result.err
    assert await count(ops.sub_app.state.db, s_) == before


async def test_an_unreachable_broker_is_one_clear_line(capsys: pytest.CaptureFixture[str],
                                                       cli_env: Callable[..., None]) -> None:
    nowhere = f"127.0.0.1:{free_port()}"
    for args in (["dlq", "list"], ["topics", "create"], ["dlq", "replay", "mailer.delivery.v1"]):
        result = await run(capsys, *args, "--bootstrap-servers", nowhere)
        assert result.code == 1
        assert result.err.strip() == f"bridgepost: cannot reach Kafka at {nowhere} " \
                                     "(--bootstrap-servers or KAFKA_BOOTSTRAP_SERVERS)"


# --- subscribers import / export -----------------------------------------------------------------------------


async def test_import_with_and_without_proof_of_consent(
        capsys: pytest.CaptureFixture[str], ops: Stack, tmp_path: Path) -> None:
    stack = ops
    erased = stack.address("imp-erased")
    await stack.signup(erased)
    erased_id = (await stack.subscriber(erased))["id"]
    assert (await stack.subscriptions.delete(f"/api/v1/subscribers/{erased_id}", headers=stack.staff())).is_success
    left = stack.address("imp-left")  # signed up, then refused with the link in the confirmation mail
    await stack.signup(left)
    (request,) = await stack.smtp.wait_for(left, 1)
    await stack.subscriptions.post(f"/unsubscribe?token={manage_token(request)}", data={"confirm": "yes"})
    assert (await stack.subscriber(left))["status"] == "unsubscribed"
    proven_ar, proven_de, doi_en, doi_partner = (stack.address(t) for t in ("imp-ar", "imp-de", "imp-en", "imp-pg"))
    bad = [stack.address("imp-bad") for _ in range(5)]
    path = write_csv(tmp_path / "people.csv", [
        row(proven_ar.upper(), "Amal", "ar", "arbeitsmarkt;bildung", "jerichower-land", "wirtschaft",
            "2024-05-01T10:00", "paper form, forum Genthin", "2024-01", "192.0.2.7"),  # line 2
        row(proven_de, "", "de", "teilhabe", "altmarkkreis-salzwedel", "", "2023-12-24T08:00:00Z",
            "sign-up list, fair 2023"),  # 3
        row(doi_en, "Ed", "en", "fortbildung", "jerichower-land"),  # 4
        row(doi_partner, "", "de", "", "altmarkkreis-salzwedel", "medien, zivilgesellschaft"),  # 5
        row("not-an-address", "X"),  # 6
        row(bad[0], topics_="astrologie"),  # 7
        row(bad[1], language="xx"),  # 8
        row(bad[2], groups="geheimbund"),  # 9
        row(bad[3], consent_at="2024-05-01"),  # 10: half a proof is a mistake, not a request for the opt-in
        row(bad[4], consent_at="2999-01-01T00:00", consent_source="time machine"),  # 11
        row(erased, consent_at="2024-01-01T00:00", consent_source="old list"),  # 12: erased stays erased
        row(proven_de, "Twice"),  # 13
        row(left, consent_at="2020-01-01T00:00", consent_source="an old list"),  # 14: unsubscribed stays so
    ])

    result = await run(capsys, "subscribers", "import", str(path))

    assert result.code == 1, result  # the invalid rows; the valid ones are imported all the same
    assert result.out.splitlines()[:4] == [
        "imported active: 2", "confirmation requested: 2",
        "skipped: 3 (repeated in the file 1, suppressed or erased 1, unsubscribed 1)", "invalid: 6"]
    problems = dict(re.findall(r"people\.csv: line (\d+): (.*)", result.err))
    assert sorted(map(int, problems)) == [6, 7, 8, 9, 10, 11]
    assert problems["6"].startswith("email: not a valid email address")
    assert problems["7"] == "topics: unknown key 'astrologie'"
    assert problems["8"] == "language: unknown language 'xx'"
    assert problems["9"] == "groups: unknown key 'geheimbund'"
    assert "needs both consent_at and consent_source" in problems["10"]
    assert problems["11"].startswith("consent_at: consent cannot be given in the future")
    for addr in bad:
        listed = await stack.subscriptions.get("/api/v1/subscribers", params={"email": addr}, headers=stack.staff())
        assert listed.json()["total"] == 0

    # With proof: active at once, the proof in the consent log at the time it was given (Berlin time → UTC).
    amal = await stack.subscriber(proven_ar)
    assert (amal["status"], amal["email"], amal["language"]) == ("active", proven_ar, "ar")
    assert (amal["topics"], amal["regions"]) == (["arbeitsmarkt", "bildung"], ["jerichower-land"])
    assert (amal["groups"], amal["audience"]) == (["wirtschaft"], "partner")
    assert when(amal["confirmed_at"]) == datetime(2024, 5, 1, 8, 0, tzinfo=UTC)
    gdpr = (await stack.subscriptions.get(f"/api/v1/subscribers/{amal['id']}/export", headers=stack.staff())).json()
    (consent,) = gdpr["consent_log"]
    assert (consent["action"], consent["source"], consent["ip"], consent["consent_text_version"]) == \
        ("imported", "import", "192.0.2.7", "2024-01")
    assert when(consent["occurred_at"]) == datetime(2024, 5, 1, 8, 0, tzinfo=UTC)
    assert consent["details"]["consent_source"] == "paper form, forum Genthin"
    de = await stack.subscriber(proven_de)
    assert de["status"] == "active" and when(de["confirmed_at"]) == datetime(2023, 12, 24, 8, 0, tzinfo=UTC)
    assert de["name"] is None and de["audience"] == "public"  # the repeated line 13 changed nothing

    # ... and in the mailer's audience, without a confirmation mail, and not greeted with a welcome mail
    # either: a list moving in is not mailed just for having moved.
    assert (await audience_row(stack, proven_ar, groups=["wirtschaft"])).audience == "partner"
    await audience_row(stack, proven_de)
    kinds = await mails_settled(stack, [proven_ar, proven_de])
    assert not kinds[proven_ar] | kinds[proven_de], kinds

    # Without proof: the double opt-in, as for a sign-up on the form.
    for addr in (doi_en, doi_partner):
        assert (await stack.subscriber(addr))["status"] == "pending"
        (mail,) = await stack.smtp.wait_for(addr, 1)
        assert "/confirm?" in mail.get_body(("plain",)).get_content()
    confirmed = await stack.confirm(doi_partner)
    assert confirmed.status_code == 200
    partner = await stack.subscriber(doi_partner)
    assert partner["status"] == "active"
    assert (partner["groups"], partner["audience"]) == (["medien", "zivilgesellschaft"], "partner")
    assert (await audience_row(stack, doi_partner, groups=["medien", "zivilgesellschaft"])).audience == "partner"
    log = (await stack.subscriptions.get(f"/api/v1/subscribers/{partner['id']}/export",
                                         headers=stack.staff())).json()["consent_log"]
    assert [(c["action"], c["source"]) for c in log] == [("requested", "import"), ("confirmed", "confirm-page")]
    assert log[0]["consent_text"] is None  # an imported address never saw the form's consent text

    gone = (await stack.subscriptions.get(f"/api/v1/subscribers/{erased_id}", headers=stack.staff())).json()
    assert gone["status"] == "erased" and gone["email"] is None
    assert (await stack.subscriber(left))["status"] == "unsubscribed"
    assert len(stack.smtp.to(left)) == 1


async def test_importing_the_same_file_again_changes_nothing(
        capsys: pytest.CaptureFixture[str], ops: Stack, tmp_path: Path) -> None:
    stack, db = ops, ops.sub_app.state.db
    proven, doi = stack.address("again-proof"), stack.address("again-doi")
    rows = [row(proven, "P", "tr", "foerderung", "jerichower-land", "", "2025-02-03T04:05:06+01:00", "phone call"),
            row(doi, "D", "uk", "veranstaltungen", "altmarkkreis-salzwedel")]
    path = write_csv(tmp_path / "again.csv", rows)
    first = await run(capsys, "subscribers", "import", str(path))
    assert first.code == 0, first
    assert first.out.splitlines() == ["imported active: 1", "confirmation requested: 1", "skipped: 0", "invalid: 0"]
    await stack.smtp.wait_for(doi, 1)
    await mails_settled(stack, [proven, doi])
    before = [await count(db, t) for t in (s_, subscriptions_store.consent_log, subscriptions_store.infra.outbox)]

    again = await run(capsys, "subscribers", "import", str(path))

    assert again.code == 0, again
    assert again.out.splitlines() == ["imported active: 0", "confirmation requested: 0",
                                      "skipped: 2 (already active 1, confirmation pending 1)", "invalid: 0"]
    after = [await count(db, t) for t in (s_, subscriptions_store.consent_log, subscriptions_store.infra.outbox)]
    assert after == before  # no subscriber, no consent record, no event
    canary = stack.address("canary")
    await stack.signup(canary)
    await stack.smtp.wait_for(canary)
    assert len(stack.smtp.to(doi)) == 1

    # Partner groups in a later file are added to the subscriber (never taken away): one groups_changed.
    rows[0][5] = "medien"
    more = await run(capsys, "subscribers", "import", str(write_csv(tmp_path / "groups.csv", rows)))
    assert more.code == 0 and "partner groups added: 1" in more.out
    subscriber = await stack.subscriber(proven)
    assert (subscriber["groups"], subscriber["audience"]) == (["medien"], "partner")
    assert (await audience_row(stack, proven, groups=["medien"])).audience == "partner"
    outbox = subscriptions_store.infra.outbox
    async with db.sessions() as s:
        payloads = (await s.scalars(select(outbox.c.payload).where(outbox.c.key == subscriber["id"])
                                    .order_by(outbox.c.id))).all()
    assert [json.loads(p)["type"] for p in payloads] == ["subscription_confirmed", "groups_changed"]


async def test_export_is_spreadsheet_safe_and_imports_elsewhere_unchanged(
        capsys: pytest.CaptureFixture[str], ops: Stack, cli_env: Callable[..., None], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    stack = ops
    monkeypatch.setattr(csvfiles, "PAGE", 3)  # the export reads page by page: several pages here
    formula, at, arabic = stack.address("exp-formula"), stack.address("exp-at"), stack.address("exp-ar")
    imported = await run(capsys, "subscribers", "import", str(write_csv(tmp_path / "in.csv", [
        row(formula, "=HYPERLINK(\"http://evil.example\")", "de", "bildung;teilhabe", "jerichower-land", "medien",
            "2025-01-02T03:04:05Z", "-paper form", "v1"),
        row(at, "@Gäste", "fa", "", "altmarkkreis-salzwedel"),
        row(arabic, "أمل", "ar", "arbeitsmarkt", "jerichower-land", "", "2025-01-02", "+list"),
    ])))
    assert imported.code == 0, imported

    out = tmp_path / "export.csv"
    exported = await run(capsys, "subscribers", "export", "--output", str(out))
    assert exported.code == 0, exported
    assert re.fullmatch(r"\d+ subscriber\(s\) exported to .*export\.csv\n", exported.err)
    assert out.stat().st_mode & 0o777 == 0o600  # personal data
    text = out.read_text(encoding="utf-8")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == list(EXPORT_COLUMNS)
    for cells in rows:  # nothing a spreadsheet would run as a formula
        assert not any(v.startswith(FORMULA_START) for v in cells.values()), cells
    by_email = {r["email"]: r for r in rows}
    f = by_email[formula]
    assert f["name"] == "'=HYPERLINK(\"http://evil.example\")" and f["consent_source"] == "'-paper form"
    assert (f["status"], f["topics"], f["groups"], f["audience"]) == ("active", "bildung;teilhabe", "medien", "partner")
    assert when(f["consent_at"]) == datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC) and f["consent_text_version"] == "v1"
    assert (by_email[at]["name"], by_email[at]["status"], by_email[at]["consent_at"]) == ("'@Gäste", "pending", "")
    assert by_email[arabic]["name"] == "أمل"
    assert len(rows) == await count(stack.sub_app.state.db, s_, s_.c.status != "erased") > 3
    assert len({r["id"] for r in rows}) == len(rows)

    to_stdout = await run(capsys, "subscribers", "export", "--status", "active")
    assert to_stdout.code == 0
    active = list(csv.DictReader(io.StringIO(to_stdout.out)))
    assert {r["status"] for r in active} == {"active"}
    assert {r["email"] for r in active} == {r["email"] for r in rows if r["status"] == "active"}

    # Into an empty installation: the same subscribers, active ones with their proof, pending ones asked again.
    elsewhere = f"sqlite+aiosqlite:///{tmp_path / 'elsewhere.db'}"
    await migrate(elsewhere, SUBSCRIPTIONS_MIGRATIONS)
    cli_env(SUBSCRIPTIONS_DATABASE_URL=elsewhere)
    moved = await run(capsys, "subscribers", "import", str(out))
    assert moved.code == 0, moved
    states = [r["status"] for r in rows]
    assert moved.out.splitlines()[:2] == [f"imported active: {states.count('active')}",
                                          f"confirmation requested: {states.count('pending')}"]
    assert moved.out.splitlines()[3] == "invalid: 0"
    again = await run(capsys, "subscribers", "export")
    compared = ("email", "name", "language", "topics", "regions", "groups", "audience", "status", "consent_at",
                "consent_source", "consent_text_version")
    there = {r["email"]: {c: r[c] for c in compared} for r in csv.DictReader(io.StringIO(again.out))}
    assert there == {r["email"]: {c: r[c] for c in compared} for r in rows if r["status"] in ("active", "pending")}

    # Nothing relays that installation's outbox: every imported subscriber's event is waiting there.
    status = await run(capsys, "outbox", "status", "subscriptions")
    assert status.code == 0, status
    header, line = status.out.splitlines()
    assert re.split(r"\s{2,}", header) == ["service", "backlog", "oldest unpublished", "published last hour", "relay"]
    name, backlog, oldest, published, relay = re.split(r"\s{2,}", line)
    assert (name, int(backlog), published, relay) == ("subscriptions", len(there), "0", "none")
    assert re.fullmatch(r"\d+s|\d+m( \d+s)?", oldest)


async def test_outbox_status_shows_the_relay_holding_the_lease(capsys: pytest.CaptureFixture[str], ops: Stack) -> None:
    stack = ops
    await stack.signup(stack.address("outbox"))
    outbox = subscriptions_store.infra.outbox

    async def relayed() -> bool:
        return await count(stack.sub_app.state.db, outbox, outbox.c.published_at.is_(None)) == 0
    await stack.until(relayed, what="the relay to publish the sign-up")

    relays = {"subscriptions": stack.sub_app, "events": stack.events_app, "mailer": stack.mail_app}

    async def status() -> dict[str, list[str]] | None:
        result = await run(capsys, "outbox", "status")
        assert result.code == 0, result
        table = {cells[0]: cells for cells in (re.split(r"\s{2,}", line) for line in result.out.splitlines()[1:])}
        assert list(table) == list(relays)
        # (a relay of another test's killed instance may hold a lease until it expires)
        if all(table[n][4].startswith(f"{app.state.runtime.relay.holder} (lease for ") for n, app in relays.items()):
            return table
        return None
    table = await stack.until(status, what="every service's relay to hold its lease")
    for _, backlog, _, published, _ in table.values():
        assert backlog.isdigit() and published.isdigit()
    assert table["subscriptions"][1:3] == ["0", "-"] and int(table["subscriptions"][3]) >= 1

    # the console script itself, as an operator runs it
    env = {k: v for k, v in os.environ.items() if not k.startswith(LEAKY_PREFIXES)}
    env.update(BRIDGEPOST_ENV="test", SUBSCRIPTIONS_DATABASE_URL=stack.sub_settings.database_url,
               PYTHONWARNINGS="ignore")
    proc = await asyncio.to_thread(subprocess.run, [str(BRIDGEPOST), "outbox", "status", "subscriptions"], env=env,
                                   capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1].startswith("subscriptions  0 ")


# --- topics ---------------------------------------------------------------------------------------------------


async def partitions_on_broker(bootstrap: str, names: list[str]) -> dict[str, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        await consumer.topics()
        return {t: len(consumer.partitions_for_topic(t) or ()) for t in names}
    finally:
        await consumer.stop()


async def test_topics_create_makes_every_topic_with_its_partitions(
        capsys: pytest.CaptureFixture[str], kafka: Broker, cli_env: Callable[..., None]) -> None:
    prefix = f"ops{uuid.uuid4().hex[:8]}."
    cli_env(KAFKA_BOOTSTRAP_SERVERS=kafka.bootstrap, KAFKA_TOPIC_PREFIX=prefix)
    wanted = {f"{prefix}{t}": n for t, n in topics.PARTITIONS.items()}
    wanted |= {f"{prefix}{topics.dlq(t)}": 1 for t in topics.PARTITIONS}

    result = await run(capsys, "topics", "create")

    assert result.code == 0, result
    assert result.out.splitlines() == [f"{t}\t{n} partition(s)" for t, n in wanted.items()]
    assert await partitions_on_broker(kafka.bootstrap, list(wanted)) == wanted
    again = await run(capsys, "topics", "create", "--bootstrap-servers", kafka.bootstrap, "--prefix", prefix)
    assert (again.code, again.out) == (0, result.out)

    # A topic someone else made with too few partitions (as the broker auto-creates them) is reported.
    other = f"ops{uuid.uuid4().hex[:8]}."
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(f"{other}{topics.JOBS}", 1, 1)])
    finally:
        await admin.close()
    short = await run(capsys, "topics", "create", "--prefix", other)
    assert short.code == 1
    assert f"{other}{topics.JOBS}\t1 partition(s)" in short.out.splitlines()
    assert f"{other}{topics.JOBS} has 1 partition(s), not {topics.PARTITIONS[topics.JOBS]}" in short.err
    assert f"{other}{topics.SUBSCRIBER}\t{topics.PARTITIONS[topics.SUBSCRIBER]} partition(s)" in short.out


# --- dead letters -------------------------------------------------------------------------------------------


@pytest.fixture
async def lone_subscriptions(kafka: Broker, tmp_path: Path, cli_env: Callable[..., None]) -> AsyncIterator:
    """A subscriptions service of its own (own topic prefix and database), so its dead letters are only ours."""
    settings = SubscriptionsSettings(
        environment="test", kafka_bootstrap_servers=kafka.bootstrap, kafka_enable_idempotence=False,
        kafka_topic_prefix=f"ops{uuid.uuid4().hex[:8]}.", database_url=f"sqlite+aiosqlite:///{tmp_path / 's.db'}",
        outbox_poll_seconds=0.5, kafka_session_timeout_ms=SESSION_TIMEOUT_MS)
    await migrate(settings.database_url, SUBSCRIPTIONS_MIGRATIONS)
    app = create_subscriptions(settings)
    async with app.router.lifespan_context(app):
        await asyncio.wait_for(app.state.runtime.connected.wait(), 60)
        cli_env(SUBSCRIPTIONS_DATABASE_URL=settings.database_url, KAFKA_BOOTSTRAP_SERVERS=kafka.bootstrap,
                KAFKA_TOPIC_PREFIX=settings.kafka_topic_prefix)
        yield app


async def test_dlq_list_and_replay_of_a_message_that_failed_before_a_fix(
        capsys: pytest.CaptureFixture[str], lone_subscriptions, kafka: Broker, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    app = lone_subscriptions
    prefix, db = app.state.settings.kafka_topic_prefix, app.state.db
    email = f"bounce-{uuid.uuid4().hex[:8]}@example.org"
    imported = await run(capsys, "subscribers", "import", str(write_csv(tmp_path / "one.csv", [
        row(email, "B", "de", "", "", "", "2025-01-01T12:00", "paper form")])))
    assert imported.code == 0, imported
    async with db.sessions() as s:
        subscriber_id = await s.scalar(select(s_.c.id).where(s_.c.email == email))

    # A bug: handling this subscriber's hard bounce fails, every attempt, so the bounce is dead-lettered.
    subscriptions = app.state.subscriptions
    real_suppress = subscriptions._suppress

    async def broken_suppress(s, address: str, reason: str) -> None:
        raise RuntimeError("simulated bug while suppressing")
    monkeypatch.setattr(subscriptions, "_suppress", broken_suppress)
    bounce = messages.MailBounced(subscriber_id=subscriber_id, mail_id="mail-1", kind="campaign", smtp_code=550,
                                  error="550 5.1.1 no such mailbox")
    poison = b"not json at all, from secret.person@example.org"
    await publish_raw(kafka.bootstrap, f"{prefix}{topics.DELIVERY}", [
        (subscriber_id.encode(), bounce.model_dump_json().encode(), [("x-correlation-id", b"corr-1")]),
        (subscriber_id.encode(), poison, [])])
    dlq_topic = f"{prefix}{topics.dlq(topics.DELIVERY)}"

    async def dead_lettered(n: int):
        records = await read_all(kafka.bootstrap, dlq_topic)
        return records if len(records) >= n else None
    await until(lambda: dead_lettered(2), 60, "both messages on the DLQ", every=0.2)

    listed = await run(capsys, "dlq", "list", topics.DELIVERY)
    assert listed.code == 0, listed
    lines = listed.out.splitlines()
    assert lines[0] == f"{dlq_topic}: 2 message(s), 2 waiting for a replay"
    columns = lines[1].split("\t")
    assert columns == ["partition", "offset", "failed at", "key", "type", "event_id", "consumer", "origin", "state",
                       "error"]
    first, second = (dict(zip(columns, line.split("\t"), strict=True)) for line in lines[2:])
    assert (first["offset"], first["key"], first["type"], first["event_id"]) == \
        ("0", subscriber_id, "mail_bounced", str(bounce.event_id))
    assert first["consumer"] == f"{prefix}subscriptions.{topics.DELIVERY}"
    assert re.fullmatch(rf"{re.escape(prefix)}mailer\.delivery\.v1/\d+@\d+", first["origin"])
    assert first["error"] == "RuntimeError: simulated bug while suppressing" and first["state"] == "waiting"
    assert when(first["failed at"]).tzinfo is not None
    assert (second["type"], second["event_id"], second["state"]) == ("-", "-", "waiting")
    assert second["error"].startswith("ValidationError:")
    assert "secret.person" not in listed.out and "not json" not in listed.out  # never the body
    everything = await run(capsys, "dlq", "list")  # every topic's DLQ
    assert f"{prefix}{topics.dlq(topics.SUBSCRIBER)}: 0 message(s)" in everything.out
    assert lines[0] in everything.out

    async def status() -> tuple[str, int]:
        async with db.sessions() as s:
            r = (await s.execute(select(s_.c.status, s_.c.hard_bounces).where(s_.c.id == subscriber_id))).one()
        return r.status, r.hard_bounces
    assert await status() == ("active", 0)  # the failed attempts left nothing behind

    # The fix is deployed; a dry run shows what a replay would send, and sends nothing.
    monkeypatch.setattr(subscriptions, "_suppress", real_suppress)
    dry = await run(capsys, "dlq", "replay", topics.DELIVERY, "--dry-run")
    assert dry.code == 0, dry
    assert dry.out.splitlines()[-1] == f"{dlq_topic} → {prefix}{topics.DELIVERY}: would replay 2 message(s); 0 left"
    assert dry.out.startswith(f"would replay\t0\t0\tmail_bounced\t{bounce.event_id}\t")

    # Replay the oldest: the bounce is handled now.
    one = await run(capsys, "dlq", "replay", f"{topics.DELIVERY}.dlq", "--limit", "1")
    assert one.code == 0, one
    assert one.out.splitlines()[-1] == f"{dlq_topic} → {prefix}{topics.DELIVERY}: replayed 1 message(s); 1 left"

    async def suppressed():
        return await status() == ("suppressed", 1)
    await until(suppressed, 60, "the replayed bounce to suppress the subscriber", every=0.2)
    replayed = [r for r in await read_all(kafka.bootstrap, f"{prefix}{topics.DELIVERY}")
                if str(bounce.event_id).encode() in r.value]
    assert len(replayed) == 2  # the original and the replay, with its key and headers but not the DLQ's
    headers = dict(replayed[1].headers)
    assert replayed[1].key == subscriber_id.encode() and headers["x-correlation-id"] == b"corr-1"
    assert headers[REPLAYED_FROM_HEADER] == f"{dlq_topic}/0@0".encode()
    assert not any(k.startswith(("x-dlq-", "x-original-")) for k in headers)

    # The rest (the poison, which still cannot be read: back to the DLQ), then nothing more.
    rest = await run(capsys, "dlq", "replay", topics.DELIVERY)
    assert rest.out.splitlines()[-1] == f"{dlq_topic} → {prefix}{topics.DELIVERY}: replayed 1 message(s); 0 left"
    await until(lambda: dead_lettered(3), 60, "the poison back on the DLQ", every=0.2)
    listed = await run(capsys, "dlq", "list", topics.DELIVERY)
    assert listed.out.splitlines()[0] == f"{dlq_topic}: 3 message(s), 1 waiting for a replay"
    assert [line.split("\t")[8] for line in listed.out.splitlines()[2:]] == ["replayed", "replayed", "waiting"]
    assert await status() == ("suppressed", 1)  # the bounce counted once

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(f"{prefix}bridgepost-dlq-replay.{topics.DELIVERY}",
                                                            partitions=[TopicPartition(dlq_topic, 0)])
    finally:
        await admin.close()
    assert committed[TopicPartition(dlq_topic, 0)].offset == 2


