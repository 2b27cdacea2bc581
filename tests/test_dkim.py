"""DKIM signatures (SPEC: DKIM signing when a key is configured): rendered mails signed with a test key verify,
the List-Unsubscribe headers are covered, tampering breaks the signature, and the SMTP pool signs on the wire."""

from __future__ import annotations

import asyncio
import base64
import re
from email.message import EmailMessage
from pathlib import Path

import dkim
import pytest
from aiosmtpd.smtp import SMTP
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from services.mailer.dkim_signing import DkimSigner, signer_from_settings
from services.mailer.render import MailRenderer, Recipient
from services.mailer.settings import MailerSettings
from services.mailer.smtp import SmtpPool
from shared.i18n import load_translations

MAIL_FROM = "Netz <news@example.org>"
TOKEN = "3f2a9c1e-0d4b-4e59-9a77-1b2c3d4e5f60.abcDEF_ghi-JKL012mno345"


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def key_file(key, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("dkim") / "dkim.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.NoEncryption()))
    return str(path)


@pytest.fixture(scope="module")
def dnsfunc(key):
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        return record if name.rstrip(b".") == b"bridgepost._domainkey.example.org" else None
    return lookup


def dkim_settings(key_file: str | None, **extra) -> MailerSettings:
    return MailerSettings(environment="test", dkim_private_key_file=key_file, mail_from=MAIL_FROM, **extra)


def welcome_message(lang: str = "de") -> EmailMessage:
    renderer = MailRenderer(load_translations(), "https://news.example.org", MAIL_FROM, "kontakt@example.org",
                            "Netzwerk Migrantenorganisationen", "Hauptstraße 5, 39104 Magdeburg")
    msg = renderer.render("welcome", Recipient(email="amira@example.org", name="Amira", language=lang),
                          "mail.welcome.subject", {"topics_text": "Bildung", "regions_text": "Halle (Saale)"},
                          manage_token=TOKEN).message
    return msg


def welcome(lang: str = "de") -> bytes:
    return welcome_message(lang).as_string().encode("utf-8")  # as SmtpPool.send converts it


def signature_tags(signed: bytes) -> dict[str, str]:
    header = re.match(rb"DKIM-Signature:(.*?)\r?\n(?![ \t])", signed, re.DOTALL)
    assert header, signed[:200]
    value = re.sub(r"\s+", "", header.group(1).decode())
    return dict(tag.split("=", 1) for tag in value.split(";") if tag)


@pytest.mark.parametrize("lang", ["de", "ar"])
def test_signed_welcome_mail_verifies_and_covers_list_unsubscribe(key_file, dnsfunc, lang) -> None:
    signer = signer_from_settings(dkim_settings(key_file))
    assert signer is not None and signer.domain == "example.org" and signer.selector == "bridgepost"
    message = welcome(lang)
    assert b"\r\nList-Unsubscribe: " in message and b"\r\nList-Unsubscribe-Post: " in message
    signed = signer.sign(message)
    assert signed.startswith(b"DKIM-Signature:") and signed.endswith(message)
    assert dkim.verify(signed, dnsfunc=dnsfunc)

    tags = signature_tags(signed)
    assert (tags["a"], tags["c"], tags["d"], tags["s"]) == ("rsa-sha256", "relaxed/relaxed", "example.org",
                                                             "bridgepost")
    signed_headers = tags["h"].lower().split(":")
    for name in ("from", "to", "subject", "date", "message-id", "list-unsubscribe", "list-unsubscribe-post"):
        assert name in signed_headers

    tampered = re.sub(rb"List-Unsubscribe: <[^>]*>", b"List-Unsubscribe: <https://evil.example/unsubscribe>",
                      signed)
    assert tampered != signed and not dkim.verify(tampered, dnsfunc=dnsfunc)
    added_post = signed.replace(b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n", b"")
    assert added_post != signed and not dkim.verify(added_post, dnsfunc=dnsfunc)


def test_dkim_domain_setting_overrides_mail_from(key_file) -> None:
    signer = signer_from_settings(dkim_settings(key_file, dkim_domain="mail.example.net", dkim_selector="s1"))
    assert signer is not None
    tags = signature_tags(signer.sign(welcome()))
    assert (tags["d"], tags["s"]) == ("mail.example.net", "s1")


def test_no_key_configured_means_no_signer(monkeypatch) -> None:
    monkeypatch.setenv("DKIM_PRIVATE_KEY_FILE", "")
    settings = MailerSettings(environment="test", mail_from=MAIL_FROM)
    assert settings.dkim_private_key_file is None and settings.dkim_domain is None
    assert signer_from_settings(settings) is None
    assert SmtpPool(settings).signer is None


def test_settings_from_environment(monkeypatch, key_file) -> None:
    monkeypatch.setenv("DKIM_PRIVATE_KEY_FILE", key_file)
    monkeypatch.setenv("DKIM_SELECTOR", "2024")
    monkeypatch.setenv("DKIM_DOMAIN", "")
    settings = MailerSettings(environment="test", mail_from=MAIL_FROM)
    assert (settings.dkim_private_key_file, settings.dkim_selector, settings.dkim_domain) == (key_file, "2024", None)


def test_missing_key_file_is_a_clear_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(ValueError, match=r"DKIM_PRIVATE_KEY_FILE .*nope\.pem.* cannot be read"):
        signer_from_settings(dkim_settings(missing))
    with pytest.raises(ValueError, match="DKIM_PRIVATE_KEY_FILE"):
        SmtpPool(dkim_settings(missing))


def test_unusable_key_file_is_a_clear_error(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key\n")
    with pytest.raises(ValueError, match="not an RSA private key in PEM format"):
        DkimSigner(str(garbage), "bridgepost", "example.org")


class Keep:
    def __init__(self) -> None:
        self.received: list[bytes] = []

    async def handle_DATA(self, server, session, envelope) -> str:
        self.received.append(envelope.content)
        return "250 OK"


async def test_pool_signs_what_it_sends(key_file, dnsfunc) -> None:
    keep = Keep()
    server = await asyncio.get_running_loop().create_server(lambda: SMTP(keep), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        settings = dkim_settings(key_file, smtp_host="127.0.0.1", smtp_port=port, smtp_timeout_seconds=5)
        pool = SmtpPool(settings)
        assert pool.signer is not None
        await pool.send(welcome_message("ar"), "news@example.org", "amira@example.org")
        await pool.send(welcome("de").decode("utf-8"), "news@example.org", "amira@example.org")  # as stored
        unsigned = SmtpPool(dkim_settings(None, smtp_host="127.0.0.1", smtp_port=port, smtp_timeout_seconds=5))
        await unsigned.send(welcome("en").decode("utf-8"), "news@example.org", "amira@example.org")
        await pool.close()
        await unsigned.close()
    finally:
        server.close()
    *signed, plain = keep.received
    assert len(signed) == 2
    for received in signed:
        assert received.startswith(b"DKIM-Signature:") and dkim.verify(received, dnsfunc=dnsfunc)
        assert {"list-unsubscribe", "list-unsubscribe-post"} <= set(signature_tags(received)["h"].lower().split(":"))
    assert b"DKIM-Signature" not in plain
