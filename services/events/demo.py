"""Sample events for `make dev`, so the calendar, the feed and the mailer's projection have something to show.

They are published through the service's own use cases (the outbox emits `event_published`, so the
mailer knows them), never announced by mail, and created only in an events database without any
event yet: a restart that keeps `var/` adds nothing, and a database with real events is left alone.
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta
from typing import Any

from sqlalchemy import func, select

from services.events import store
from services.events.domain import BERLIN, EventCreate
from services.events.settings import EventsSettings
from services.events.usecases import Events
from shared.db import Database

# (days from today, local start, hours) and the event; local times are Europe/Berlin.
SAMPLES: list[tuple[int, time, float, dict[str, Any]]] = [
    (7, time(17, 0), 2.5, {
        "kind": "forum", "region": "magdeburg", "topics": ["arbeitsmarkt", "teilhabe"], "capacity": 40,
        "location": {"name": "Bürgerhaus Mitte (Beispielort)", "address": "Beispielstraße 12, 39104 Magdeburg"},
        "title": {
            "de": "Dialogforum: Arbeit finden in Magdeburg",
            "en": "Dialogue forum: finding work in Magdeburg",
            "ar": "منتدى حوار: إيجاد عمل في ماغديبورغ",
            "tr": "Diyalog forumu: Magdeburg'da iş bulmak",
        },
        "description": {
            "de": "Arbeitgeber, Jobcenter und Migrantenorganisationen sprechen über Wege in den Arbeitsmarkt. "
                  "Mit Dolmetschung ins Arabische.",
            "en": "Employers, the job centre and migrant organisations talk about ways into work. "
                  "With interpreting into Arabic.",
            "ar": "يتحدث أصحاب العمل ومركز التوظيف ومنظمات المهاجرين عن طرق الدخول إلى سوق العمل. "
                  "مع ترجمة فورية إلى العربية.",
            "tr": "İşverenler, iş ajansı ve göçmen dernekleri iş piyasasına giriş yollarını konuşuyor. "
                  "Arapçaya sözlü çeviri ile.",
        },
    }),
    (12, time(9, 30), 6.5, {
        "kind": "training", "region": "halle", "topics": ["fortbildung", "willkommenskultur"], "capacity": 20,
        "segment": {"audiences": ["partner"], "groups": ["politik-verwaltung", "bildung-wissenschaft"]},
        "location": {"name": "Seminarraum am Markt (Beispielort)", "address": "Beispielweg 3, 06108 Halle (Saale)"},
        "title": {
            "de": "Fortbildung: Interkulturelle Öffnung in Verwaltung und Schule",
            "en": "Training: intercultural opening in administration and schools",
            "tr": "Eğitim: Yönetimde ve okulda kültürlerarası açılım",
            "uk": "Навчання: міжкультурна відкритість в адміністрації та школі",
        },
        "description": {
            "de": "Ein Tag mit Übungen und Beispielen aus Sachsen-Anhalt: Wie gelingt ein guter Empfang?",
            "en": "A day of exercises and examples from Saxony-Anhalt: what makes a good welcome?",
            "tr": "Saksonya-Anhalt'tan alıştırmalar ve örneklerle bir gün: İyi bir karşılama nasıl olur?",
            "uk": "День вправ і прикладів із Саксонії-Ангальт: як добре зустріти новоприбулих?",
        },
    }),
    (16, time(18, 0), 1.5, {
        "kind": "workshop", "region": "landesweit", "topics": ["bildung"],
        "online_url": "https://meet.example.org/lernpaten",
        "title": {
            "de": "Online-Workshop: Lernpatenschaften für Kinder und ihre Mütter",
            "en": "Online workshop: learning mentors for children and their mothers",
            "ar": "ورشة عمل عبر الإنترنت: مرشدو التعلّم للأطفال وأمهاتهم",
            "fa": "کارگاه آنلاین: مربیان یادگیری برای کودکان و مادرانشان",
            "ru": "Онлайн-семинар: наставники по учёбе для детей и их матерей",
        },
        "description": {
            "de": "Lernpatinnen und Lernpaten erzählen, wie sie Familien begleiten. "
                  "Fragen in jeder Sprache willkommen.",
            "en": "Learning mentors tell how they support families. Questions welcome in any language.",
            "ar": "يحكي مرشدو التعلّم كيف يرافقون العائلات. الأسئلة مرحّب بها بأي لغة.",
            "fa": "مربیان یادگیری تعریف می‌کنند که چگونه خانواده‌ها را همراهی می‌کنند. پرسش به هر زبانی خوش‌آمد است.",
            "ru": "Наставники рассказывают, как они сопровождают семьи. Вопросы можно задавать на любом языке.",
        },
    }),
    (20, time(16, 0), 1.5, {
        "kind": "info", "region": "stendal", "topics": ["foerderung", "teilhabe"],
        "location": {"name": "Kreishaus (Beispielort)", "address": "Musterplatz 1, 39576 Stendal"},
        "title": {
            "de": "Infoveranstaltung: Fördermittel für Vereine und Initiativen",
            "en": "Info session: funding for associations and initiatives",
            "uk": "Інформаційна зустріч: фінансування для об'єднань та ініціатив",
            "tr": "Bilgilendirme: dernekler ve girişimler için destek fonları",
        },
        "description": {
            "de": "Welche Förderprogramme gibt es, und wie stellt man einen Antrag? Mit Beratung im Anschluss.",
            "en": "Which funding programmes exist, and how do you apply? Advice afterwards.",
            "uk": "Які є програми фінансування і як подати заявку? Після зустрічі — консультація.",
            "tr": "Hangi destek programları var ve nasıl başvurulur? Ardından danışmanlık.",
        },
    }),
    (26, time(15, 0), 3.0, {
        "kind": "local-project", "region": "harz", "topics": ["willkommenskultur", "veranstaltungen"],
        "location": {"name": "Kulturscheune (Beispielort)", "address": "Am Beispielhof 7, 38820 Halberstadt"},
        "title": {
            "de": "Willkommensfest im Harz: Filmabend mit Infofilmen für Neuangekommene",
            "en": "Welcome party in the Harz: film evening with info films for newcomers",
            "ar": "حفل ترحيب في هارتس: أمسية أفلام تعريفية للقادمين الجدد",
            "uk": "Свято знайомства в Гарці: вечір інформаційних фільмів для новоприбулих",
        },
        "description": {
            "de": "Wir zeigen die neuen Infofilme in mehreren Sprachen, danach Essen und Gespräche.",
            "en": "We show the new info films in several languages, followed by food and conversation.",
            "ar": "نعرض الأفلام التعريفية الجديدة بعدة لغات، يليها طعام وأحاديث.",
            "uk": "Покажемо нові інформаційні фільми кількома мовами, потім — їжа та розмови.",
        },
    }),
]


def sample_events(today: date) -> list[EventCreate]:
    """The samples, dated from `today` on (so they are always upcoming)."""
    out = []
    for days, start, hours, fields in SAMPLES:
        starts_at = datetime.combine(today + timedelta(days=days), start, BERLIN)
        extra: dict[str, Any] = {}
        if fields.get("capacity"):
            extra["registration_deadline"] = starts_at - timedelta(days=1)
        out.append(EventCreate(**fields, **extra, starts_at=starts_at, ends_at=starts_at + timedelta(hours=hours),
                               announce=False))  # a demo must not mail anyone
    return out


async def create_demo_events(db: Database, settings: EventsSettings, today: date | None = None) -> int:
    """Publish the sample events if the database has no event at all; returns how many were created."""
    events = Events(db, settings)
    samples = sample_events(today or datetime.now(BERLIN).date())
    async with db.transaction() as s:
        if await s.scalar(select(func.count()).select_from(store.events)):
            return 0
        for data in samples:
            event_id = await events.create(s, data)
            await events.publish(s, event_id, None)
    return len(samples)
