"""E-mail addresses as every service stores and compares them."""

from __future__ import annotations

import hashlib

from email_validator import EmailNotValidError, validate_email


def normalise_email(address: str) -> str:
    """Validated, trimmed, lower-case; raises ValueError for anything that is not an address."""
    try:
        result = validate_email(address.strip(), check_deliverability=False)
    except EmailNotValidError as exc:
        raise ValueError(str(exc)) from exc
    return result.normalized.lower()


def email_hash(normalised: str) -> str:
    return hashlib.sha256(normalised.encode()).hexdigest()
