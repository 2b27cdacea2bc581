"""Running it like a product: /metrics on every service, JSON logs that follow a sign-up from form to
mailbox without ever showing its address, and /readyz that names what is missing (SPEC §3, §5)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from services.events.app import MIGRATIONS as EVENTS_MIGRATIONS
from services.events.app import create_app as create_events
from services.events.settings import EventsSettings
from services.mailer import store as mailer_store
from shared import logs, topics
from shared.db import migrate
from shared.settings import CommonSettings
from tests.conftest import EDITOR_KEY, PUBLISHER_KEY, SESSION_TIMEOUT_MS, Broker, Stack, free_port

ROOT = Path(__file__).resolve().parents[1]

# --- metrics ------------------------------------------------------------------------------------------


class Scrape:
    """One /metrics answer, parsed: families by name and sample values by (name, labels)."""

    def __init__(self, text: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = {(s.name, frozenset(s.labels.items())): s.value
                        for f in self.families.values() for s in f.samples}

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def labelled(self, name: str) -> dict[frozenset, float]:
        return {labels: v for (n, labels), v in self.samples.items() if n == name}


async def scrape(client: httpx.AsyncClient) -> Scrape:
    r = await client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return Scrape(r.text)


EVERY_SERVICE = ["bridgepost_http_requests", "bridgepost_http_request_duration_seconds",
                 "bridgepost_messages_published", "bridgepost_outbox_backlog",
                 "bridgepost_outbox_oldest_unpublished_seconds", "bridgepost_service_info"]
CONSUMERS = ["bridgepost_messages_consumed", "bridgepost_messages_failed", "bridgepost_messages_duplicate",
             "bridgepost_dlq_messages", "bridgepost_consumer_lag"]
MAILER = ["bridgepost_mails_sent", "bridgepost_mails_failed", "bridgepost_mails_bounced", "bridgepost_mail_ledger",
          "bridgepost_campaigns", "bridgepost_campaign_deliveries"]


async def test_metrics_of_every_service_after_a_signup_flowed_through(stack: Stack) -> None:
    before_sub, before_mail = await scrape(stack.subscriptions), await scrape(stack.mailer)
    addr = stack.address("metrics")
    assert (await stack.signup(addr)).status_code == 202
    await stack.smtp.wait_for(addr)

    async def mailer_counted() -> Scrape | None:
        m = await scrape(stack.mailer)
        done = (m.value("bridgepost_mails_sent_total", kind="confirmation")
                > before_mail.value("bridgepost_mails_sent_total", kind="confirmation")
                and m.value("bridgepost_messages_published_total", topic=topics.DELIVERY)
                > before_mail.value("bridgepost_messages_published_total", topic=topics.DELIVERY))
        return m if done else None

    mail = await stack.until(mailer_counted, what="the mailer's metrics to count the confirmation mail")

    async def delivery_report_consumed() -> Scrape | None:
        s = await scrape(stack.subscriptions)
        return s if s.value("bridgepost_messages_consumed_total", topic=topics.DELIVERY) > \
            before_sub.value("bridgepost_messages_consumed_total", topic=topics.DELIVERY) else None

    sub = await stack.until(delivery_report_consumed, what="subscriptions to count the mail_sent report")
    events = await scrape(stack.events)

    for name, scraped in (("subscriptions", sub), ("mailer", mail), ("events", events)):
        wanted = EVERY_SERVICE + (CONSUMERS if name != "events" else []) + (MAILER if name == "mailer" else [])
        missing = [family for family in wanted if family not in scraped.families]
        assert not missing, f"{name} /metrics lacks {missing}"
        assert scraped.value("bridgepost_service_info", service=name) == 1
        assert scraped.value("bridgepost_outbox_backlog") >= 0

    # subscriptions: the form request (by route template), the event it published, what it consumed
    assert sub.value("bridgepost_http_requests_total", method="POST", route="/api/v1/subscriptions",
                     status="202") > before_sub.value("bridgepost_http_requests_total", method="POST",
                                                       route="/api/v1/subscriptions", status="202")
    assert sub.value("bridgepost_messages_published_total", topic=topics.SUBSCRIBER) > \
        before_sub.value("bridgepost_messages_published_total", topic=topics.SUBSCRIBER)
    assert sub.value("bridgepost_http_request_duration_seconds_count", method="POST",
                     route="/api/v1/subscriptions") >= 1
    assert (frozenset({("topic", topics.DELIVERY)}) in sub.labelled("bridgepost_dlq_messages_total"))
    assert (frozenset({("topic", topics.DELIVERY), ("reason", "error")})
            in sub.labelled("bridgepost_messages_failed_total"))

    # mailer: consumed the sign-up, published mail_sent, counted the mail from its ledger
    assert mail.value("bridgepost_messages_consumed_total", topic=topics.SUBSCRIBER) > \
        before_mail.value("bridgepost_messages_consumed_total", topic=topics.SUBSCRIBER)
    assert mail.value("bridgepost_mail_ledger", kind="confirmation", status="sent") == \
        mail.value("bridgepost_mails_sent_total", kind="confirmation")
    assert (frozenset({("kind", "campaign")}) in mail.labelled("bridgepost_mails_bounced_total"))

    # Consumer lag, where the client knows it: every partition of the sign-up topic, caught up at last.
    async def caught_up() -> bool:
        lag = (await scrape(stack.mailer)).labelled("bridgepost_consumer_lag")
        mine = {dict(labels)["partition"]: v for labels, v in lag.items() if dict(labels)["topic"] == topics.SUBSCRIBER}
        return len(mine) == topics.PARTITIONS[topics.SUBSCRIBER] and all(v == 0 for v in mine.values())

    await stack.until(caught_up, what="the mailer's lag on the sign-up topic to be known and 0")

    # events: its own requests are counted too
    await stack.events.get("/api/v1/events")
    events = await scrape(stack.events)
    assert events.value("bridgepost_http_requests_total", method="GET", route="/api/v1/events", status="200") >= 1


async def test_campaign_progress_comes_from_the_delivery_ledger(stack: Stack) -> None:
    region = "jerichower-land"
    addr = stack.address("metrics-campaign")
    await stack.signup(addr, regions=[region])
    await stack.confirm(addr)
    await stack.smtp.wait_for(addr, 2)
    before = await scrape(stack.mailer)

    async def projected() -> bool:
        r = await stack.mailer.post("/api/v1/segments/count", json={"segment": {"regions": [region]}},
                                    headers=stack.staff(EDITOR_KEY))
        return r.json()["count"] >= 1
    await stack.until(projected, what="the mailer to know the subscriber")
    created = await stack.mailer.post("/api/v1/campaigns", headers=stack.staff(EDITOR_KEY), json={
        "subject": {"de": "Metriken"}, "body_markdown": {"de": "Hallo"}, "segment": {"regions": [region]}})
    assert created.status_code == 201, created.text
    campaign_id = created.json()["id"]
    sent = await stack.mailer.post(f"/api/v1/campaigns/{campaign_id}/send", headers=stack.staff(PUBLISHER_KEY))
    assert sent.status_code == 200, sent.text

    async def done() -> dict | None:
        r = (await stack.mailer.get(f"/api/v1/campaigns/{campaign_id}", headers=stack.staff(EDITOR_KEY))).json()
        return r if r["status"] == "done" else None
    result = await stack.until(done, timeout=60, what="the campaign to finish")
    await stack.smtp.wait_for(addr, 3)

    after = await scrape(stack.mailer)
    progress = {dict(labels)["status"]: v for labels, v in after.labelled("bridgepost_campaign_deliveries").items()
                if dict(labels)["campaign"] == campaign_id}
    assert progress.get("sent") == result["counts"]["sent"] >= 1
    assert sum(progress.values()) == result["counts"]["total"]
    assert {dict(labels)["kind"] for labels in after.labelled("bridgepost_campaign_deliveries")
            if dict(labels)["campaign"] == campaign_id} == {"newsletter"}
    assert after.value("bridgepost_campaigns", status="done") >= 1
    assert after.value("bridgepost_mails_sent_total", kind="campaign") >= \
        before.value("bridgepost_mails_sent_total", kind="campaign") + result["counts"]["sent"]

    async def job_counted() -> bool:  # the job that carried the batch returns just after the last mail
        return (await scrape(stack.mailer)).value("bridgepost_messages_consumed_total", topic=topics.JOBS) > \
            before.value("bridgepost_messages_consumed_total", topic=topics.JOBS)
    await stack.until(job_counted, what="the campaign's job to be counted as consumed")


# --- logs ---------------------------------------------------------------------------------------------


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    """Everything logged during the test, as the production handler writes it (JSON lines)."""
    stream = io.StringIO()
    handler = logs.make_handler(stream, json_format=True)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def parsed(stream: io.StringIO) -> list[dict]:
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    for line in lines:
        assert {"ts", "level", "logger", "service", "correlation_id", "message"} <= line.keys(), line
    return lines


async def test_json_logs_carry_one_correlation_id_from_form_to_mailbox(stack: Stack, json_logs: io.StringIO) -> None:
    addr = stack.address("logged")
    r = await stack.signup(addr)
    assert r.status_code == 202
    correlation_id = r.headers["x-correlation-id"]
    await stack.smtp.wait_for(addr)

    async def both_services_logged() -> list[dict] | None:
        mine = [line for line in parsed(json_logs) if line["correlation_id"] == correlation_id]
        return mine if {"subscriptions", "mailer"} <= {line["service"] for line in mine} else None

    lines = await stack.until(both_services_logged, what="a subscriptions and a mailer line with the sign-up's id")
    form = [line for line in lines if line["service"] == "subscriptions"]
    assert any(line["message"].startswith("POST /api/v1/subscriptions 202") and
               line["http"]["route"] == "/api/v1/subscriptions" for line in form), form
    mailer = [line for line in lines if line["service"] == "mailer"]
    assert any("subscription_requested" in line["message"] for line in mailer), mailer
    # a caller's own correlation id is taken over, so a sign-up can be traced from the website's logs
    own = f"site-{uuid.uuid4().hex[:12]}"
    other = stack.address("logged-own-id")
    r = await stack.subscriptions.post("/api/v1/subscriptions", headers={"X-Correlation-ID": own}, json={
        "email": other, "name": "Test", "language": "de", "topics": [], "regions": [], "consent": True})
    assert r.headers["x-correlation-id"] == own
    await stack.smtp.wait_for(other)

    async def mailer_logged_own() -> bool:
        return any(line["correlation_id"] == own and line["service"] == "mailer" for line in parsed(json_logs))
    await stack.until(mailer_logged_own, what="the mailer to log the caller's correlation id")
    text = json_logs.getvalue()
    assert addr not in text and other not in text


async def test_addresses_never_reach_the_logs_not_even_in_smtp_answers(stack: Stack, json_logs: io.StringIO) -> None:
    addr = stack.address("Bounce.Logged")
    # The SMTP server quotes the address in its refusal; the mailer logs that answer.
    stack.smtp.permanent[addr.lower()] = f"550 5.1.1 <{addr}>: no mailbox here"
    try:
        await stack.signup(addr)
        m = mailer_store.outgoing_mail

        async def bounced() -> bool:
            async with stack.mail_app.state.db.sessions() as s:
                row = (await s.execute(select(m.c.status).where(m.c.recipient == addr.lower()))).first()
            return row is not None and row.status == "failed"
        await stack.until(bounced, what="the confirmation mail to bounce")

        async def logged() -> list[dict] | None:
            lines = [line for line in parsed(json_logs) if "bounced" in line["message"]]
            return lines or None
        lines = await stack.until(logged, what="the mailer to log the bounce")
    finally:
        stack.smtp.permanent.pop(addr.lower(), None)
    text = json_logs.getvalue()
    local_part = addr.split("@")[0]
    assert addr not in text and addr.lower() not in text
    assert local_part not in text and local_part.lower() not in text
    # The refusal is logged, without the address: the mailer keeps the server's answer with the address
    # replaced by "recipient" (and the log filter would mask any address that slipped through).
    assert any("550" in line["message"] for line in lines), lines


def test_mask_address_is_stable_and_shows_no_part_of_the_address() -> None:
    mask = logs.mask_address("Amira.Karimi@Example.org")
    assert mask == logs.mask_address(" amira.karimi@example.org ") and mask.startswith("email:")
    assert "amira" not in mask.lower() and "example" not in mask
    assert logs.mask_address("amira%40example.org") == logs.mask_address("amira@example.org")
    assert logs.mask_address("someone@example.org") != mask


def test_the_redaction_filter_masks_addresses_wherever_a_log_call_puts_them() -> None:
    stream = io.StringIO()
    logger = logging.getLogger("tests.redaction")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(logs.make_handler(stream, json_format=True))
    try:
        with logs.log_context(correlation_id="corr-1", service="mailer"):
            logger.info("to %s, name %s", "Leyla.Ahmadi@example.org", "Leyla", extra={"recipient": "x.y@example.de"})
            logger.warning("url-encoded leyla%40example.org and cut short: 550 5.1.1 <leyla.ahmadi@exam")
            try:
                raise RuntimeError("insert failed [parameters: ('leyla@example.org', 'Leyla Ahmadi', 3)]")
            except RuntimeError:
                logger.exception("handler failed for t.subscriber.v1/3@1207 (decode)")
        logger.info("Kafka positions stay readable: topic/0@12 to DLQ")
    finally:
        logger.handlers.clear()
        logger.propagate = True
    text = stream.getvalue()
    lines = [json.loads(line) for line in text.splitlines()]
    assert all(line["correlation_id"] == "corr-1" and line["service"] == "mailer" for line in lines[:3])
    assert lines[3]["correlation_id"] is None
    assert "leyla.ahmadi" not in text.lower() and "leyla@" not in text and "leyla%40" not in text
    assert "x.y@" not in text and "Leyla Ahmadi" not in text  # the SQL parameters went with the addresses
    assert lines[0]["message"] == f"to {logs.mask_address('leyla.ahmadi@example.org')}, name Leyla"
    assert lines[0]["recipient"] == logs.mask_address("x.y@example.de")
    assert "[parameters: hidden]" in lines[2]["exception"] and "t.subscriber.v1/3@1207" in lines[2]["message"]
    assert lines[3]["message"].endswith("topic/0@12 to DLQ")


def test_text_format_for_people_carries_the_same_context() -> None:
    stream = io.StringIO()
    handler = logs.make_handler(stream, json_format=False)
    record = logging.LogRecord("demo", logging.INFO, __file__, 1, "signed up: %s", ("amira@example.org",), None)
    with logs.log_context(correlation_id="corr-2", service="subscriptions"):
        handler.handle(record)
    line = stream.getvalue()
    assert " INFO [subscriptions corr-2] demo: signed up: email:" in line and "amira" not in line


@pytest.mark.parametrize(("environment", "log_format", "json_lines"), [
    ("production", "auto", True), ("dev", "auto", False), ("test", "auto", False),
    ("dev", "json", True), ("production", "text", False)])
def test_json_in_production_or_when_asked(environment: str, log_format: str, json_lines: bool) -> None:
    assert logs.json_wanted(CommonSettings(environment=environment, log_format=log_format)) is json_lines


@pytest.mark.parametrize(("env", "json_lines"), [({"BRIDGEPOST_ENV": "production"}, True),
                                                 ({"BRIDGEPOST_ENV": "dev"}, False),
                                                 ({"BRIDGEPOST_ENV": "dev", "LOG_FORMAT": "json"}, True)])
def test_the_cli_logging_setup_reads_the_environment(env: dict[str, str], json_lines: bool) -> None:
    script = ("import logging; from shared.cli import configure_logging; configure_logging('INFO'); "
              "logging.getLogger('bridgepost.demo').info('sent to %s', 'amira@example.org')")
    environ = {k: v for k, v in os.environ.items() if k not in ("BRIDGEPOST_ENV", "LOG_FORMAT")}
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**environ, **env},
                            capture_output=True, text=True, timeout=60, check=True)
    line = result.stderr.strip().splitlines()[-1]
    assert "amira" not in result.stderr
    if json_lines:
        entry = json.loads(line)
        assert entry["logger"] == "bridgepost.demo" and entry["message"].startswith("sent to email:")
    else:
        assert "INFO [- -] bridgepost.demo: sent to email:" in line


# --- readiness ----------------------------------------------------------------------------------------


async def test_ready_when_database_and_broker_are_up(stack: Stack) -> None:
    for client in (stack.subscriptions, stack.events, stack.mailer):
        r = await client.get("/readyz")
        assert r.status_code == 200, r.text
        assert r.json() == {"status": "ready", "checks": {"database": "ok", "broker": "ok"}, "failing": []}


@contextlib.asynccontextmanager
async def events_service(settings: EventsSettings):
    app = create_events(settings)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url="http://events.test") as client:
        yield app, client


async def test_not_ready_while_the_broker_is_unreachable(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/events.db"
    await migrate(url, EVENTS_MIGRATIONS)
    settings = EventsSettings(environment="test", database_url=url, kafka_enable_idempotence=False,
                              kafka_bootstrap_servers=f"127.0.0.1:{free_port()}")  # nobody listens there
    async with events_service(settings) as (_app, client):
        r = await client.get("/readyz")
        assert r.status_code == 503
        assert r.json()["failing"] == ["broker"]
        assert r.json()["checks"]["database"] == "ok" and r.json()["checks"]["broker"].startswith("unavailable")
        assert (await client.get("/healthz")).status_code == 200  # alive all the same


@pytest.mark.slow
async def test_not_ready_while_the_broker_does_not_answer(stack: Stack) -> None:
    if stack.kafka.process is None:
        pytest.skip("needs the embedded broker (it is frozen to simulate an outage)")
    stack.kafka.freeze()
    try:
        answers = await asyncio.gather(stack.subscriptions.get("/readyz"), stack.mailer.get("/readyz"))
    finally:
        stack.kafka.thaw()
    for r in answers:
        assert r.status_code == 503 and r.json()["failing"] == ["broker"], r.text
        assert r.json()["checks"]["database"] == "ok"

    async def ready_again() -> bool:
        answers = await asyncio.gather(stack.subscriptions.get("/readyz"), stack.mailer.get("/readyz"))
        return all(r.status_code == 200 for r in answers)
    await stack.until(ready_again, what="readiness once the broker answers again")


async def test_not_ready_while_the_database_is_unreachable(kafka: Broker, tmp_path: Path) -> None:
    folder = tmp_path / "db"
    url = f"sqlite+aiosqlite:///{folder}/events.db"
    await migrate(url, EVENTS_MIGRATIONS)
    settings = EventsSettings(environment="test", database_url=url, kafka_bootstrap_servers=kafka.bootstrap,
                              kafka_enable_idempotence=False, kafka_topic_prefix=f"t{uuid.uuid4().hex[:8]}.",
                              kafka_session_timeout_ms=SESSION_TIMEOUT_MS)
    async with events_service(settings) as (app, client):
        await asyncio.wait_for(app.state.runtime.connected.wait(), 60)
        assert (await client.get("/readyz")).status_code == 200
        # The database goes away: its connection closed, its folder gone.
        await app.state.db.engine.dispose()
        folder.rename(tmp_path / "away")
        try:
            r = await client.get("/readyz")
            assert r.status_code == 503
            assert r.json()["failing"] == ["database"]
            assert r.json()["checks"]["database"].startswith("unavailable") and r.json()["checks"]["broker"] == "ok"
            assert (await client.get("/metrics")).status_code == 200  # metrics still answer, from memory
        finally:
            (tmp_path / "away").rename(folder)
        assert (await client.get("/readyz")).status_code == 200
