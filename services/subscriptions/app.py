"""The subscriptions service: public sign-up pages, double opt-in, consent log, staff API."""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from services.subscriptions import api, pages, store
from services.subscriptions.admission import SignupAdmission
from services.subscriptions.handlers import register_handlers
from services.subscriptions.settings import SubscriptionsSettings
from services.subscriptions.usecases import build_subscriptions
from shared.db import Database
from shared.i18n import load_translations
from shared.kafka import create_broker
from shared.outbox import OutboxRelay
from shared.runtime import Runtime, add_correlation_ids
from shared.topics import TopicNames
from shared.web import NO_OPENTELEMETRY, Metrics, Pages, add_operational_routes, guard_input, template_environment

MIGRATIONS = Path(__file__).with_name("migrations")
TEMPLATES = Path(__file__).with_name("templates")


def create_app(settings: SubscriptionsSettings) -> FastAPI:
    translations = load_translations()
    db = Database(settings.database_url)
    names = TopicNames(settings.kafka_topic_prefix)
    broker = create_broker(settings, "subscriptions")
    relay = OutboxRelay(db, store.infra, broker, names, settings.outbox_poll_seconds)
    db.on_commit("outbox", relay.notify)
    subscriptions = build_subscriptions(db, settings)
    admission = SignupAdmission(subscriptions)
    dead_letters = register_handlers(broker, settings, TopicNames(settings.kafka_topic_prefix), subscriptions)
    runtime = Runtime("subscriptions", settings, db, broker, names, relay)
    runtime.every(600, subscriptions.prune_rate_limits)
    runtime.workers.append(admission)
    metrics = Metrics("subscriptions", consumers=dead_letters, relay=relay)
    metrics.family("bridgepost_signup_batches_total", "Transactions that admitted public sign-ups (group commit)",
                   kind="counter", source=lambda: {(): admission.batches})
    metrics.family("bridgepost_signups_batched_total", "Public sign-ups admitted in those transactions",
                   kind="counter", source=lambda: {(): admission.admitted})

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await runtime.start()
        yield
        await runtime.stop()

    app = FastAPI(title="bridgepost subscriptions", version="1", lifespan=lifespan, telemetry=NO_OPENTELEMETRY,
                  description="Sign-up with double opt-in, consent log, preferences and the subscriber staff API.")
    app.state.settings = settings
    app.state.db = db
    app.state.infra = store.infra
    app.state.subscriptions = subscriptions
    app.state.admission = admission
    app.state.runtime = runtime
    app.state.dead_letters = dead_letters
    app.state.pages = Pages(template_environment(TEMPLATES), translations, {
        "organisation": settings.organisation_name, "organisation_address": settings.organisation_address})
    # The API first: a sign-up's request is matched against the routes in this order.
    app.include_router(api.router)
    app.include_router(pages.router)
    add_operational_routes(app, metrics, {"database": db.ping, "broker": runtime.broker_ready},
                           refresh=lambda: runtime.refresh_metrics(metrics, dead_letters))

    add_correlation_ids(app)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["POST", "GET"],
                           allow_headers=["Content-Type"], max_age=3600)
    guard_input(app)
    return app
