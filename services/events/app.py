"""The events service: calendar, event pages, registration with waiting list, reminders, staff API."""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlparse

from fastapi import FastAPI
from sqlalchemy import or_, select

from services.events import api, pages, store
from services.events.settings import EventsSettings
from services.events.usecases import Events
from shared.db import Database, utcnow
from shared.i18n import load_translations
from shared.kafka import create_broker
from shared.outbox import OutboxRelay
from shared.runtime import Runtime, add_correlation_ids
from shared.topics import TopicNames
from shared.web import NO_OPENTELEMETRY, Metrics, Pages, add_operational_routes, guard_input, template_environment

MIGRATIONS = Path(__file__).with_name("migrations")
TEMPLATES = Path(__file__).with_name("templates")


def create_app(settings: EventsSettings) -> FastAPI:
    translations = load_translations()
    db = Database(settings.database_url)
    names = TopicNames(settings.kafka_topic_prefix)
    broker = create_broker(settings, "events")
    relay = OutboxRelay(db, store.infra, broker, names, settings.outbox_poll_seconds)
    db.on_commit("outbox", relay.notify)
    events = Events(db, settings)
    runtime = Runtime("events", settings, db, broker, names, relay)
    # The reminder scheduler: every instance runs it; a conditional update makes each reminder once.
    runtime.every(settings.scheduler_interval_seconds, events.emit_due_reminders)
    metrics = Metrics("events", relay=relay)

    async def listing(region: str | None = None, topic: str | None = None, kind: str | None = None,
                      include_past: bool = False) -> list:
        e = store.events
        query = select(e).where(or_(e.c.status == "published", e.c.status == "cancelled"))
        if not include_past:
            query = query.where(e.c.ends_at >= utcnow())
        if region:
            query = query.where(or_(e.c.region == region, e.c.region == "landesweit"))
        if kind:
            query = query.where(e.c.kind == kind)
        async with db.sessions() as s:
            rows = (await s.execute(query.order_by(e.c.starts_at).limit(500))).all()
        return [r for r in rows if not topic or topic in r.topics]

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await runtime.start()
        yield
        await runtime.stop()

    app = FastAPI(title="bridgepost events", version="1", lifespan=lifespan, telemetry=NO_OPENTELEMETRY,
                  description="Events, registration with capacity and waiting list, reminders, iCalendar.")
    app.state.settings = settings
    app.state.db = db
    app.state.infra = store.infra
    app.state.events = events
    app.state.runtime = runtime
    app.state.listing = listing
    app.state.domain = urlparse(settings.public_url).hostname or "bridgepost.local"
    app.state.pages = Pages(template_environment(TEMPLATES), translations, {
        "organisation": settings.organisation_name, "organisation_address": settings.organisation_address})
    app.include_router(pages.router)
    app.include_router(api.router)
    add_operational_routes(app, metrics, {"database": db.ping, "broker": runtime.broker_ready},
                           refresh=lambda: runtime.refresh_metrics(metrics, []))
    add_correlation_ids(app)
    # An event's texts in seven languages (descriptions up to 10,000 characters each) fit.
    guard_input(app, max_body_bytes=1024 * 1024)
    return app
