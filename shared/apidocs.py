"""Machine-readable docs generated from the code: AsyncAPI of the topics, OpenAPI per service, settings.

`python -m shared.apidocs` (what `make docs` runs) writes

- `docs/api/asyncapi.json`: every topic the services consume and publish, with the pydantic message
  unions of `shared/messages.py` as payloads, made by FastStream's own AsyncAPI generator;
- `docs/api/openapi-<service>.json`: each service's FastAPI `app.openapi()`;
- `docs/configuration.md`: every setting of the settings classes (variable, type, default, description).

`python -m shared.apidocs --check` only compares and exits 1 when a file is out of date;
tests/test_docs.py does the same. The output is deterministic (sorted keys, no timestamps, no
environment read), so regenerating unchanged code changes nothing.

Why a separate documentation broker: the services subscribe one generic handler per topic that takes
the raw `KafkaMessage` and validates it itself (so a bad message can go to the DLQ), and they publish
through the outbox relay with raw bytes. FastStream's generator sees neither payload. So the consumers
are read from the real apps' brokers (topic and consumer group), and a broker that is never started
declares the same subscribers and the publishers with the topic's real message union. Nothing here
runs in a service.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import types
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from annotated_types import Ge, Gt, Le, Lt
from faststream.kafka import KafkaBroker
from faststream.specification import AsyncAPI
from pydantic import AliasChoices, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings

from shared import messages, topics
from shared.settings import DEV_SECRET, CommonSettings

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("subscriptions", "events", "mailer")

# --- what travels on each topic --------------------------------------------------------------------


@dataclass(frozen=True)
class TopicDoc:
    payload: Any  # the discriminated union consumers validate with
    key: str  # what the Kafka message key is
    producer: str  # the one service that publishes it (through its outbox)
    summary: str


TOPICS: dict[str, TopicDoc] = {
    topics.SUBSCRIBER: TopicDoc(
        messages.SubscriberEvent, "subscriber id", "subscriptions",
        "A subscriber's life: sign-up request (double opt-in), confirmation, preference and partner-group "
        "changes, unsubscribe, suppression, erasure. Carries the address and name (not after erasure)."),
    topics.EVENT: TopicDoc(
        messages.EventEvent, "event id", "events",
        "Published events: publication (with the target segment and whether to announce it by mail), "
        "changes (old and new values), cancellation."),
    topics.REGISTRATION: TopicDoc(
        messages.RegistrationEventUnion, "event id", "events",
        "Registrations for events: confirmed, waitlisted, promoted from the waiting list, cancelled, reminder "
        "due. Carries the registrant's address, name and a signed cancel token."),
    topics.DELIVERY: TopicDoc(
        messages.DeliveryEventUnion, "subscriber id", "mailer",
        "What became of a mail to a subscriber: sent, temporary failure (retried), bounce (permanent; counts "
        "towards suppression)."),
    topics.JOBS: TopicDoc(
        messages.JobEvent, "`<campaign id>:<batch number>`", "mailer",
        "Internal work of the mailer: one batch of a campaign's recipients. Spread over the partitions, so "
        "every mailer instance takes a share of a campaign."),
}

# Why each service reads a topic (shown on its receive operation).
CONSUMER_PURPOSE: dict[tuple[str, str], str] = {
    ("mailer", topics.SUBSCRIBER): "Audience projection; confirmation and welcome mails; unsent mail is "
                                   "cancelled on unsubscribe, suppression and erasure.",
    ("mailer", topics.EVENT): "Events projection; change and cancellation notices to registrants; announcement "
                              "campaigns for events published with `announce`.",
    ("mailer", topics.REGISTRATION): "Registration projection; registration, waiting-list, promotion, "
                                     "cancellation and reminder mails with calendar invitations.",
    ("mailer", topics.JOBS): "Sends one batch of a campaign (every mailer instance takes a share).",
    ("subscriptions", topics.DELIVERY): "Counts hard bounces; at `SUBSCRIPTIONS_HARD_BOUNCES_TO_SUPPRESS` the "
                                        "subscriber is suppressed. Sent and failed mails are only acknowledged.",
    ("subscriptions", topics.REGISTRATION): "\"Also subscribe to the newsletter\" on a registration starts the "
                                            "double opt-in; other registration messages are only acknowledged.",
}

CORRELATION = {
    "description": "Follows a sign-up or a registration from the HTTP request (`X-Correlation-ID`) to the mail "
                   "ledger.",
    "location": f"$message.header#/{messages.CORRELATION_HEADER}",
}
DLQ_HEADERS = {
    "x-dlq-error": "`ExceptionType: message` (at most 2000 characters; no message content)",
    "x-dlq-stage": "`decode` (bad JSON, schema mismatch, unknown type) or `handler` (the handler kept failing)",
    "x-dlq-consumer-group": "the consumer group that gave up, e.g. `mailer.events.registration.v1`",
    "x-original-topic": "topic the message came from",
    "x-original-partition": "its partition",
    "x-original-offset": "its offset",
    "x-failed-at": "UTC time, ISO 8601",
}
ASYNCAPI_DESCRIPTION = """\
The Kafka topics of bridgepost (SPEC §2.1), generated by `make docs` from `shared/messages.py`.

