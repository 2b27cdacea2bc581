"""Kafka consumers of the subscriptions service: delivery reports from the mailer."""

from __future__ import annotations

from faststream.kafka import KafkaBroker

from services.subscriptions.usecases import Subscriptions
from shared import topics
from shared.kafka import DeadLetters, register_consumer
from shared.messages import DELIVERY_EVENTS, REGISTRATION_EVENTS
from shared.settings import CommonSettings
from shared.topics import TopicNames

GROUP = "subscriptions"


def register_handlers(broker: KafkaBroker, settings: CommonSettings, names: TopicNames,
                      subscriptions: Subscriptions) -> list[DeadLetters]:
    return [
        # Hard bounces count towards suppression; sent and failed mails are only acknowledged. One report per
        # mail: what one fetch brings is recorded in one transaction.
        register_consumer(broker, settings, names, topics.DELIVERY, GROUP, DELIVERY_EVENTS,
                          subscriptions.record_delivery, batch_handler=subscriptions.record_deliveries),
        # "Also subscribe to the newsletter" on an event registration starts the double opt-in.
        register_consumer(broker, settings, names, topics.REGISTRATION, GROUP, REGISTRATION_EVENTS,
                          subscriptions.newsletter_from_registration),
    ]
