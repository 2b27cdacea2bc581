"""Kafka consumers of the mailer: subscriber events (projection and transactional mail)."""

from __future__ import annotations

from faststream.kafka import KafkaBroker

from services.mailer.transactional import TransactionalMail
from shared import topics
from shared.kafka import DeadLetters, register_consumer
from shared.messages import SUBSCRIBER_EVENTS
from shared.settings import CommonSettings
from shared.topics import TopicNames

GROUP = "mailer"


def register_handlers(broker: KafkaBroker, settings: CommonSettings, names: TopicNames,
                      transactional: TransactionalMail) -> list[DeadLetters]:
    return [register_consumer(broker, settings, names, topics.SUBSCRIBER, GROUP, SUBSCRIBER_EVENTS,
                              transactional.handle)]
