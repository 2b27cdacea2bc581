"""The `bridgepost` command line (SPEC §4): dev, serve, migrate, api-key, and the operator's helpers
subscribers export/import, topics create, outbox status, dlq list/replay."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

SERVICES = ("subscriptions", "events", "mailer")
STATUSES = ("pending", "active", "unsubscribed", "suppressed", "erased")  # services.subscriptions.domain


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    settings: Callable[..., Any]
    create_app: Callable[[Any], Any]
    migrations: Path
    infra: Any


def service(name: str) -> ServiceSpec:
    """Import a service lazily, so `bridgepost --help` stays fast."""
    if name == "subscriptions":
        from services.subscriptions import app, store
        from services.subscriptions.settings import SubscriptionsSettings
        return ServiceSpec(name, SubscriptionsSettings, app.create_app, app.MIGRATIONS, store.infra)
    if name == "events":
        from services.events import app, store
        from services.events.settings import EventsSettings
        return ServiceSpec(name, EventsSettings, app.create_app, app.MIGRATIONS, store.infra)
    if name == "mailer":
        from services.mailer import app, store
        from services.mailer.settings import MailerSettings
        return ServiceSpec(name, MailerSettings, app.create_app, app.MIGRATIONS, store.infra)
    raise SystemExit(f"bridgepost: unknown service {name!r} (one of: {', '.join(SERVICES)})")


def configure_logging(level: str = "INFO") -> None:
    # JSON lines in production (or LOG_FORMAT=json), text otherwise; correlation ids, addresses masked.
    from shared import logs
    logs.configure(level, json_format=logs.json_wanted(), stream=sys.stderr)
    logging.captureWarnings(True)  # Python warnings become log lines in the same format


async def migrate(names: list[str]) -> None:
    from shared.db import migrate as run_migrations
    for name in names:
        spec = service(name)
        settings = spec.settings()
        await run_migrations(settings.database_url, spec.migrations)
        print(f"{name}: database at the newest revision")


async def settle_heap() -> None:
    """Leave what a service process keeps for its lifetime (modules, the app, clients, caches: all there is
    once it has connected) out of the garbage collector's full collections from then on (`gc.freeze`).

    Under load a full collection ran every few seconds and walked all of it: 90–126 ms in the subscriptions
    service at 200 sign-ups/s (2026-12-06), a pause for every request waiting, so a sign-up's p99. With it:
    27–34 ms (p90 of the full collections), a sixth to a quarter of their total time (docs/performance.md).
    The collection before it frees what starting left behind, so no garbage of that time is kept forever.
    Only for `bridgepost serve` (one service per process): in a test process it would also freeze the tests'
    objects, garbage later, for good.
    """
    gc.collect()
    gc.freeze()


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn
    spec = service(args.service)
    settings = spec.settings()
    configure_logging(settings.log_level)
    if args.migrate:
        asyncio.run(migrate([args.service]))
    port = args.port or settings.port
    app = spec.create_app(settings)
    app.state.runtime.after_connect.append(settle_heap)
    # loop/http "auto": uvloop and httptools (installed with bridgepost), the pure-Python ones without them.
    # No access log of uvicorn's: shared.web.RequestLog writes ours (without the query string, which may hold
    # tokens); uvicorn's would otherwise still format its line for every answer before dropping it.
    uvicorn.run(app, host=args.host, port=port, log_level="warning", access_log=False,
                proxy_headers=False, timeout_graceful_shutdown=10, loop="auto", http="auto")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    asyncio.run(migrate(args.services or list(SERVICES)))
    return 0


async def _keys(args: argparse.Namespace) -> int:
    from shared.auth import ROLES, generate_key, list_keys, register_key, revoke_key
    from shared.db import Database
    names = args.services or list(SERVICES)
    if args.action == "create":
        if args.role not in ROLES:
            print(f"bridgepost: --role must be one of {', '.join(ROLES)}", file=sys.stderr)
            return 2
        key = args.key or generate_key()
        for name in names:
            spec = service(name)
            db = Database(spec.settings().database_url)
            try:
                await register_key(db, spec.infra, key, args.role, args.name)
            finally:
                await db.dispose()
        print(key)
        print(f"(role {args.role}, registered with {', '.join(names)}; shown once, stored only as a hash)",
              file=sys.stderr)
        return 0
    revoked_total = 0
    for name in names:
        spec = service(name)
        db = Database(spec.settings().database_url)
        try:
            if args.action == "list":
                for row in await list_keys(db, spec.infra):
                    state = "revoked" if row["revoked_at"] else "active"
                    print(f"{name}\t{row['id']}\t{row['prefix']}…\t{row['role']}\t{row['name']}\t{state}")
            else:
                count = await revoke_key(db, spec.infra, args.key_id.rstrip("…"))
                print(f"{name}: {count} key(s) revoked")
                revoked_total += count
        finally:
            await db.dispose()
    if args.action == "revoke" and not revoked_total:
        print(f"bridgepost: no active key matches {args.key_id!r}", file=sys.stderr)
        return 1
    return 0


def cmd_api_key(args: argparse.Namespace) -> int:
    if args.action == "revoke" and not args.key_id:
        print("bridgepost: api-key revoke needs the key's id or prefix", file=sys.stderr)
        return 2
    return asyncio.run(_keys(args))


def cmd_dev(args: argparse.Namespace) -> int:
    from shared.dev import run_dev
    return run_dev(Path(args.var))


def cmd_inbox(args: argparse.Namespace) -> int:
    from shared.devinbox import run_inbox
    configure_logging()
    try:
        asyncio.run(run_inbox(Path(args.maildir), smtp_port=args.smtp_port, web_port=args.web_port))
    except KeyboardInterrupt:
        pass
    return 0


# --- subscribers export / import ------------------------------------------------------------------------


def _subscriptions_db():
    from shared.db import Database
    settings = service("subscriptions").settings()
    return settings, Database(settings.database_url)


async def _export(out, statuses: list[str]) -> int:
    from services.subscriptions.csvfiles import export_csv
    _, db = _subscriptions_db()
    try:
        return await export_csv(db, out, statuses)
    finally:
        await db.dispose()


async def _import(text: str, name: str) -> int:
    from services.subscriptions.csvfiles import CsvProblem, import_csv
    from services.subscriptions.usecases import build_subscriptions
    settings, db = _subscriptions_db()
    try:
        summary = await import_csv(build_subscriptions(db, settings), text)
    except CsvProblem as exc:
        print(f"bridgepost: {name}: {exc}; nothing imported", file=sys.stderr)
        return 2
    finally:
        await db.dispose()
    for line, problem in summary.invalid:
        print(f"{name}: line {line}: {problem}", file=sys.stderr)
    for line in summary.lines():
        print(line)
    if summary.confirmation:
        print("(the running subscriptions service publishes the confirmation requests; the mailer sends them)",
              file=sys.stderr)
    if summary.invalid:
        print(f"bridgepost: {len(summary.invalid)} invalid row(s) not imported; fix them and import the file again",
              file=sys.stderr)
        return 1
    return 0


def cmd_subscribers(args: argparse.Namespace) -> int:
    if args.action == "export":
        if args.output in (None, "-"):
            count = asyncio.run(_export(sys.stdout, args.status or []))
            print(f"{count} subscriber(s) exported", file=sys.stderr)
            return 0
        # Personal data: readable by the owner only, and complete or not there at all.
        path = Path(args.output)
        partial = path.with_name(f".{path.name}.partial")
        try:
            with open(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="utf-8",
                      newline="") as out:
                count = asyncio.run(_export(out, args.status or []))
            os.replace(partial, path)
        except OSError as exc:
            print(f"bridgepost: cannot write {path}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        finally:
            partial.unlink(missing_ok=True)
        print(f"{count} subscriber(s) exported to {path}", file=sys.stderr)
        return 0
    from services.subscriptions.csvfiles import CsvProblem, decode
    name = "standard input" if args.file == "-" else args.file
    try:
        text = decode(sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes())
    except OSError as exc:
        print(f"bridgepost: cannot read {name}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except CsvProblem as exc:
        print(f"bridgepost: {name}: {exc}; nothing imported", file=sys.stderr)
        return 2
    return asyncio.run(_import(text, name))


# --- topics, dead letters, outbox -------------------------------------------------------------------------


def _kafka(args: argparse.Namespace):
    """(bootstrap servers, topic names, settings) from the options, else from the settings."""
    from shared.settings import CommonSettings
    from shared.topics import TopicNames
    # A broker that cannot be reached is reported once, by main(), not by every client's retries.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    settings = CommonSettings()
    prefix = settings.kafka_topic_prefix if args.prefix is None else args.prefix
    return args.bootstrap_servers or settings.kafka_bootstrap_servers, TopicNames(prefix), settings


def _run_kafka(command, bootstrap: str) -> int:
    from aiokafka.errors import KafkaConnectionError
    try:
        return asyncio.run(command)
    except KafkaConnectionError:
        print(f"bridgepost: cannot reach Kafka at {bootstrap} (--bootstrap-servers or KAFKA_BOOTSTRAP_SERVERS)",
              file=sys.stderr)
        return 1


async def _create_topics(bootstrap: str, names) -> int:
    from shared.dlq import partition_counts
    from shared.topics import PARTITIONS, dlq, ensure_topics
    await ensure_topics(bootstrap, names)
    wanted = {names(t): n for t, n in PARTITIONS.items()} | {names(dlq(t)): 1 for t in PARTITIONS}
    actual = await partition_counts(bootstrap, list(wanted))
    short = 0
    for topic, partitions in wanted.items():
        print(f"{topic}\t{actual[topic]} partition(s)")
        if actual[topic] < partitions:
            short += 1
            print(f"bridgepost: {topic} has {actual[topic]} partition(s), not {partitions}: it was created "
                  "elsewhere (auto-created?); add partitions with the broker's tools", file=sys.stderr)
    return 1 if short else 0


def cmd_topics(args: argparse.Namespace) -> int:
    bootstrap, names, _ = _kafka(args)
    return _run_kafka(_create_topics(bootstrap, names), bootstrap)


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size, smaller, smaller_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if seconds >= size:
            rest = (seconds % size) // smaller_size
            return f"{seconds // size}{unit}" + (f" {rest}{smaller}" if rest else "")
    return f"{seconds}s"


async def _outbox_status(args: argparse.Namespace) -> int:
    from sqlalchemy import func, select

    from shared.db import Database, utcnow
    table = [("service", "backlog", "oldest unpublished", "published last hour", "relay")]
    for name in args.services or SERVICES:
        spec = service(name)
        db = Database(spec.settings().database_url)
        t, leases = spec.infra.outbox, spec.infra.leases
        now = utcnow()
        try:
            async with db.sessions() as s:
                backlog, oldest = (await s.execute(select(func.count(), func.min(t.c.created_at))
                                                   .where(t.c.published_at.is_(None)))).one()
                published = await s.scalar(select(func.count()).select_from(t).where(
                    t.c.published_at >= now - timedelta(hours=1)))
                lease = (await s.execute(select(leases.c.holder, leases.c.expires_at)
                                         .where(leases.c.name == "outbox-relay"))).first()
        finally:
            await db.dispose()
        if lease is None:
            relay = "none"
        elif lease.expires_at >= now:
            relay = f"{lease.holder} (lease for {_age((lease.expires_at - now).total_seconds())} more)"
        else:
            relay = f"none ({lease.holder} let its lease expire {_age((now - lease.expires_at).total_seconds())} ago)"
        table.append((name, str(backlog), _age((now - oldest).total_seconds()) if oldest else "-", str(published),
                      relay))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1])
    return 0


def cmd_outbox(args: argparse.Namespace) -> int:
    return asyncio.run(_outbox_status(args))


DLQ_COLUMNS = ("partition", "offset", "failed at", "key", "type", "event_id", "consumer", "origin", "state", "error")


def _dead_letter_row(m) -> str:
    state = "replayed" if m.replayed else "waiting"
    return "\t".join(str(v) or "-" for v in (m.partition, m.offset, m.failed_at, m.key, m.event_type, m.event_id,
                                               m.consumer_group, m.origin, state, m.error))


async def _dlq(args: argparse.Namespace, tool, topics: list[str]) -> int:
    from shared.topics import dlq
    names = tool.names
    if args.action == "list":
        for topic in topics:
            queue = await tool.contents(topic)
            if not queue.exists:
                print(f"{names(dlq(topic))}: no such topic (bridgepost topics create makes it)")
                continue
            print(f"{names(dlq(topic))}: {len(queue.messages)} message(s), {queue.waiting} waiting for a replay")
            if queue.messages:
                print("\t".join(DLQ_COLUMNS))
            for m in queue.messages:
                print(_dead_letter_row(m))
        return 0
    (topic,) = topics
    replay = await tool.replay(topic, args.limit, args.dry_run)
    verb = "would replay" if replay.dry_run else "replayed"
    for m in replay.messages:
        print(f"{verb}\t{m.partition}\t{m.offset}\t{m.event_type or '-'}\t{m.event_id or '-'}\t{m.origin or '-'}")
    extra = f", {replay.duplicates} further cop(ies) of them skipped" if replay.duplicates else ""
    print(f"{names(dlq(topic))} → {names(topic)}: {verb} {len(replay.messages)} message(s){extra}; "
          f"{replay.left} left")
    return 0


def cmd_dlq(args: argparse.Namespace) -> int:
    from shared.dlq import DeadLetterTopics, topic_for
    from shared.topics import PARTITIONS
    bootstrap, names, settings = _kafka(args)
    try:
        topics = [topic_for(args.topic, names)] if args.topic else list(PARTITIONS)
    except ValueError as exc:
        print(f"bridgepost: {exc}", file=sys.stderr)
        return 2
    tool = DeadLetterTopics(bootstrap, names, settings.kafka_enable_idempotence)
    return _run_kafka(_dlq(args, tool, topics), bootstrap)


def service_name(value: str) -> str:
    if value not in SERVICES:
        raise argparse.ArgumentTypeError(f"unknown service {value!r} (one of: {', '.join(SERVICES)})")
    return value


def positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def _kafka_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap-servers", default=None, metavar="HOST:PORT[,…]",
                   help="Kafka to talk to (default: KAFKA_BOOTSTRAP_SERVERS, else 127.0.0.1:9092)")
    p.add_argument("--prefix", default=None, help="topic name prefix (default: KAFKA_TOPIC_PREFIX, else none)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bridgepost", description="bridgepost: newsletter with real double opt-in")
    sub = p.add_subparsers(dest="command", required=True)

    dev = sub.add_parser("dev", help="run everything on this machine (what `make dev` runs)")
    dev.add_argument("--var", default="var", help="folder for databases and the dev inbox (default: var)")
    dev.set_defaults(func=cmd_dev)

    serve = sub.add_parser("serve", help="run one service")
    serve.add_argument("service", choices=SERVICES)
    serve.add_argument("--host", default=os.environ.get("BRIDGEPOST_HOST", "127.0.0.1"))
    serve.add_argument("--port", type=int, default=None,
                       help="default: <SERVICE>_PORT (8001 subscriptions, 8002 events, 8003 mailer)")
    serve.add_argument("--migrate", action="store_true", help="migrate the database first")
    serve.set_defaults(func=cmd_serve)

    migrate_p = sub.add_parser("migrate", help="bring the services' databases to the newest revision")
    migrate_p.add_argument("services", nargs="*", metavar="SERVICE", help="default: all services")
    migrate_p.set_defaults(func=cmd_migrate)

    keys = sub.add_parser("api-key", help="staff API keys")
    keys_sub = keys.add_subparsers(dest="action", required=True)
    create = keys_sub.add_parser("create", help="create a key (printed once)")
    create.add_argument("--role", required=True, help="editor, publisher or admin")
    create.add_argument("--name", default="staff", help="who the key is for")
    create.add_argument("--key", default=None, help=argparse.SUPPRESS)
    keys_sub.add_parser("list", help="list keys")
    revoke = keys_sub.add_parser("revoke", help="revoke a key by id or prefix")
    revoke.add_argument("key_id", nargs="?")
    for sp in keys_sub.choices.values():
        sp.add_argument("--service", dest="services", action="append", choices=SERVICES,
                        help="only this service's database (default: all)")
    keys.set_defaults(func=cmd_api_key)

    subscribers = sub.add_parser("subscribers", help="export or import subscribers as CSV")
    subscribers_sub = subscribers.add_subparsers(dest="action", required=True)
    export = subscribers_sub.add_parser(
        "export", help="write subscribers as CSV (spreadsheet-safe; a valid import file)",
        description="Write the subscribers of the subscriptions database as CSV: email, name, language, topics, "
                    "regions, groups (lists separated by ';'), audience, status, proof of consent of active "
                    "subscribers, id and times. Erased subscribers are left out.")
    export.add_argument("--output", "-o", default=None, metavar="FILE",
                        help="file to write (readable by you only; default: standard output)")
    export.add_argument("--status", action="append", choices=[s for s in STATUSES if s != "erased"],
                        help="only subscribers with this status (repeatable; default: all)")
    import_p = subscribers_sub.add_parser(
        "import", help="import subscribers from CSV (double opt-in unless consent is proven)",
        description="Import subscribers from a UTF-8 CSV file (',' ';' or tab separated) with the columns email "
                    "and optionally name, language, topics, regions, groups, audience (lists separated by ';'), "
                    "and proof of consent: consent_at (ISO time; without a zone Europe/Berlin), consent_source, "
                    "consent_text_version, consent_ip. A row with proof (consent_at and consent_source) becomes "
                    "an active subscriber and the proof goes to the consent log; a row without gets the double "
                    "opt-in (a confirmation mail, sent by the running services). Suppressed, erased and "
                    "unsubscribed addresses are never imported; importing a file again changes nothing. Invalid "
                    "rows are reported by line and skipped (exit status 1).")
    import_p.add_argument("file", metavar="FILE", help="the CSV file ('-' for standard input)")
    subscribers.set_defaults(func=cmd_subscribers)

    topics_p = sub.add_parser("topics", help="Kafka topics")
    topics_sub = topics_p.add_subparsers(dest="action", required=True)
    create_topics = topics_sub.add_parser(
        "create", help="create every topic and its .dlq with their partition counts",
        description="Create every topic (and its .dlq topic) with its partition count; existing topics are "
                    "left alone. Prints each topic with the partitions it has; exit status 1 when one has fewer "
                    "than it should.")
    _kafka_options(create_topics)
    topics_p.set_defaults(func=cmd_topics)

    outbox = sub.add_parser("outbox", help="the services' transactional outboxes")
    outbox_sub = outbox.add_subparsers(dest="action", required=True)
    status = outbox_sub.add_parser(
        "status", help="backlog, oldest unpublished event, published last hour, relay lease holder",
        description="Per service: events waiting in the outbox, how old the oldest is, how many were published "
                    "in the last hour, and which relay holds the lease (one relay publishes at a time).")
    status.add_argument("services", nargs="*", metavar="SERVICE", type=service_name,
                        help=f"{', '.join(SERVICES)} (default: all)")
    outbox.set_defaults(func=cmd_outbox)

    dlq_p = sub.add_parser("dlq", help="dead-lettered messages: list and replay")
    dlq_sub = dlq_p.add_subparsers(dest="action", required=True)
    dlq_list = dlq_sub.add_parser(
        "list", help="list the messages in the .dlq topics (never their content)",
        description="List the messages in <topic>.dlq (all topics, or TOPIC's): offset, time, key, event type "
                    "and id, the consumer that failed, where it came from, whether it was replayed, and the error. "
                    "The message body is never shown.")
    dlq_list.add_argument("topic", nargs="?", metavar="TOPIC", help="e.g. mailer.delivery.v1 (default: all)")
    replay = dlq_sub.add_parser(
        "replay", help="republish dead-lettered messages to their topic (once fixed)",
        description="Republish the messages of TOPIC.dlq that were not replayed yet to TOPIC, oldest first, and "
                    "remember them (consumer group <prefix>bridgepost-dlq-replay.TOPIC), so the next replay "
                    "sends only newer ones. Consumers deduplicate by event_id, so replaying is safe.")
    replay.add_argument("topic", metavar="TOPIC", help="e.g. mailer.delivery.v1 (with or without .dlq)")
    replay.add_argument("--limit", type=positive_int, default=None, metavar="N", help="at most N messages")
    replay.add_argument("--dry-run", action="store_true", help="only show what would be replayed")
    for sp in (dlq_list, replay):
        _kafka_options(sp)
    dlq_p.set_defaults(func=cmd_dlq)

    inbox = sub.add_parser("inbox", help="run only the development mail inbox")
    inbox.add_argument("--maildir", default="var/maildir")
    inbox.add_argument("--smtp-port", type=int, default=1025)
    inbox.add_argument("--web-port", type=int, default=8025)
    inbox.set_defaults(func=cmd_inbox)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `bridgepost dlq list | head`: the reader has seen enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:  # a clear message, not a stack trace, for a person at a terminal
        if os.environ.get("BRIDGEPOST_DEBUG"):
            raise
        print(f"bridgepost: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
