"""Signed link tokens: no login, no expiry, unforgeable (unsubscribe, preferences, cancel a registration)."""

from __future__ import annotations

import base64
import hashlib
import hmac


class LinkSigner:
    """`token(id)` → "<id>.<signature>"; `verify(token)` → the id, or None for anything forged."""

    def __init__(self, secret: str, purpose: str) -> None:
        # A key per purpose: a token made for one kind of link is worthless for another.
        self._key = hashlib.sha256(f"bridgepost-{purpose}:".encode() + secret.encode()).digest()

    def _sign(self, value: str) -> str:
        mac = hmac.new(self._key, value.encode(), hashlib.sha256).digest()[:18]
        return base64.urlsafe_b64encode(mac).decode().rstrip("=")

    def token(self, value: str) -> str:
        return f"{value}.{self._sign(value)}"

    def verify(self, token: str | None) -> str | None:
        if not token or len(token) > 200 or "." not in token:
            return None
        value, _, signature = token.rpartition(".")
        valid = hmac.compare_digest(signature.encode("utf-8", "replace"), self._sign(value).encode())
        return value if valid else None
