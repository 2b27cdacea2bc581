"""Logging of every bridgepost process: JSON lines in production, readable text elsewhere, each line with
the correlation id that follows a sign-up or an event from form to mailbox, and no addresses in clear.

The correlation id and the service name live in context variables: the HTTP middleware sets them for a
request (`shared.runtime.add_correlation_ids`, `shared.web.add_operational_routes`), a Kafka consumer
for the message it handles (from the `x-correlation-id` header, `shared.kafka.register_consumer`), and
every line logged meanwhile carries them. Whatever a log call passes in, e-mail addresses are replaced
by `mask_address()` (a short hash, the same one `shared.addresses.email_hash` starts with) and SQL
parameters by a placeholder, before any handler of ours writes the line (SPEC §5: no personal data in logs).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TextIO

from shared.addresses import email_hash, normalise_email

CORRELATION_ID: ContextVar[str | None] = ContextVar("bridgepost_correlation_id", default=None)
SERVICE: ContextVar[str | None] = ContextVar("bridgepost_service", default=None)

# Client libraries that log every message or connection step at INFO: warnings only.
QUIET_LOGGERS = ("aiokafka", "faststream", "bridgepost.kafka")
# Loggers that come with their own handler (and so would bypass the format and the redaction).
FOREIGN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "faststream")

# Something that looks like an e-mail address, also URL-encoded (`%40`) and with non-ASCII letters.
# (An apostrophe may be part of one, but not its first character: there it is a quote around it. A slash
# may too, in theory; left out, so that paths and topic/partition@offset stay readable.)
ADDRESS = re.compile(r"[\w.!#$%&*+=?^`{|}~-][\w.!#$%&'*+=?^`{|}~-]{0,63}(?:@|%40)(?:[\w-]{1,63}\.)+[\w-]{2,63}")
# An address cut short at the end of a text (a log call that truncates an SMTP answer, say).
ADDRESS_CUT = re.compile(r"[\w.!#$%&*+=?^`{|}~-][\w.!#$%&'*+=?^`{|}~-]{0,63}(?:@|%40)[\w.-]{0,253}\Z")
# SQLAlchemy writes the bound values of a failed statement on one line: subscribers' data.
SQL_PARAMETERS = re.compile(r"\[parameters: [^\n]*")
_UNSET: Any = object()
_STANDARD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "correlation_id", "service"}


def mask_address(address: str | None) -> str:
    """An address as logs may show it: `email:` and the first 10 hex digits of its hash.

    The same address always gives the same mask, so lines about one person can be found (hash the
    address with `shared.addresses.email_hash`), but the address cannot be read from the log.
    """
    if not address:
        return "email:-"
    address = address.strip().replace("%40", "@")
    try:
        normalised = normalise_email(address)
    except ValueError:
        normalised = address.lower()
    return f"email:{email_hash(normalised)[:10]}"


def _mask_match(match: re.Match[str]) -> str:
    return mask_address(match.group(0))


def redact(text: str) -> str:
    """`text` with every address (also one cut short at the end) masked and SQL parameters left out."""
    if "@" in text or "%40" in text:
        text = ADDRESS_CUT.sub(_mask_match, ADDRESS.sub(_mask_match, text))
    if "[parameters: " in text:
        text = SQL_PARAMETERS.sub("[parameters: hidden]", text)
    return text


@contextlib.contextmanager
def log_context(*, correlation_id: str | None = _UNSET, service: str | None = _UNSET) -> Iterator[None]:
    """Lines logged inside (and tasks created inside) carry this correlation id and/or service name."""
    tokens = []
    if correlation_id is not _UNSET:
        tokens.append((CORRELATION_ID, CORRELATION_ID.set(correlation_id)))
    if service is not _UNSET:
        tokens.append((SERVICE, SERVICE.set(service)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


class RedactAddresses(logging.Filter):
    """Safety net on every handler of ours: masks addresses (and SQL parameters) in the message and the
    traceback of each record, whatever the log call passed in."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken log call is reported by the handler, not here
            return True
        redacted = redact(message)
        if redacted != message or record.args:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


class AddContext(logging.Filter):
    """Puts the correlation id and service of the current context on the record (unless given as extra)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "correlation_id", None) is None:
            record.correlation_id = CORRELATION_ID.get()
        if getattr(record, "service", None) is None:
            record.service = SERVICE.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, service, correlation_id, message, extras, exception."""

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace(
                "+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "service": getattr(record, "service", None),
            "correlation_id": getattr(record, "correlation_id", None),
            "message": redact(record.getMessage()),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRIBUTES and not key.startswith("_") and key not in entry:
                entry[key] = value
        if record.exc_text:
            entry["exception"] = redact(record.exc_text)
        if record.stack_info:
            entry["stack"] = redact(self.formatStack(record.stack_info))
        # Addresses in extras too. A match never spans a quote or a backslash and the mask has neither,
        # so masking the finished line keeps it valid JSON. (Only where there may be one: the pattern tried
        # at every position of every line was most of a line's cost.)
        line = json.dumps(entry, default=str, ensure_ascii=False)
        return ADDRESS.sub(_mask_match, line) if "@" in line or "%40" in line else line


class TextFormatter(logging.Formatter):
    """`time LEVEL [service correlation-id] logger: message`, for people at a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s [%(service)s %(correlation_id)s] %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        shown = {"service": getattr(record, "service", None) or "-",
                 "correlation_id": getattr(record, "correlation_id", None) or "-"}
        saved = {key: record.__dict__.get(key) for key in shown}
        record.__dict__.update(shown)
        try:
            return redact(super().format(record))
        finally:
            record.__dict__.update(saved)


def make_handler(stream: TextIO, json_format: bool) -> logging.Handler:
    """A stream handler with bridgepost's format, context and redaction."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if json_format else TextFormatter())
    handler.addFilter(AddContext())
    handler.addFilter(RedactAddresses())
    return handler


def json_wanted(settings: Any = None) -> bool:
    """JSON lines when LOG_FORMAT=json, or with LOG_FORMAT=auto (the default) in production."""
    if settings is None:
        from shared.settings import CommonSettings
        try:
            settings = CommonSettings()
        except ValueError:  # an invalid setting is reported by the command itself, readably
            return False
    if settings.log_format == "auto":
        return settings.environment == "production"
    return settings.log_format == "json"


_handler: logging.Handler | None = None


def configure(level: str = "INFO", *, json_format: bool, stream: TextIO | None = None) -> logging.Handler:
    """Set up the process's logging: one handler of ours on the root logger (replacing an earlier one)."""
    global _handler
    # Neither format shows where a line was logged from, nor thread or process: not looked up per line
    # (the logging module's documented optimisations; the caller's frame was the dearest of them).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    _handler = make_handler(stream or sys.stderr, json_format)
    root.addHandler(_handler)
    root.setLevel(level.upper())
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    adopt_foreign_loggers()
    return _handler


def adopt_foreign_loggers() -> None:
    """Send uvicorn's and FastStream's lines through our handler (they install their own handlers, which
    would bypass the format and the redaction). Does nothing unless `configure` ran in this process."""
    if _handler is None:
        return
    for name in FOREIGN_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