Every message is a JSON envelope (`event_id` UUID: the idempotency key, `type`, `occurred_at` UTC,
`schema_version`) plus the fields of its type; several types share a topic, told apart by `type`
(a discriminated union). Messages about one entity share a key and so a partition, and stay in
order. Producers write through a transactional outbox; consumers commit after processing and
deduplicate by `event_id`, so a redelivered or replayed message changes nothing. Consumer groups
are `<service>.<topic>`. A message a consumer cannot handle goes, unchanged and with the same key,
to `<topic>.dlq` with `x-dlq-*` and `x-original-*` headers. With `KAFKA_TOPIC_PREFIX` set, every
topic and group name starts with that prefix."""


# --- the services as they are wired -----------------------------------------------------------------


def settings_classes() -> dict[str, type[BaseSettings]]:
    from services.events.settings import EventsSettings
    from services.mailer.settings import MailerSettings
    from services.subscriptions.settings import SubscriptionsSettings
    return {"subscriptions": SubscriptionsSettings, "events": EventsSettings, "mailer": MailerSettings}


@functools.cache
def build_app(service: str) -> Any:
    """The service's FastAPI app with default settings, built without reading the environment.

    Building connects nothing: the broker, the database and the background tasks start in the lifespan.
    """
    from services.events.app import create_app as events_app
    from services.mailer.app import create_app as mailer_app
    from services.subscriptions.app import create_app as subscriptions_app
    factories: dict[str, Callable[[Any], Any]] = {
        "subscriptions": subscriptions_app, "events": events_app, "mailer": mailer_app}
    settings = settings_classes()[service].model_construct(environment="test")
    return factories[service](settings)


def consumed(app: Any) -> list[tuple[str, str]]:
    """(topic, consumer group) of every subscriber the app's real broker has, sorted."""
    found = set()
    for subscriber in app.state.runtime.broker.subscribers:
        for topic in subscriber.specification.topics:
            found.add((topic, subscriber.group_id))
    return sorted(found)


# --- AsyncAPI ---------------------------------------------------------------------------------------


def _documentation_handler(payload: Any) -> Callable[..., Any]:
    """A handler that is never called: its parameter's annotation is what FastStream documents."""
    async def handler(message: Any) -> None:  # pragma: no cover - documentation only
        """Registered on a broker that is never started (only its AsyncAPI schema is read)."""

    handler.__annotations__ = {"message": payload, "return": None}
    return handler


def asyncapi_document() -> dict[str, Any]:
    default_servers = CommonSettings.model_fields["kafka_bootstrap_servers"].default
    broker = KafkaBroker(default_servers, description="Apache Kafka (`KAFKA_BOOTSTRAP_SERVERS`)")
    groups: dict[str, str] = {}  # operation key -> consumer group
    for service in SERVICES:
        for topic, doc in TOPICS.items():
            if doc.producer == service:
                broker.publisher(topic, schema=doc.payload, title=f"{service}:publish:{topic}",
                                 description=f"{service} publishes (through its outbox, keyed by {doc.key}). "
                                             f"{doc.summary}")
        for topic, group in consumed(build_app(service)):
            if topic not in TOPICS:
                raise LookupError(f"{service} consumes {topic!r}: describe it in shared/apidocs.py TOPICS")
            doc = TOPICS[topic]
            purpose = CONSUMER_PURPOSE.get((service, topic), f"{service} consumes {topic}.")
            title = f"{service}:consume:{topic}"
            groups[title] = group
            broker.subscriber(topic, group_id=group, title=title,
                              description=f"Consumer group `{group}`. {purpose}")(
                _documentation_handler(doc.payload))
            dead = topics.dlq(topic)
            broker.publisher(dead, schema=doc.payload, title=f"{service}:publish:{dead}",
                             description=f"What group `{group}` could not handle: the original key, value and "
                                         "headers (the value may be anything, e.g. invalid JSON), plus the "
                                         "`x-dlq-*` and `x-original-*` headers.")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # FastStream warns when names collide: fail instead
        spec = AsyncAPI(broker, title="bridgepost", version="1", description=ASYNCAPI_DESCRIPTION,
                        schema_version="3.0.0").to_specification()
    document: dict[str, Any] = spec.to_jsonable()
    _annotate(document, groups)
    return document


