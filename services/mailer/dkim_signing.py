"""DKIM signatures (dkimpy) for outgoing mails when a key is configured (SPEC: DKIM signing)."""

from __future__ import annotations

from email.utils import parseaddr

import dkim
from dkim.crypto import UnparsableKeyError, parse_pem_private_key

from services.mailer.settings import MailerSettings

# Signed even when absent in a mail: a header added later on the way then breaks the signature.
SIGNED_HEADERS = [b"from", b"to", b"subject", b"date", b"message-id", b"reply-to", b"content-type",
                  b"mime-version", b"list-unsubscribe", b"list-unsubscribe-post"]


class DkimSigner:
    """Signs whole messages (bytes) with rsa-sha256, relaxed/relaxed canonicalization."""

    def __init__(self, private_key_file: str, selector: str, domain: str) -> None:
        try:
            with open(private_key_file, "rb") as f:
                key = f.read()
        except OSError as exc:
            raise ValueError(f"DKIM_PRIVATE_KEY_FILE {private_key_file!r} cannot be read: {exc.strerror or exc}") \
                from exc
        try:
            parse_pem_private_key(key)
        except (UnparsableKeyError, ValueError) as exc:
            raise ValueError(f"DKIM_PRIVATE_KEY_FILE {private_key_file!r} is not an RSA private key in PEM format "
                             f"(unencrypted PKCS#1 or PKCS#8): {exc}") from exc
        if not selector or not domain:
            raise ValueError("DKIM signing needs a selector (DKIM_SELECTOR) and a domain (DKIM_DOMAIN or MAIL_FROM)")
        self._key = key
        self.selector = selector
        self.domain = domain

    @classmethod
    def from_settings(cls, settings: MailerSettings) -> DkimSigner:
        if not settings.dkim_private_key_file:
            raise ValueError("DKIM_PRIVATE_KEY_FILE is not set")
        domain = settings.dkim_domain or parseaddr(settings.mail_from)[1].rpartition("@")[2]
        if not domain:
            raise ValueError(f"no DKIM domain: set DKIM_DOMAIN (MAIL_FROM {settings.mail_from!r} has no domain)")
        return cls(settings.dkim_private_key_file, settings.dkim_selector, domain)

    def sign(self, message_bytes: bytes) -> bytes:
        """The message with a DKIM-Signature header prepended (folded with the message's own line ending)."""
        linesep = b"\r\n" if b"\r\n" in message_bytes else b"\n"
        signature = dkim.sign(message_bytes, self.selector.encode("ascii"), self.domain.encode("idna"), self._key,
                              canonicalize=(b"relaxed", b"relaxed"), signature_algorithm=b"rsa-sha256",
                              include_headers=SIGNED_HEADERS, linesep=linesep)
        return signature + message_bytes


def signer_from_settings(settings: MailerSettings) -> DkimSigner | None:
    """A signer when DKIM_PRIVATE_KEY_FILE is set, else None (mails go out unsigned)."""
    if not settings.dkim_private_key_file:
        return None
    return DkimSigner.from_settings(settings)
