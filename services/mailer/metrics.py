"""The mailer's delivery figures for /metrics, counted from its ledgers at each scrape.

The ledgers (`outgoing_mail` for transactional mail, `campaign_deliveries` for campaigns) are shared by
every mailer instance, so these figures are the same on each of them: aggregate them with `max`, not `sum`.
A mail counts as bounced when it failed with an SMTP 5xx answer (its `last_error` starts with the code),
as failed when it was given up after temporary failures.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import and_, case, func, or_, select

from services.mailer import store
from shared.db import Database, utcnow
from shared.web import Metrics

m_ = store.outgoing_mail
d_ = store.campaign_deliveries
c_ = store.campaigns
OPEN_CAMPAIGNS = ("scheduled", "sending", "paused")
# How long a finished or cancelled campaign still shows its progress.
RECENT = timedelta(hours=24)


def outcome(table):
    """A row's status, with permanent failures (SMTP 5xx) told apart as `bounced`."""
    return case((and_(table.c.status == "failed", table.c.last_error.like("5__ %")), "bounced"),
                else_=table.c.status).label("outcome")


def retried(table):
    """Attempts of a row after its first."""
    return case((table.c.attempts > 1, table.c.attempts - 1), else_=0)


class MailMetrics:
    def __init__(self, db: Database, metrics: Metrics) -> None:
        self.db = db
        about = " (counted from the delivery ledgers: the same on every mailer instance)"
        self.sent = metrics.family("bridgepost_mails_sent_total", "Mails the SMTP server accepted" + about,
                                   ["kind"], "counter")
        self.failed = metrics.family("bridgepost_mails_failed_total",
                                     "Mails given up after temporary failures" + about, ["kind"], "counter")
        self.bounced = metrics.family("bridgepost_mails_bounced_total",
                                      "Mails refused permanently (SMTP 5xx)" + about, ["kind"], "counter")
        self.retries = metrics.family(
            "bridgepost_mail_retries_total",
            "Attempts after a mail's first one, made after a temporary failure (SMTP 4xx, connection error)" + about,
            ["kind"], "counter")
        self.ledger = metrics.family(
            "bridgepost_mail_ledger",
            "Ledger rows by kind (transactional kinds, or campaign) and status: pending, claimed, sending, sent, "
            "retry, failed, bounced, ambiguous (in flight when a mailer stopped; not resent), skipped, cancelled",
            ["kind", "status"])
        self.campaigns = metrics.family("bridgepost_campaigns", "Campaigns by status", ["status"])
        self.progress = metrics.family(
            "bridgepost_campaign_deliveries",
            "Delivery ledger rows of each campaign that is scheduled, sending or paused, or ended in the last "
            "24 hours, by status", ["campaign", "kind", "status"])

    async def refresh(self) -> None:
        since = utcnow() - RECENT
        async with self.db.sessions() as s:
            transactional = (await s.execute(
                select(m_.c.kind, outcome(m_), func.count()).group_by(m_.c.kind, "outcome"))).all()
            campaign = (await s.execute(select(outcome(d_), func.count()).group_by("outcome"))).all()
            retries = dict((await s.execute(select(m_.c.kind, func.sum(retried(m_))).group_by(m_.c.kind))).all())
            retries["campaign"] = await s.scalar(select(func.sum(retried(d_))))
            campaigns = (await s.execute(select(c_.c.status, func.count()).group_by(c_.c.status))).all()
            shown = select(c_.c.id).where(or_(c_.c.status.in_(OPEN_CAMPAIGNS), c_.c.finished_at >= since,
                                              c_.c.updated_at >= since))
            progress = (await s.execute(
                select(d_.c.campaign_id, c_.c.kind, d_.c.status, func.count())
                .join(c_, c_.c.id == d_.c.campaign_id)
                .where(d_.c.campaign_id.in_(shown.scalar_subquery()))
                .group_by(d_.c.campaign_id, c_.c.kind, d_.c.status))).all()
        rows = {(kind, status): float(n) for kind, status, n in transactional}
        rows.update({("campaign", status): float(n) for status, n in campaign})
        kinds = {kind for kind, _ in rows} | {"campaign"}
        for family, status in ((self.sent, "sent"), (self.failed, "failed"), (self.bounced, "bounced")):
            family.set({(kind,): rows.get((kind, status), 0.0) for kind in kinds})
        self.retries.set({(kind,): float(retries.get(kind) or 0) for kind in kinds})
        self.ledger.set(rows)
        self.campaigns.set({(status,): float(n) for status, n in campaigns})
        self.progress.set({(campaign_id, kind, status): float(n) for campaign_id, kind, status, n in progress})