def _annotate(document: dict[str, Any], groups: dict[str, str]) -> None:
    """Add what FastStream's schema classes cannot express: partitions, keys, groups and our headers."""
    document["servers"] = {"kafka": document["servers"].pop("development")}
    text = json.dumps(document).replace('"#/servers/development"', '"#/servers/kafka"')
    document.clear()
    document.update(json.loads(text))
    for channel in document["channels"].values():
        address = channel["address"]
        original = address.removesuffix(".dlq")
        channel["bindings"]["kafka"]["partitions"] = 1 if address != original else topics.PARTITIONS[original]
        for ref in channel["messages"].values():
            message = document["components"]["messages"][ref["$ref"].rsplit("/", 1)[1]]
            message["correlationId"] = dict(CORRELATION)
            message["bindings"] = {"kafka": {"bindingVersion": "0.4.0", "key": {
                "type": "string", "description": f"The {TOPICS[original].key}."}}}
            headers = {messages.CORRELATION_HEADER: CORRELATION["description"]}
            if address != original:
                headers.update(DLQ_HEADERS)
            message["headers"] = {"type": "object", "properties": {
                name: {"type": "string", "description": description} for name, description in headers.items()}}
    for key, group in groups.items():
        document["operations"][key]["bindings"] = {"kafka": {"bindingVersion": "0.4.0", "groupId": {
            "type": "string", "enum": [group]}}}


# --- OpenAPI ----------------------------------------------------------------------------------------


def openapi_document(service: str) -> dict[str, Any]:
    return build_app(service).openapi()


# --- configuration reference ------------------------------------------------------------------------

CONFIGURATION_HEADER = """\
# Configuration

<!-- Generated by `make docs` (shared/apidocs.py) from the settings classes: edit the descriptions
     there (`Field(description=...)`), not here. tests/test_docs.py fails when this file is stale. -->

Every setting is an environment variable read by a pydantic-settings class when a command starts
(`bridgepost serve …`, `migrate`, `api-key`, `dev`); nothing is read at import time.

- **Shared settings** (`CommonSettings`, `shared/settings.py`) use their plain names and are read by
  every service.
- **A service's own settings** use its prefix: `SUBSCRIPTIONS_` (`services/subscriptions/settings.py`),
  `EVENTS_` (`services/events/settings.py`) or `MAILER_` (`services/mailer/settings.py`). Exception:
  the mailer's SMTP, sender-address and DKIM settings are unprefixed (`SMTP_HOST`, `MAIL_FROM`,
  `DKIM_SELECTOR`, …, as in SPEC §4).
- **Secret keys** exist only in the services that sign links (`SigningSettings` in
  `shared/settings.py`): `SUBSCRIPTIONS_SECRET_KEY` and `EVENTS_SECRET_KEY`. The mailer signs nothing
  (the tokens in its mails come signed in the events it consumes) and has no secret key.
- Names are case-insensitive. Booleans accept `true`/`false` (also `1`/`0`, `yes`/`no`); lists are
  JSON, e.g. `SUBSCRIPTIONS_CORS_ORIGINS='["https://www.example.org"]'`. Unknown variables are ignored
  — so a misspelt name is silently ignored too; `tests/test_compose.py` checks the names used in
  `docker-compose.yml` against these classes.
"""

CONFIGURATION_FOOTER = """\
## Other environment variables (not settings)

| variable | read by | meaning |
|---|---|---|
| `BRIDGEPOST_HOST` | `bridgepost serve` | Default of `--host` (`127.0.0.1`); in containers pass `--host 0.0.0.0`. |
| `BRIDGEPOST_DEBUG` | `bridgepost` | When set, errors show a stack trace instead of a one-line message. |
| `BRIDGEPOST_TAXONOMY_FILE` | taxonomy loader | Another taxonomy TOML file instead of `shared/taxonomy.toml`. |
| `DEV_ADMIN_API_KEY` | `bridgepost dev` | Registered as the admin key instead of a freshly generated one. |

## docker-compose.yml

The production compose file sets `BRIDGEPOST_ENV=production`, `KAFKA_BOOTSTRAP_SERVERS=kafka:9092`,
`KAFKA_ENABLE_IDEMPOTENCE=true`, the database URLs and SMTP defaults (Mailpit), and refuses to start
until these are set in the environment or a `.env` file: `POSTGRES_PASSWORD` (used in all three
database URLs, keep it URL-safe), `SUBSCRIPTIONS_SECRET_KEY`, `EVENTS_SECRET_KEY`, `EVENTS_PUBLIC_URL`,
`PUBLIC_BASE_URL`, `ORGANISATION_NAME`, `ORGANISATION_ADDRESS`, `MAIL_FROM`, `MAIL_REPLY_TO`. Optional:
`SMTP_HOST`, `SMTP_PORT`, `SMTP_TLS` (see the comment in the file for a real relay), `LOG_LEVEL`,
`KAFKA_CLUSTER_ID`, `BRIDGEPOST_VERSION` (image tag). See [deployment.md](deployment.md).
"""


