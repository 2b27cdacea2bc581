"""The mailer: renders and sends every mail; audience projection from subscriber events."""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from services.mailer import api, store
from services.mailer.campaigns import Campaigns
from services.mailer.eventmail import EventMail
from services.mailer.handlers import register_handlers
from services.mailer.metrics import MailMetrics
from services.mailer.render import MailRenderer
from services.mailer.sending import Sender
from services.mailer.settings import MailerSettings
from services.mailer.smtp import SmtpPool
from services.mailer.transactional import TransactionalMail
from shared.db import Database
from shared.i18n import load_translations
from shared.kafka import create_broker
from shared.logs import log_context
from shared.outbox import OutboxRelay
from shared.runtime import Runtime, add_correlation_ids
from shared.topics import TopicNames
from shared.web import NO_OPENTELEMETRY, Metrics, add_operational_routes, guard_input

MIGRATIONS = Path(__file__).with_name("migrations")


def create_app(settings: MailerSettings) -> FastAPI:
    translations = load_translations()
    db = Database(settings.database_url)
    names = TopicNames(settings.kafka_topic_prefix)
    broker = create_broker(settings, "mailer")
    relay = OutboxRelay(db, store.infra, broker, names, settings.outbox_poll_seconds)
    sender = Sender(db, settings, SmtpPool(settings))
    db.on_commit("outbox", relay.notify)
    db.on_commit("mail", sender.notify)
    renderer = MailRenderer(translations, settings.public_base_url, settings.mail_from, settings.reply_to,
                            settings.organisation_name, settings.organisation_address)
    transactional = TransactionalMail(db, renderer)
    event_mail = EventMail(db, renderer, sender.envelope_from)
    campaigns = Campaigns(db, renderer, settings, sender.pool, sender.limiter)
    dead_letters = register_handlers(broker, settings, names, transactional, event_mail, campaigns)
    runtime = Runtime("mailer", settings, db, broker, names, relay)
    db.on_commit("campaigns", campaigns.wake.set)
    runtime.every(1.0, campaigns.sweep, wake=campaigns.wake)
    metrics = Metrics("mailer", consumers=dead_letters, relay=relay)
    mail_metrics = MailMetrics(db, metrics)

    async def refresh_metrics() -> None:
        await runtime.refresh_metrics(metrics, dead_letters)
        await mail_metrics.refresh()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        with log_context(service="mailer"):  # what the sending loop logs says where it comes from
            sender.start()  # mail already in the ledger goes out even while Kafka is away
        await runtime.start()
        yield
        await campaigns.stop()
        await sender.stop()
        await runtime.stop()

    app = FastAPI(title="bridgepost mailer", version="1", lifespan=lifespan, telemetry=NO_OPENTELEMETRY,
                  description="Renders and sends all mail; delivery ledger and statistics.")
    app.state.settings = settings
    app.state.db = db
    app.state.infra = store.infra
    app.state.sender = sender
    app.state.runtime = runtime
    app.state.dead_letters = dead_letters
    app.state.renderer = renderer
    app.state.campaigns = campaigns
    app.include_router(api.router)
    add_operational_routes(app, metrics, {"database": db.ping, "broker": runtime.broker_ready},
                           refresh=refresh_metrics)
    add_correlation_ids(app)
    # A newsletter in seven languages (up to 100,000 characters each, JSON-escaped) fits.
    guard_input(app, max_body_bytes=4 * 1024 * 1024)
    return app
