"""A mailer killed with SIGKILL in the middle of a campaign (a real process), and replayed jobs."""

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
from sqlalchemy import func, select

from services.mailer import store
from shared import messages, topics
from shared.db import utcnow
from tests.conftest import EDITOR_KEY, PUBLISHER_KEY, SESSION_TIMEOUT_MS, Stack, free_port
from tests.kafka_tools import publish_raw, read_all, wait_caught_up

POOL = 4
HANDOVER = 3  # mails one connection takes per hand-over


async def seed_audience(stack: Stack, region: str, n: int) -> list[str]:
    """Active subscribers straight into the mailer's projection, through the subscriber topic. (The region's
    segment may hold people of earlier tests too: those without a region are in every region's.)"""

    async def in_segment() -> int:
        r = await stack.mailer.post("/api/v1/segments/count", json={"segment": {"regions": [region]}},
                                    headers=stack.staff(EDITOR_KEY))
        return r.json()["count"]
    before = await in_segment()
    emails, records = [], []
    for i in range(n):
        sid = str(uuid.uuid4())
        email = f"crowd-{i}-{sid[:8]}@example.org"
        emails.append(email)
        event = messages.SubscriptionConfirmed(
            subscriber_id=sid, email=email, name=f"Person {i}", language=["de", "ar", "tr"][i % 3],
            regions=[region], confirmed_at=utcnow(), manage_token=f"{sid}.seeded")
        records.append((sid.encode(), event.model_dump_json().encode(), []))
    await publish_raw(stack.kafka.bootstrap, f"{stack.topic_prefix}{topics.SUBSCRIBER}", records)

    async def projected():
        return await in_segment() == before + n
    await stack.until(projected, timeout=120, what="the seeded audience in the projection")
    return emails


def mailer_process(stack: Stack, port: int, log: Path) -> subprocess.Popen:
    s = stack.mail_settings
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAILER_", "KAFKA_", "SMTP_"))}
    env.update({
        "BRIDGEPOST_ENV": "test", "KAFKA_BOOTSTRAP_SERVERS": stack.kafka.bootstrap,
        "KAFKA_ENABLE_IDEMPOTENCE": "false", "KAFKA_FETCH_MAX_WAIT_MS": "100",
        "KAFKA_SESSION_TIMEOUT_MS": str(SESSION_TIMEOUT_MS), "KAFKA_TOPIC_PREFIX": stack.topic_prefix,
        "PUBLIC_BASE_URL": s.public_base_url, "MAILER_DATABASE_URL": s.database_url, "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(stack.smtp.port), "SMTP_POOL_SIZE": str(POOL), "MAILER_SEND_RATE_PER_SECOND": "0",
        "MAILER_CAMPAIGN_BATCH_SIZE": str(s.campaign_batch_size), "MAILER_CAMPAIGN_HANDOVER_SIZE": str(HANDOVER),
        "MAILER_AMBIGUOUS_AFTER_SECONDS": str(s.ambiguous_after_seconds),
    })
    bridgepost = Path(sys.executable).with_name("bridgepost")
    return subprocess.Popen([str(bridgepost), "serve", "mailer", "--port", str(port)], env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


async def test_sigkill_mid_campaign_every_recipient_once_ambiguous_bounded(stack: Stack, tmp_path: Path) -> None:
    region = "salzlandkreis"
    emails = await seed_audience(stack, region, 60)
    port = free_port()
    proc = mailer_process(stack, port, tmp_path / "mailer.log")
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as other:
            async def ready():
                try:
                    return (await other.get("/readyz")).status_code == 200
                except httpx.HTTPError:
                    return False
            await stack.until(ready, timeout=60, what="the second mailer to be ready")
        await asyncio.sleep(6)  # the jobs group rebalances over both instances
        stack.smtp.delay = 0.2
        campaign = (await stack.mailer.post("/api/v1/campaigns", headers=stack.staff(EDITOR_KEY), json={
            "subject": {"de": "Absturz-Test"}, "body_markdown": {"de": "Hallo {{ name }}"},
            "segment": {"regions": [region]}})).json()
        await stack.mailer.post(f"/api/v1/campaigns/{campaign['id']}/send", headers=stack.staff(PUBLISHER_KEY))
        mine = stack.mail_app.state.campaigns.instance
        d = store.campaign_deliveries

        async def other_instance_busy():
            async with stack.mail_app.state.db.sessions() as s:
                return await s.scalar(select(func.count()).select_from(d).where(
                    d.c.campaign_id == campaign["id"], d.c.status == "sent", ~d.c.claimed_by.startswith(mine)))
        await stack.until(other_instance_busy, timeout=60, what="the second mailer to send part of the campaign")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

        async def done():
            r = await stack.mailer.get(f"/api/v1/campaigns/{campaign['id']}", headers=stack.staff(EDITOR_KEY))
            return r.json() if r.json()["status"] == "done" else None
        result = await stack.until(done, timeout=120, what="the campaign to finish after the kill")
    finally:
        stack.smtp.delay = 0.0
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    counts = result["counts"]
    assert counts["total"] >= len(emails)  # (people of earlier tests who want every region are in it too)
    assert counts["sent"] + counts["ambiguous"] == counts["total"], counts  # nobody skipped
    # At most what the killed process had in flight: each connection's hand-over group.
    assert counts["ambiguous"] <= POOL * HANDOVER, counts
    # Every recipient of the campaign, the seeded and any earlier test's: nobody twice, the sent all there.
    got = Counter(rcpt.lower() for rcpts, m in stack.smtp.messages if m["Subject"] == "Absturz-Test" for rcpt in rcpts)
    assert all(n == 1 for n in got.values()), {e: n for e, n in got.items() if n > 1}  # nobody twice
    assert len(got) >= counts["sent"]
    assert sum(1 for e in emails if got[e.lower()] == 0) <= counts["ambiguous"]

    # Replaying the jobs topic sends nothing again.
    before = len(stack.smtp.messages)
    jobs = f"{stack.topic_prefix}{topics.JOBS}"
    records = await read_all(stack.kafka.bootstrap, jobs)
    await publish_raw(stack.kafka.bootstrap, jobs, [(r.key, r.value, list(r.headers)) for r in records])
    await wait_caught_up(stack.kafka.bootstrap, f"{stack.topic_prefix}mailer.{topics.JOBS}", jobs, timeout=90)
    await asyncio.sleep(1.5)
    assert len(stack.smtp.messages) == before
