"""A mailer killed with SIGKILL three times during a 5,000-recipient campaign (real processes).

The mailer here runs alone, as `bridgepost serve mailer` processes on a database and topic prefix of
their own (the test stack's in-process mailer never sees these jobs): it is killed three times while
sending and started again each time. Every recipient gets the campaign exactly once — except the
ambiguous ones, handed to SMTP by a killed process without the answer being recorded, who get it at most
once and are counted, never resent — and there are at most SMTP_POOL_SIZE × MAILER_CAMPAIGN_HANDOVER_SIZE
of those per kill.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, insert, select

from services.mailer import store
from shared.db import Database, utcnow
from tests.conftest import SESSION_TIMEOUT_MS, Stack, free_port, until

pytestmark = pytest.mark.faults

RECIPIENTS = 5000
POOL = 4
HANDOVER = 10
KILLS = 3
KEY = "bp_test_kills_publisher_key_0123456789abcdef"
# Slow enough that the campaign lasts (25 s of sending) and every kill lands in the middle of it. A
# restarted mailer sends before it reports ready (its job consumer rejoins the group meanwhile), so the
# kills are timed by the ledger itself, not by the API.
RATE = 200
STEP = 300  # mails recorded as sent between two kills


def environment(stack: Stack, database_url: str, prefix: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAILER_", "KAFKA_", "SMTP_"))}
    env.update({
        "BRIDGEPOST_ENV": "test", "KAFKA_BOOTSTRAP_SERVERS": stack.kafka.bootstrap,
        "KAFKA_ENABLE_IDEMPOTENCE": "false", "KAFKA_FETCH_MAX_WAIT_MS": "100",
        "KAFKA_SESSION_TIMEOUT_MS": str(SESSION_TIMEOUT_MS), "KAFKA_TOPIC_PREFIX": prefix,
        "PUBLIC_BASE_URL": stack.mail_settings.public_base_url, "MAILER_DATABASE_URL": database_url,
        "SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(stack.smtp.port), "SMTP_POOL_SIZE": str(POOL),
        "MAILER_SEND_RATE_PER_SECOND": str(RATE), "MAILER_CAMPAIGN_BATCH_SIZE": "250",
        "MAILER_CAMPAIGN_HANDOVER_SIZE": str(HANDOVER), "MAILER_AMBIGUOUS_AFTER_SECONDS": "3",
        "MAILER_DIGEST_ENABLED": "false",
    })
    return env


def bridgepost() -> str:
    return str(Path(sys.executable).with_name("bridgepost"))


def start_mailer(env: dict[str, str], port: int, log: Path) -> subprocess.Popen:
    return subprocess.Popen([bridgepost(), "serve", "mailer", "--port", str(port)], env=env,
                            stdout=log.open("a"), stderr=subprocess.STDOUT, start_new_session=True)




async def test_three_sigkills_during_a_5000_recipient_campaign(stack: Stack, tmp_path: Path) -> None:
    if stack.backend != "sqlite":
        pytest.skip("the mailer processes use a database of their own; one run of this test is enough")
    database_url = f"sqlite+aiosqlite:///{tmp_path}/mailer.db"
    env = environment(stack, database_url, f"kills{uuid.uuid4().hex[:8]}.")
    for argv in (["migrate", "mailer"], ["api-key", "create", "--role", "publisher", "--service", "mailer",
                                          "--key", KEY, "--name", "kills test"]):
        await asyncio.to_thread(subprocess.run, [bridgepost(), *argv], env=env, check=True, capture_output=True,
                                timeout=120)

    # The audience straight into the projection: what is under test here is sending, not projecting.
    run = uuid.uuid4().hex[:6]
    people = [f"kill-{run}-{i}@example.org" for i in range(RECIPIENTS)]
    db = Database(database_url)
    try:
        async with db.transaction() as s:
            await s.execute(insert(store.audience), [{
                "subscriber_id": str(uuid.uuid4()), "email": email, "name": f"Person {i}",
                "language": ["de", "ar", "tr", "uk"][i % 4], "topics": [], "regions": ["harz"],
                "audience": "public", "groups": [], "status": "active", "manage_token": f"token-{i}",
                "updated_at": utcnow()} for i, email in enumerate(people)])
    finally:
        await db.dispose()

    port = free_port()
    log = tmp_path / "mailer.log"
    proc = start_mailer(env, port, log)
    kills: list[int] = []
    ledger = Database(database_url)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30,
                                     headers={"Authorization": f"Bearer {KEY}"}) as api:
            async def ready() -> bool:
                try:
                    return (await api.get("/readyz")).status_code == 200
                except httpx.HTTPError:
                    return False

            await until(ready, 90, "the mailer to be ready")
            created = await api.post("/api/v1/campaigns", json={
                "subject": {"de": f"Dreimal [{run}]"}, "body_markdown": {"de": "Hallo {{ name }}"},
                "segment": {"regions": ["harz"]}})
            assert created.status_code == 201, created.text
            campaign_id = created.json()["id"]
            assert (await api.post(f"/api/v1/campaigns/{campaign_id}/send")).status_code == 200

            for kill in range(KILLS):
                # Let it get well into the campaign, then kill it mid-send and start it again.
                target = (kills[-1] if kills else 0) + STEP
                await until(lambda t=target: _sent_at_least(ledger, t), 120, f"sending before kill {kill + 1}")
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
                kills.append(await _sent(ledger))
                proc = start_mailer(env, port, log)
            await until(ready, 90, "the mailer to be ready after the last kill")

            async def done() -> dict | None:
                r = (await api.get(f"/api/v1/campaigns/{campaign_id}")).json()
                return r if r["status"] == "done" else None
            result = await until(done, 180, "the campaign to finish after three kills")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        await ledger.dispose()

    counts = result["counts"]
    assert kills == sorted(kills) and kills[-1] < RECIPIENTS, kills  # each kill was mid-campaign
    assert counts["total"] == RECIPIENTS
    assert counts["sent"] + counts["ambiguous"] == RECIPIENTS, counts  # nobody skipped or failed
    assert counts["ambiguous"] <= KILLS * POOL * HANDOVER, counts  # at most what was in flight at each kill
    subject = f"Dreimal [{run}]"
    got = Counter(rcpts[0] for rcpts, m in stack.smtp.messages if m["Subject"] == subject)
    assert max(got.values()) == 1, [e for e, n in got.items() if n > 1]  # nobody twice
    assert set(got) <= set(people)
    assert len(got) >= counts["sent"]  # every `sent` arrived; an ambiguous one arrived at most once
    assert RECIPIENTS - len(got) <= counts["ambiguous"]


async def _sent(ledger: Database) -> int:
    """Mails recorded as sent, read from the mailer's database (SQLite in WAL mode: the writer is not held up)."""
    d = store.campaign_deliveries
    async with ledger.sessions() as s:
        return int(await s.scalar(select(func.count()).select_from(d).where(d.c.status == "sent")) or 0)


async def _sent_at_least(ledger: Database, target: int) -> bool:
    return await _sent(ledger) >= target
