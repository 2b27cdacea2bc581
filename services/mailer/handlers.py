"""Kafka consumers of the mailer: subscriber events (projection and transactional mail)."""

from __future__ import annotations

from faststream.kafka import KafkaBroker

from services.mailer.campaigns import Campaigns
from services.mailer.eventmail import EventMail
from services.mailer.transactional import TransactionalMail
from shared import topics
from shared.kafka import DeadLetters, register_consumer
from shared.messages import EVENT_EVENTS, JOB_EVENTS, REGISTRATION_EVENTS, SUBSCRIBER_EVENTS
from shared.settings import CommonSettings
from shared.topics import TopicNames

GROUP = "mailer"


def register_handlers(broker: KafkaBroker, settings: CommonSettings, names: TopicNames,
                      transactional: TransactionalMail, event_mail: EventMail,
                      campaigns: Campaigns) -> list[DeadLetters]:
    return [
        # Every sign-up passes here: what one fetch brings is handled in one transaction.
        register_consumer(broker, settings, names, topics.SUBSCRIBER, GROUP, SUBSCRIBER_EVENTS, transactional.handle,
                          batch_handler=transactional.handle_batch),
        register_consumer(broker, settings, names, topics.EVENT, GROUP, EVENT_EVENTS, event_mail.handle_event),
        register_consumer(broker, settings, names, topics.REGISTRATION, GROUP, REGISTRATION_EVENTS,
                          event_mail.handle_registration),
        # Campaign batches: every instance takes a share of the partitions.
        register_consumer(broker, settings, names, topics.JOBS, GROUP, JOB_EVENTS, campaigns.handle_job),
    ]
