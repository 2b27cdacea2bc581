"""Tests for the development mail inbox (shared.devinbox): real SMTP in, real HTTP out."""

from __future__ import annotations

import asyncio
import email
import email.policy
import mailbox
import socket
from collections.abc import AsyncIterator
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import httpx
import pytest

from shared.devinbox import DevInbox, run_inbox

ICS = (
    b"BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//bridgepost//test//EN\r\n"
    b"BEGIN:VEVENT\r\nUID:stakeholder-day@example.org\r\nDTSTART:20300101T100000Z\r\n"
    b"SUMMARY:Stakeholder day\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n"
)
SUBJECT = "Invitation <script>alert('subject')</script> & more"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _build_message() -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "Bridgepost <news@example.org>"
    msg["To"] = "Reader <reader@example.com>"
    msg["Subject"] = SUBJECT
    msg["Date"] = "Tue, 01 Oct 2030 10:00:00 +0000"
    msg.set_content("Plain text body.\n.a line starting with a dot\nSee you there!\n")
    msg.add_alternative(
        "<html><body><p>HTML body</p><script>alert('body')</script></body></html>", subtype="html"
    )
    msg.add_attachment(ICS, maintype="text", subtype="calendar", filename="invite.ics")
    return msg


@pytest.fixture
async def inbox(tmp_path: Path) -> AsyncIterator[DevInbox]:
    box = DevInbox(tmp_path / "var" / "maildir", smtp_port=_free_port(), web_port=_free_port())
    await box.start()
    yield box
    await box.stop()


async def test_message_round_trip(inbox: DevInbox) -> None:
    sent = _build_message().as_bytes(policy=email.policy.SMTP)
    await aiosmtplib.send(
        sent,
        sender="news@example.org",
        recipients=["reader@example.com"],
        hostname="127.0.0.1",
        port=inbox.smtp_port,
    )

    # Stored once, byte for byte as received (dot-stuffing undone, nothing prepended).
    box = mailbox.Maildir(str(inbox.maildir), create=False)
    keys = box.keys()
    assert len(keys) == 1
    key = keys[0]
    with box.get_file(key) as fh:
        stored = fh.read()
    assert stored == sent
    assert email.message_from_bytes(stored, policy=email.policy.default)["Subject"] == SUBJECT

    base = f"http://127.0.0.1:{inbox.web_port}"
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}

        index = await client.get("/")
        assert index.status_code == 200
        assert '<meta charset="utf-8">' in index.text
        assert "Invitation &lt;script&gt;alert(&#39;subject&#39;)&lt;/script&gt; &amp; more" in index.text
        assert "<script" not in index.text
        assert f'href="/messages/{key}"' in index.text

        page = await client.get(f"/messages/{key}")
        assert page.status_code == 200
        assert "<script" not in page.text
        assert "Invitation &lt;script&gt;" in page.text
        assert "<pre>Plain text body.\n.a line starting with a dot\nSee you there!\n</pre>" in page.text
        assert "<iframe sandbox srcdoc=" in page.text
        assert "&lt;p&gt;HTML body&lt;/p&gt;&lt;script&gt;alert(&#39;body&#39;)&lt;/script&gt;" in page.text
        assert f'href="/messages/{key}/attachments/0">invite.ics</a>' in page.text

        attachment = await client.get(f"/messages/{key}/attachments/0")
        assert attachment.status_code == 200
        assert attachment.content == ICS
        assert attachment.headers["content-type"].startswith("text/calendar")
        assert 'filename="invite.ics"' in attachment.headers["content-disposition"]
        assert (await client.get(f"/messages/{key}/attachments/1")).status_code == 404

        raw = await client.get(f"/messages/{key}/raw")
        assert raw.status_code == 200
        assert raw.headers["content-type"].startswith("text/plain")
        assert raw.content == sent

        listing = (await client.get("/api/messages")).json()
        assert listing == [
            {
                "key": key,
                "from": "Bridgepost <news@example.org>",
                "to": "Reader <reader@example.com>",
                "subject": SUBJECT,
                "date": "2030-10-01T10:00:00+00:00",
            }
        ]

        for path in ("/messages/nope", "/messages/nope/raw", "/messages/nope/attachments/0"):
            missing = await client.get(path)
            assert missing.status_code == 404
            assert "Not found" in missing.text


async def test_newest_first(inbox: DevInbox) -> None:
    for number in range(3):
        msg = EmailMessage()
        msg["From"] = "news@example.org"
        msg["To"] = "reader@example.com"
        msg["Subject"] = f"message {number}"
        msg.set_content("hello")
        await aiosmtplib.send(msg, hostname="127.0.0.1", port=inbox.smtp_port)
        await asyncio.sleep(0.02)

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{inbox.web_port}", timeout=10) as client:
        listing = (await client.get("/api/messages")).json()
        assert [entry["subject"] for entry in listing] == ["message 2", "message 1", "message 0"]
        page = (await client.get("/")).text
        assert page.index("message 2") < page.index("message 1") < page.index("message 0")


async def test_run_inbox_stops_on_cancel(tmp_path: Path) -> None:
    smtp_port, web_port = _free_port(), _free_port()
    task = asyncio.create_task(run_inbox(tmp_path / "maildir", smtp_port=smtp_port, web_port=web_port))
    async with httpx.AsyncClient(timeout=2) as client:
        for _ in range(200):
            try:
                response = await client.get(f"http://127.0.0.1:{web_port}/healthz")
                break
            except httpx.TransportError:
                await asyncio.sleep(0.025)
        else:
            pytest.fail("dev inbox web server never came up")
    assert response.json() == {"status": "ok"}

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    # Both ports are released again.
    for port in (smtp_port, web_port):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