def env_name(cls: type[BaseSettings], name: str, field: FieldInfo) -> str:
    """The environment variable a field is read from (its alias, else prefix + name)."""
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        return next(choice for choice in alias.choices if isinstance(choice, str))
    if isinstance(alias, str):
        return alias
    return f"{cls.model_config.get('env_prefix', '')}{name}".upper()


def _type_text(field: FieldInfo) -> str:
    annotation = field.annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(f"`{value}`" for value in typing.get_args(annotation))
    if typing.get_origin(annotation) is list:
        return "JSON list"
    text = {bool: "boolean", int: "integer", float: "number", str: "text", SecretStr: "secret"}.get(
        annotation, getattr(annotation, "__name__", str(annotation)))
    low = next((f"{m.ge}" for m in field.metadata if isinstance(m, Ge)), None) or \
        next((f">{m.gt}" for m in field.metadata if isinstance(m, Gt)), None)
    high = next((f"{m.le}" for m in field.metadata if isinstance(m, Le)), None) or \
        next((f"<{m.lt}" for m in field.metadata if isinstance(m, Lt)), None)
    if low is not None and high is not None:
        text += f", {low}–{high}"
    elif low is not None:
        text += f", ≥ {low}"
    elif high is not None:
        text += f", ≤ {high}"
    return text


def _default_text(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return "*(required)*"
    else:
        value = field.default
    if isinstance(value, SecretStr):
        return "built-in development secret" if value.get_secret_value() == DEV_SECRET else "*(set)*"
    if value is None:
        return "*(unset)*"
    if value == "":
        return "*(empty)*"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, list | dict):
        return f"`{json.dumps(value)}`"
    return f"`{value}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def settings_table(cls: type[BaseSettings], names: list[str]) -> str:
    rows = ["| variable | type | default | description |", "|---|---|---|---|"]
    for name in names:
        field = cls.model_fields[name]
        rows.append(f"| `{env_name(cls, name, field)}` | {_cell(_type_text(field))} | {_cell(_default_text(field))} "
                    f"| {_cell(field.description or '')} |")
    return "\n".join(rows) + "\n"


def configuration_reference() -> str:
    parts = [CONFIGURATION_HEADER, "## Shared (`CommonSettings`, unprefixed)\n",
             settings_table(CommonSettings, list(CommonSettings.model_fields))]
    for service, cls in settings_classes().items():
        prefix = cls.model_config.get("env_prefix", "")
        parts.append(f"## {service} (`{cls.__name__}`, prefix `{prefix}`)\n")
        parts.append("Also reads every shared setting above.\n")
        own = [name for name in cls.model_fields if name not in CommonSettings.model_fields]
        parts.append(settings_table(cls, own))
    parts.append(CONFIGURATION_FOOTER)
    return "\n".join(parts)


def undocumented_settings() -> list[str]:
    """Environment variables whose field has no description (tests/test_docs.py requires one)."""
    missing = set()
    for cls in (CommonSettings, *settings_classes().values()):
        for name, field in cls.model_fields.items():
            if not (field.description or "").strip():
                missing.add(f"{env_name(cls, name, field)} ({cls.__name__}.{name})")
    return sorted(missing)


# --- the files --------------------------------------------------------------------------------------


def _json(document: Any) -> str:
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


ASYNCAPI_FILE = "docs/api/asyncapi.json"
CONFIGURATION_FILE = "docs/configuration.md"


def openapi_file(service: str) -> str:
    return f"docs/api/openapi-{service}.json"


OUTPUTS = (ASYNCAPI_FILE, *(openapi_file(service) for service in SERVICES), CONFIGURATION_FILE)


def generate() -> dict[str, str]:
    """Every generated file (OUTPUTS): path relative to the repository root -> content."""
    files = {ASYNCAPI_FILE: _json(asyncapi_document())}
    for service in SERVICES:
        files[openapi_file(service)] = _json(openapi_document(service))
    files[CONFIGURATION_FILE] = configuration_reference()
    return files


def stale(root: Path = ROOT) -> list[str]:
    """Generated files whose committed content differs from what the code produces now."""
    return [path for path, content in generate().items()
            if not (root / path).is_file() or (root / path).read_text("utf-8") != content]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.apidocs", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only report stale files (exit 1 if any)")
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this checkout)")
    args = parser.parse_args(argv)
    if args.check:
        out_of_date = stale(args.root)
        for path in out_of_date:
            print(f"out of date: {path} (run `make docs`)")
        return 1 if out_of_date else 0
    for path, content in generate().items():
        target = args.root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.is_file() or target.read_text("utf-8") != content:
            target.write_text(content, "utf-8")
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
